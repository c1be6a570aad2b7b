"""Time to label one full 240 x 240 slice: patch by patch (batched) vs dense whole-slice.

    .venv/bin/python benchmarks/dense_vs_patch.py [--models two_path input_cascade]
        [--patches 2048] [--cascade-patches 512] [--batch 512] [--repeats 3] [--threads 0]

Untrained models (timing does not depend on the weights), eval mode, no gradients, float32.
Patch mode classifies one rf x rf patch per pixel of the zero-padded slice (what the paper's
patch-wise inference does), in batches of `--batch` patches, patch extraction included. Labelling
all 57,600 patches of a slice takes minutes (input_cascade: tens of minutes), so it is timed on a
random subset of patches and extrapolated linearly to the slice (the cost is linear in the number
of batches); the JSON says so. The dense path is `models.dense_logits` on the whole slice, as
inference uses it. The subset's dense and patch outputs are compared as a sanity check.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from tumorseg.models import build_model, dense_logits, dense_padding

from _common import machine_meta, median_seconds  # benchmarks/ is on sys.path as a script

SLICE = 240


_time = median_seconds


@torch.no_grad()
def bench(name: str, n_patches: int, batch: int, repeats: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_model(name, init="default").eval()
    rf = model.receptive_field
    image = torch.randn(1, 4, SLICE, SLICE)
    before, after = dense_padding(rf)
    padded = F.pad(image[0], (before, after, before, after))  # [4, 240 + rf - 1, ...]

    dense_s = _time(lambda: dense_logits(model, image), repeats)

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randperm(SLICE * SLICE, generator=gen)[:n_patches]
    rows, cols = (pixels // SLICE).tolist(), (pixels % SLICE).tolist()

    def patch_pass(n: int) -> torch.Tensor:
        out = []
        for s in range(0, n, batch):
            e = min(s + batch, n)
            patches = torch.stack([padded[:, i:i + rf, j:j + rf]
                                   for i, j in zip(rows[s:e], cols[s:e])])
            out.append(model(patches)[:, :, 0, 0])  # [b, 5]
        return torch.cat(out)

    patch_pass(min(batch, n_patches))  # warm-up: one batch
    t0 = time.perf_counter()
    patch_out = patch_pass(n_patches)
    subset_s = time.perf_counter() - t0
    patch_s = subset_s * SLICE * SLICE / n_patches
    dense = dense_logits(model, image)[0]
    max_diff = (dense[:, rows, cols].T - patch_out).abs().max().item()
    return {"receptive_field": rf, "dense_s_per_slice": round(dense_s, 4),
            "patch_s_per_slice": round(patch_s, 2), "ratio": round(patch_s / dense_s, 1),
            "patch_extrapolated": True, "patches_timed": n_patches, "patch_batch": batch,
            "patch_s_timed": round(subset_s, 3), "dense_vs_patch_max_abs_diff": max_diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["two_path", "input_cascade"])
    p.add_argument("--patches", type=int, default=2048, help="patches timed (single-stage models)")
    p.add_argument("--cascade-patches", type=int, default=512, help="patches timed (cascades)")
    p.add_argument("--batch", type=int, default=512, help="patches per forward pass")
    p.add_argument("--repeats", type=int, default=3, help="dense timings (median of)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.models:
        n = args.cascade_patches if name.endswith("cascade") else args.patches
        results[name] = bench(name, n, args.batch, args.repeats)
    results["_meta"] = machine_meta(
        "patch_s_per_slice is extrapolated linearly from patches_timed random patches to all"
        " 57600 pixels; untrained models, float32, eval mode, no autograd")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
