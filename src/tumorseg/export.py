"""ONNX export of the dense network, for running a tumorseg model outside PyTorch.

The exported graph is what `models.dense_logits` runs after padding, and what inference runs on
each slice box (`infer.predict_labels`):

    image  [batch, 4, height, width] float32: an axial slice (or a box of it) of a preprocessed
           case (channels in `datasets.MODALITIES` order: T1, T1c, T2, FLAIR), zero-padded by
           the receptive-field margin: `padding` = (before, after) pixels on each axis
           (`models.dense_padding`), zeros outside the volume
    logits [batch, 5, height - rf + 1, width - rf + 1] float32: pre-softmax scores of the
           canonical classes (`labels.CLASS_NAMES`); pixel (i, j) is the box's pixel (i, j)

Batch, height and width are dynamic (height, width >= the receptive field). A cascade is one
graph holding both stages (the joint forward, `Cascade.forward`). Softmax, class weights,
mirror TTA, the brain mask and post-processing are not in the graph: a user applies them as
`segment` does. The graph is traced through the plain engine (`fastconv` mode "plain"), so it
holds standard Conv, MaxPool, ReduceMax (maxout) and Softmax (cascades) operators.

What a user needs to reproduce `tumorseg segment` around it is in the model's metadata_props
(`METADATA_KEYS`; structured values are JSON): the preprocessing settings, the model space
(orientation, spacing), the channel order, the canonical class names, the training label
convention (canonical class -> file value), the receptive field and padding, the
post-processing settings, the model's name and the tumorseg version.

onnx, onnxscript (torch's exporter) and onnxruntime (the check after export) are an optional
extra: `pip install tumorseg[onnx]`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from tumorseg.errors import TumorsegInputError
from tumorseg.models import Cascade, dense_padding, fastconv

OPSET = 18  # torch's own ONNX function library is written for 18: no version conversion
INPUT_NAME, OUTPUT_NAME = "image", "logits"
METADATA_KEYS = ("tumorseg_version", "model", "architecture", "input", "output", "modalities",
                 "receptive_field", "padding", "classes", "convention", "preprocess",
                 "geometry", "postprocess")
EXTRA = "pip install tumorseg[onnx]"


def require(*names: str) -> list[ModuleType]:
    """Import the optional ONNX packages (e.g. "onnx", "onnxruntime"); a one-line input error
    naming the extra when one is missing."""
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            raise TumorsegInputError(None, f"ONNX export needs the optional package {name!r}: "
                                           f"{EXTRA}") from None
    return modules


def metadata(model: torch.nn.Module, meta: dict) -> dict[str, str]:
    """The metadata_props written with a model: {key: string}, keys `METADATA_KEYS`.

    meta: the model file's metadata (`weights.resolve_model` / `checkpoint.load_model`); it
    must hold the preprocessing settings and the label convention, as files written by
    `tumorseg train` do.
    """
    import tumorseg
    from tumorseg.datasets import MODALITIES
    from tumorseg.geometry import ModelSpace
    from tumorseg.labels import CLASS_NAMES, get_convention
    from tumorseg.postprocess import PostprocessConfig
    from tumorseg.preprocess import PreprocessSettings

    where = meta.get("path")
    missing = [k for k in ("preprocess", "convention") if k not in meta]
    if missing:
        raise TumorsegInputError(where, f"the model file holds no {' or '.join(missing)} "
                                        "settings: was it written by tumorseg train?")
    rf = int(model.receptive_field)
    before, after = dense_padding(rf)
    conv = get_convention(meta["convention"])
    classes = list(CLASS_NAMES)
    props = {
        "tumorseg_version": tumorseg.__version__,
        "model": str(meta.get("released") or meta.get("model")),
        "architecture": str(meta.get("model", type(model).__name__)),
        "input": f"{INPUT_NAME} [batch, {len(MODALITIES)}, height, width] float32: a "
                 "preprocessed axial slice box zero-padded by `padding` (before, after) "
                 f"pixels on each axis; height, width >= {rf}",
        "output": f"{OUTPUT_NAME} [batch, {len(classes)}, height - {rf - 1}, width - {rf - 1}] "
                  "float32: pre-softmax scores of `classes` (canonical) at each pixel of the box",
        "modalities": json.dumps(list(MODALITIES)),
        "receptive_field": str(rf),
        "padding": json.dumps({"before": before, "after": after}),
        "classes": json.dumps(classes),
        "convention": json.dumps({
            "name": conv.name,
            "from_canonical": {str(k): v for k, v in sorted(conv.from_canonical.items())},
            "values": {str(k): v for k, v in sorted(conv.values.items())}}),
        "preprocess": json.dumps(PreprocessSettings.from_dict(meta["preprocess"]).to_dict()),
        "geometry": json.dumps(ModelSpace.from_meta(meta).to_dict()),
        "postprocess": json.dumps(PostprocessConfig.from_meta(meta).to_dict()),
    }
    return props


def _example(model: torch.nn.Module, batch: int, extra: tuple[int, int], seed: int
             ) -> torch.Tensor:
    """A z-score-like input [batch, 4, rf + extra[0], rf + extra[1]]."""
    rf = model.receptive_field
    channels = model.first.cfg.in_channels if isinstance(model, Cascade) else model.cfg.in_channels
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, rf + extra[0], rf + extra[1], generator=gen)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence what torch's exporter says about itself (absent torchvision ops, its own
    deprecations): noise on a user's terminal. Errors still raise."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        log.setLevel(level)


def to_onnx(model: torch.nn.Module, opset: int = OPSET):
    """The dense network as an onnx.ModelProto (no metadata) with dynamic batch, height and
    width, traced in eval mode through the plain engine (direct fp32 convolutions)."""
    require("onnx", "onnxscript")
    if "dynamic_shapes" not in inspect.signature(torch.onnx.export).parameters:
        raise TumorsegInputError(None, f"ONNX export needs torch >= 2.5 (this is "
                                       f"{torch.__version__})")
    was_training = model.training
    model.eval()
    # Distinct example sides (not 0 or 1, which torch.export would specialise on), so that no
    # axis is fixed by coincidence.
    x = _example(model, 2, (7, 12), seed=0)
    dims = {0: torch.export.Dim("batch"),
            2: torch.export.Dim("height", min=model.receptive_field),
            3: torch.export.Dim("width", min=model.receptive_field)}
    try:
        with fastconv.options(mode="plain"), torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=(dims,), verbose=False,
                                        external_data=False)
    finally:
        model.train(was_training)
    return program.model_proto


def check(path: str | Path, model: torch.nn.Module, batch: int = 1,
          extra: tuple[int, int] = (21, 10)) -> dict:
    """Run an exported file in onnxruntime and the model in PyTorch (plain engine) on one
    deterministic input of another size than the export's example (so the axes are dynamic):
    {"max_abs_diff", "max_abs_logit"} of the logits."""
    (ort,) = require("onnxruntime")
    x = _example(model, batch, extra, seed=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    was_training = model.training
    model.eval()
    try:
        with fastconv.options(mode="plain"), torch.no_grad():
            want = model(x).numpy()
    finally:
        model.train(was_training)
    if got.shape != want.shape:
        raise RuntimeError(f"{path}: onnxruntime gave logits {got.shape}, PyTorch {want.shape}")
    return {"max_abs_diff": float(np.abs(got - want).max()),
            "max_abs_logit": float(np.abs(want).max())}


def export_onnx(model: torch.nn.Module, meta: dict, path: str | Path, opset: int = OPSET,
                verify: bool = True) -> dict:
    """Write `model`'s dense network to the ONNX file `path` (atomically), with `metadata`.

    model: a TwoPathCNN or Cascade (as `weights.resolve_model` returns it); meta: its model
    file's metadata. Input `image` [batch, 4, height, width] float32 (a slice box padded by
    the receptive-field margin), output `logits` [batch, 5, height - rf + 1, width - rf + 1];
    see the module docstring. verify: run the written file in onnxruntime against PyTorch
    (`check`) and fail if the logits differ by more than 1e-4 per 20 of logit range.

    Returns {"path", "metadata", "bytes", and with verify "max_abs_diff", "max_abs_logit"}.
    """
    from tumorseg.io import atomic_write

    path = Path(path)
    if path.is_dir():
        raise TumorsegInputError(path, "is a folder; give a file name such as model.onnx")
    props = metadata(model, meta)  # input errors before the (slow) trace
    onnx, *_ = require("onnx", "onnxscript", *(["onnxruntime"] if verify else []))
    proto = to_onnx(model, opset)
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = (f"tumorseg {props['model']} ({props['architecture']}): dense logits of "
                        "the Havaei et al. (2017) CNN; see metadata_props")
    onnx.checker.check_model(proto)
    with atomic_write(path) as tmp:
        onnx.save_model(proto, str(tmp))
        result: dict = {"path": str(path), "metadata": props, "bytes": tmp.stat().st_size}
        if verify:  # before the rename: a wrong graph never lands under the final name
            result.update(check(tmp, model))
            bound = 1e-4 * max(1.0, result["max_abs_logit"] / 20)
            if not result["max_abs_diff"] <= bound:
                raise RuntimeError(f"{path}: onnxruntime's logits differ from PyTorch's by "
                                   f"{result['max_abs_diff']:.2e} (> {bound:.2e})")
    return result
