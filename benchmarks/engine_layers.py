"""Per-layer timings of every implementation the engine can choose (models.fastconv), and its
choice, at the sizes segmentation and training meet.

    .venv/bin/python benchmarks/engine_layers.py [--threads 2] [--repeats 5]

Inference: a batch of 2 slice boxes of 176 x 192 output pixels (a typical large BraTS axial
brain box), two_path's layers and input_cascade's second-stage global layer (9 input maps).
Training: the release configs' tiles (48 x 48 outputs, batch 4), forward + backward. Each figure
is the median of `--repeats` runs after a warm-up; "chosen" is what the engine's planner picks
for the call site (it measures on a cropped probe, and a candidate must beat the reference by
fastconv.MARGIN). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import torch

from tumorseg.models import fastconv

from _common import machine_meta, median_seconds  # benchmarks/ is on sys.path as a script

# (name, C_in, C_out, kernel, input side offset from the output box) per layer.
CONVS = [("local1 7x7", 4, 128, 7, 32), ("local2 3x3", 64, 128, 3, 22),
         ("global 13x13", 4, 320, 13, 32), ("global 13x13 (cascade, 9 in)", 9, 320, 13, 32),
         ("head 21x21", 224, 5, 21, 20)]
POOLS = [("pool 4x4", 64, 4, 25), ("pool 2x2", 64, 2, 21)]


def _median(fn, repeats: int) -> float:
    return round(median_seconds(fn, repeats), 5)


def _run(fn, args, needs_grad):
    """Forward + backward of fn(*args); args[i] gets a gradient where needs_grad[i]."""
    leaves = [a.detach().clone().requires_grad_(n) for a, n in zip(args, needs_grad)]

    def step():
        y = fn(*leaves)
        y.backward(torch.ones_like(y))
    return step


def measure(out_h: int, out_w: int, batch: int, grad: bool, repeats: int) -> dict:
    rows = {}
    g = torch.Generator().manual_seed(0)
    for name, cin, cout, k, extra in CONVS:
        x = torch.randn(batch, cin, out_h + extra, out_w + extra, generator=g)
        w = torch.randn(cout, cin, k, k, generator=g) * 0.05
        b = torch.randn(cout, generator=g)
        hidden = cin not in (4, 9)  # the first layers' input is data: no gradient
        ffts = ["fft"] if grad else ["fft", "fft_h"]  # fft_h: inference only
        names = ["direct"] + (["native"] if grad else []) + (ffts if k >= 7 else []) + \
            ["direct_bf16", "bf16_cl"]
        times = {}
        for n in names:
            fn = fastconv.CONV_CANDIDATES[n]
            if grad:
                times[n] = _median(_run(fn, (x, w, b), (hidden, True, True)), repeats)
            else:
                with torch.no_grad():
                    times[n] = _median(lambda fn=fn: fn(x, w, b), repeats)
        xr = x.requires_grad_(grad and hidden)
        wr = torch.nn.Parameter(w) if grad else w
        with fastconv.options(precision="fp32"):
            if grad:
                fastconv.conv2d(xr, wr, b)
            else:
                with torch.no_grad():
                    fastconv.conv2d(xr, wr, b)
        key = [k_ for k_ in fastconv.planner.choices if f"conv|{tuple(w.shape)}" in k_
               and ("|grad|" in k_) == grad]
        rows[name] = {"seconds": times,
                      "chosen_fp32": fastconv.planner.choices[key[-1]] if key else "direct"}
    for name, c, k, extra in POOLS:
        x = torch.randn(batch, c, out_h + extra, out_w + extra, generator=g)
        times = {}
        for n, fn in fastconv.POOL_CANDIDATES.items():
            if grad:
                times[n] = _median(_run(lambda t, fn=fn: fn(t, k), (x,), (True,)), repeats)
            else:
                times[n] = _median(lambda fn=fn: fn(x, k), repeats)
        rows[name] = {"seconds": times}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fastconv.planner = fastconv.Planner(path="")  # fresh choices, in memory only
    result = {
        "inference_2x176x192": measure(176, 192, 2, False, args.repeats),
        "training_4x48x48": measure(48, 48, 4, True, args.repeats),
        "_meta": machine_meta("median seconds per call; inference without autograd, training "
                              "forward + backward; direct_bf16 and bf16_cl only run with "
                              "--precision bf16"),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
