"""ONNX export (tumorseg.export, `tumorseg export`): the file run in onnxruntime gives PyTorch's
dense logits for any batch and slice size, its metadata says how to feed it, and bad input is a
one-line error with exit code 2.

onnx, onnxscript and onnxruntime are the `onnx` extra, which `make test` (and so CI) installs:
these tests fail, not skip, without them.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_segment import write_tiny_model

from tumorseg import weights
from tumorseg.cli import main
from tumorseg.datasets import find_cases
from tumorseg.export import METADATA_KEYS, export_onnx
from tumorseg.infer import slice_boxes
from tumorseg.models import Cascade, TwoPathCNN, TwoPathConfig, dense_logits, fastconv
from tumorseg.segment import prepare_case

TINY = TwoPathConfig(local_maps=(4, 4), global_maps=6, dropout=0.0, init="default")
TINY_META = {"model": "local_cascade", "preprocess": {"clip_percentiles": [2.0, 98.0],
                                                      "margin": 5}, "convention": "brats2017"}
# Standard operators the plain engine's graph may hold: convolutions, pooling, maxout (Reshape +
# ReduceMax), concatenations, the cascade's softmax and window slice, and shape arithmetic.
STANDARD_OPS = {"Conv", "MaxPool", "Reshape", "ReduceMax", "Concat", "Softmax", "Slice", "Shape",
                "Squeeze", "Unsqueeze", "Gather", "Add", "Sub", "Constant", "Identity"}


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _padded(x: np.ndarray, props: dict) -> np.ndarray:
    """x [B, 4, H, W] zero-padded as the file's metadata says."""
    pad = json.loads(props["padding"])
    return np.pad(x, ((0, 0), (0, 0), (pad["before"], pad["after"]),
                      (pad["before"], pad["after"])))


def _plain_dense(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """PyTorch's whole-slice logits (dense_logits pads itself), plain engine: [B, 5, H, W]."""
    with fastconv.options(mode="plain"), torch.no_grad():
        return dense_logits(model.eval(), torch.from_numpy(x)).numpy()


def _tiny_cascade(seed: int = 0) -> Cascade:
    """An untrained local-join cascade with tiny stages: its even receptive field (56) pads
    unequally, and its first stage's output joins inside the second CNN."""
    torch.manual_seed(seed)
    return Cascade("local", TwoPathCNN(TINY), TINY).eval()


# -- untrained tiny models: no shared data --------------------------------------------------------

@pytest.mark.parametrize("kind", ["two_path", "local_cascade"])
def test_tiny_model_matches_pytorch_at_two_sizes(tmp_path, kind):
    if kind == "two_path":
        torch.manual_seed(0)
        model = TwoPathCNN(TINY).eval()
    else:
        model = _tiny_cascade()
    path = tmp_path / "tiny.onnx"
    export_onnx(model, TINY_META, path)
    session = _session(path)
    props = session.get_modelmeta().custom_metadata_map
    gen = np.random.default_rng(3)
    # Two batch sizes and two slice shapes, neither the export's example (dynamic axes).
    for shape in [(1, 4, 23, 31), (3, 4, 40, 17)]:
        x = gen.standard_normal(shape).astype(np.float32)
        got = session.run(["logits"], {"image": _padded(x, props)})[0]
        want = _plain_dense(model, x)
        assert got.shape == want.shape == (shape[0], 5) + shape[2:]
        err = np.abs(got - want).max()
        assert err < 1e-5, f"{kind} {shape}: max |onnxruntime - torch| = {err:.2e}"


def test_graph_is_standard_operators_with_dynamic_axes(tmp_path):
    model = _tiny_cascade()
    path = tmp_path / "tiny.onnx"
    export_onnx(model, TINY_META, path, verify=False)
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "MaxPool", "ReduceMax", "Softmax"} <= ops <= STANDARD_OPS, sorted(ops)
    assert {n.domain for n in proto.graph.node} == {""} and not proto.functions
    # Two stages of three maxout convolutions and a head each.
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == 8
    (inp,), (out,) = proto.graph.input, proto.graph.output
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (inp, out)]
    assert inp.name == "image" and out.name == "logits"
    assert dims[0][1] == 4 and dims[1][1] == 5
    assert all(isinstance(d, str) and d for v in dims for d in (v[0], v[2], v[3])), dims


def test_metadata_describes_the_model(tmp_path):
    path = tmp_path / "tiny.onnx"
    export_onnx(_tiny_cascade(), TINY_META, path, verify=False)
    props = _session(path).get_modelmeta().custom_metadata_map
    assert set(props) == set(METADATA_KEYS)
    # Literal values (docs/ARCHITECTURE.md: local_cascade rf 56, padding 28 before, 27 after).
    assert props["receptive_field"] == "56"
    assert json.loads(props["padding"]) == {"before": 28, "after": 27}
    assert json.loads(props["classes"]) == ["other", "necrosis", "oedema", "non-enhancing",
                                            "enhancing"]
    assert json.loads(props["modalities"]) == ["t1", "t1c", "t2", "flair"]
    conv = json.loads(props["convention"])
    assert conv["name"] == "brats2017"
    assert conv["from_canonical"] == {"0": 0, "1": 1, "2": 2, "3": 1, "4": 4}
    pre = json.loads(props["preprocess"])
    assert pre["clip_percentiles"] == [2.0, 98.0] and pre["margin"] == 5 and pre["n4"] is False
    assert json.loads(props["geometry"]) == {"axcodes": "LPS", "spacing": [1.0, 1.0, 1.0]}
    assert props["model"] == "local_cascade" and props["tumorseg_version"] == "0.1.0"


