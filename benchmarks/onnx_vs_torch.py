"""onnxruntime vs the torch engine on the dense forward of one real case's slice boxes.

    .venv/bin/python benchmarks/onnx_vs_torch.py [--models two_path] [--case 0] [--every 8]
        [--repeats 3] [--threads 2] [--data ../shared/data/brats2018]

Released weights. The case is preprocessed as `segment` does (segment.prepare_case); its slice
boxes (infer.slice_boxes: each axial slice's brain box plus the receptive-field margin) are cut
into batches of equal-size boxes (infer.BATCH_SIZE) as `segment` batches them; every
`--every`-th batch is kept (from the largest boxes to the smallest) so that a run stays short. One pass = the network's forward on every
batch (logits only: softmax, argmax and the cascade's stage-by-stage schedule are left out, the
same for both). The torch side is the engine in "auto" mode (as `segment` runs it: layers
chosen by measurement, freed memory reused); the onnxruntime side is the file `tumorseg export`
writes, on the CPU provider with `--threads` intra-op threads. The passes alternate (torch,
onnxruntime, torch, ...) after one warm-up pass each, so that load from other processes falls
on both alike; medians of `--repeats`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from tumorseg import weights
from tumorseg.datasets import find_cases
from tumorseg.export import export_onnx
from tumorseg.infer import BATCH_SIZE, _box_batches, _window, slice_boxes
from tumorseg.models import fastconv
from tumorseg.segment import prepare_case

from _common import machine_meta  # benchmarks/ is on sys.path as a script

REPO = Path(__file__).resolve().parents[1]


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def bench(name: str, case_index: int, data: Path, every: int, repeats: int, threads: int,
          workdir: Path) -> dict:
    model, meta = weights.resolve_model(name)
    rf = model.receptive_field
    path = workdir / f"{name}.onnx"
    export_s = _seconds(lambda: export_onnx(model, meta, path, verify=False))
    case = find_cases(data)[case_index]
    pre = prepare_case(case, meta).pre
    boxes = slice_boxes(pre.mask)
    kept = list(_box_batches(boxes, BATCH_SIZE))[::every]
    inputs = [_window(pre.image, batch, rf) for batch in kept]
    arrays = [x.numpy() for x in inputs]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def torch_pass() -> list[torch.Tensor]:
        return [model(x) for x in inputs]

    def ort_pass() -> list[np.ndarray]:
        return [session.run(["logits"], {"image": a})[0] for a in arrays]

    # Warm-up (the engine measures its choices on first calls); agreement of the two outputs.
    t_out, o_out = torch_pass(), ort_pass()
    diff = max(float(np.abs(t.numpy() - o).max()) for t, o in zip(t_out, o_out))
    agree = np.mean(np.concatenate([(t.numpy().argmax(1) == o.argmax(1)).ravel()
                                    for t, o in zip(t_out, o_out)]))
    del t_out, o_out
    t_torch, t_ort = [], []
    for _ in range(repeats):
        t_torch.append(_seconds(torch_pass))
        t_ort.append(_seconds(ort_pass))
    med_torch, med_ort = float(np.median(t_torch)), float(np.median(t_ort))
    pixels = sum(int(np.prod(x.shape[-2:])) * x.shape[0] for x in inputs)
    return {"case": case.case_id, "receptive_field": rf, "boxes_total": len(boxes),
            "boxes_timed": sum(map(len, kept)), "batches": len(inputs), "input_pixels": pixels,
            "export_s": round(export_s, 2),
            "torch_auto_s": round(med_torch, 3), "onnxruntime_s": round(med_ort, 3),
            "onnxruntime_over_torch": round(med_ort / med_torch, 2),
            "torch_auto_runs_s": [round(t, 3) for t in t_torch],
            "onnxruntime_runs_s": [round(t, 3) for t in t_ort],
            "max_abs_logit_diff": diff, "argmax_agreement": float(agree)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["two_path"])
    p.add_argument("--case", type=int, default=0, help="index in find_cases(--data)")
    p.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "brats2018")
    p.add_argument("--every", type=int, default=8, help="time every N-th batch of boxes")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per side (median of)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fastconv.reuse_freed_memory()  # as segment does
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: bench(name, args.case, args.data.resolve(), args.every, args.repeats,
                               args.threads, Path(tmp)) for name in args.models}
    print(json.dumps({"meta": machine_meta(
        "dense forward of slice-box batches; torch engine auto vs onnxruntime CPU, alternating "
        "passes"), "onnxruntime": ort.__version__, "wall_s": round(time.perf_counter() - t0, 1),
        "results": results}, indent=1))


if __name__ == "__main__":
    main()