# -- the command ----------------------------------------------------------------------------------

def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tumorseg: error: "), err
    return lines[0]


def test_cli_writes_the_file_and_replaces_an_old_one(tmp_path, capsys):
    model_file = write_tiny_model(tmp_path / "tiny.pt")
    out = tmp_path / "out" / "tiny.onnx"
    out.parent.mkdir()
    out.write_text("an older export")
    assert main(["export", "--model", str(model_file), "-o", str(out)]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["tiny.onnx"]  # no temporary left
    props = _session(out).get_modelmeta().custom_metadata_map
    assert props["model"] == "two_path" and props["receptive_field"] == "33"


def test_cli_bad_input_exits_2(tmp_path, capsys, monkeypatch):
    model_file = write_tiny_model(tmp_path / "tiny.pt")
    assert main(["export", "--model", "two_pth", "-o", str(tmp_path / "a.onnx")]) == 2
    assert "two_pth" in _one_error_line(capsys.readouterr().err)
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    assert main(["export", "--model", str(model_file), "-o", str(folder)]) == 2
    assert "is a folder" in _one_error_line(capsys.readouterr().err)
    # A model file without preprocessing settings cannot say how to feed the graph.
    payload = torch.load(model_file, weights_only=True)
    del payload["preprocess"]
    torch.save(payload, tmp_path / "bare.pt")
    assert main(["export", "--model", str(tmp_path / "bare.pt"), "-o",
                 str(tmp_path / "b.onnx")]) == 2
    assert "preprocess" in _one_error_line(capsys.readouterr().err)
    # Without the extra: the install command, and no file.
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    assert main(["export", "--model", str(model_file), "-o", str(tmp_path / "c.onnx")]) == 2
    assert "pip install tumorseg[onnx]" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pt", "folder.onnx", "tiny.pt"]


# -- released weights on a real case --------------------------------------------------------------

@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", ["two_path", "input_cascade"])
def test_released_model_matches_pytorch_on_a_real_case(shared_data, tmp_path, name):
    model, meta = weights.resolve_model(name)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, meta, path, verify=False)
    session = _session(path)
    props = session.get_modelmeta().custom_metadata_map
    case = find_cases(shared_data)[0]
    pre = prepare_case(case, meta).pre  # the model's own preprocessing, as segment runs it
    boxes = slice_boxes(pre.mask)
    exact_model = copy.deepcopy(model).double().eval()
    # Two slice sizes: the largest size that two boxes share (one batch of 2; boxes come
    # sorted by size) and a box of another size (a batch of 1).
    pair = next([a, b] for a, b in zip(boxes, boxes[1:]) if (a.sx, a.sy) == (b.sx, b.sy))
    other = next(b for b in boxes if (b.sx, b.sy) != (pair[0].sx, pair[0].sy))
    for batch in (pair, [other]):
        # The reference: PyTorch's whole-slice dense logits (plain engine), cropped to the box.
        slices = np.stack([pre.image[..., b.z] for b in batch])  # [b, 4, X, Y]
        want = np.stack([_plain_dense(model, slices[i:i + 1])[0, :, b.x0:b.x0 + b.sx,
                                                                 b.y0:b.y0 + b.sy]
                         for i, b in enumerate(batch)])
        # onnxruntime: the box with the metadata's margin, zeros outside the volume.
        padded = _padded(slices, props)
        rf = int(props["receptive_field"])
        x = np.stack([padded[i, :, b.x0:b.x0 + b.sx + rf - 1, b.y0:b.y0 + b.sy + rf - 1]
                      for i, b in enumerate(batch)])
        got = session.run(["logits"], {"image": np.ascontiguousarray(x)})[0]
        assert got.shape == want.shape == (len(batch), 5, batch[0].sx, batch[0].sy)
        err = np.abs(got - want).max()
        scale = np.abs(want).max()
        # Both sides are direct fp32 convolutions summed in different orders: 1.5e-5 apart on
        # an AVX-512 Xeon (logits up to 34), but oneDNN's fp32 on an AVX2-only Zen 3 is itself
        # up to ~5e-4 off the exact logits. So the whole box is held to 1e-3 (a wrong margin or
        # layout is O(1)) and the 1e-4 is checked against exact float64 logits below.
        assert err < 1e-3 * max(1.0, scale / 20), \
            f"{name} {x.shape}: max |onnxruntime - torch| = {err:.2e} (logits up to {scale:.1f})"
        for i, b in enumerate(batch):  # a 32 x 32 window at the box's centre, in float64
            u, v = b.sx // 2 - 16, b.sy // 2 - 16
            window = padded[i:i + 1, :, b.x0 + u:b.x0 + u + 32 + rf - 1,
                            b.y0 + v:b.y0 + v + 32 + rf - 1]
            with fastconv.options(mode="plain"), torch.no_grad():
                exact = exact_model(torch.from_numpy(window.astype(np.float64)))[0].numpy()
            near = got[i, :, u:u + 32, v:v + 32]
            w_err = np.abs(near - exact).max()
            assert w_err < 1e-4 * max(1.0, np.abs(exact).max() / 20), \
                f"{name}: max |onnxruntime - exact| = {w_err:.2e} on slice {b.z}"
            p_err = np.abs(torch.softmax(torch.from_numpy(near.astype(np.float64)), 0).numpy()
                           - torch.softmax(torch.from_numpy(exact), 0).numpy()).max()
            assert p_err < 1e-5, f"{name}: max |probabilities onnxruntime - exact| = {p_err:.2e}"
