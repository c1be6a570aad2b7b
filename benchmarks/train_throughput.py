"""Training throughput in patch-equivalents per second: the fast engine vs the plain path on
the release configs' dense tiles, and single patches (T = 1) vs dense tiles.

    .venv/bin/python benchmarks/train_throughput.py [--models two_path input_cascade]
        [--tile 48] [--tile-batch 4] [--patch-batch 128] [--steps 3] [--threads 0]
        [--engine-steps 7] [--no-patches] [--variants] [--bf16]

Engine comparison (the issue's "new vs old in one run"): the release configs' phase 1 (tiles of
48, batches of 4, dropout 0.3, SGD with momentum) stepped with the plain engine
(direct fp32 convolutions with the fast backward, NCHW pooling, amax maxout, dropout of the
concatenated features: the path before models.fastconv), then with the default engine, from the same
seed; median of `--engine-steps` steps each after a warm-up, plus phase 2 (output layer only).

A patch-equivalent is one output pixel that carries loss: a T x T tile counts T^2, as its
gradient equals the sum of its T^2 patches' gradients (tests/test_train.py). One step is what
train.py does per step: forward, per-pixel weighted cross-entropy, backward, SGD with momentum
(phase 1: every trainable layer; a cascade's first stage is frozen). Inputs are random tensors
of the tile's size with random labels and uniform weights, so data loading is not timed (the
sampler's cost is small next to the network's). Median of `--steps` steps after one warm-up.
`--variants` also times two_path (one tile per step, one timed step) with a tile twice as
large, channels_last memory format and mkldnn off, to see what speeds dense tiles up.
`--bf16` also steps the default engine with `precision = "bf16"` (a training config key) from
the same seed, and reports its time and its losses' largest relative difference from fp32.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from tumorseg.models import build_model, fastconv

from _common import machine_meta  # benchmarks/ is on sys.path when run as a script


def bench(name: str, tile: int, batch: int, steps: int, channels_last: bool = False,
          seed: int = 0, engine: str = "auto", output_layer_only: bool = False,
          precision: str = "fp32") -> dict:
    torch.manual_seed(seed)
    model = build_model(name, init="default", dropout=0.3).train()
    rf = model.receptive_field
    if output_layer_only:
        model.requires_grad_(False)
        model.output_layer().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    size = tile + rf - 1
    x = torch.randn(batch, 4, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch, tile, tile))
    w = torch.full((batch, tile, tile), 1.0 / (batch * tile * tile))

    losses = []

    def step():
        loss = (F.cross_entropy(model(x), y, reduction="none") * w).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    with fastconv.options(mode=engine, precision=precision):
        step()  # warm-up (and the engine's measurements)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    s = sorted(times)[len(times) // 2]
    return {"tile": tile, "batch": batch, "input": size, "s_per_step": round(s, 4),
            "patch_equivalents_per_step": batch * tile * tile,
            "patch_equivalents_per_s": round(batch * tile * tile / s, 1), "losses": losses}


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    return float(f"{max(abs(x - y) / abs(x) for x, y in zip(a, b)):.2e}")


def engine_comparison(name: str, tile: int, batch: int, steps: int, bf16: bool = False) -> dict:
    """Plain vs default engine, same seed and data; phase 1 and phase 2 (output layer only);
    with `bf16`, the default engine in bfloat16 too."""
    out = {}
    for phase, only_head in (("phase1", False), ("phase2", True)):
        plain = bench(name, tile, batch, steps, engine="plain", output_layer_only=only_head)
        new = bench(name, tile, batch, steps, engine="auto", output_layer_only=only_head)
        out[phase] = {"plain_s_per_step": plain["s_per_step"], "new_s_per_step": new["s_per_step"],
                      "speedup": round(plain["s_per_step"] / new["s_per_step"], 2),
                      "max_rel_loss_diff": _max_rel_diff(plain["losses"], new["losses"])}
        if bf16:
            half = bench(name, tile, batch, steps, output_layer_only=only_head, precision="bf16")
            out[phase].update(bf16_s_per_step=half["s_per_step"],
                              bf16_speedup_over_new=round(
                                  new["s_per_step"] / half["s_per_step"], 2),
                              bf16_max_rel_loss_diff=_max_rel_diff(new["losses"], half["losses"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["two_path", "input_cascade"])
    p.add_argument("--tile", type=int, default=48, help="dense tile T")
    p.add_argument("--tile-batch", type=int, default=4, help="tiles per step")
    p.add_argument("--patch-batch", type=int, default=128,
                   help="patches per step (the paper's 128)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--engine-steps", type=int, default=7, help="timed steps per engine")
    p.add_argument("--no-patches", action="store_true", help="skip the single-patch baseline")
    p.add_argument("--bf16", action="store_true", help="also time training in bfloat16")
    p.add_argument("--variants", action="store_true",
                   help="also time two_path with larger tiles, channels_last and mkldnn off")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fastconv.reuse_freed_memory()  # as train() does
    results: dict = {}
    for name in args.models:
        results[name] = {"engine": engine_comparison(name, args.tile, args.tile_batch,
                                                     args.engine_steps, args.bf16)}
        if args.no_patches:
            continue
        patch = bench(name, 1, args.patch_batch, args.steps)
        dense = bench(name, args.tile, args.tile_batch, args.steps)
        patch.pop("losses"), dense.pop("losses")
        results[name].update(patch=patch, dense=dense,
                             ratio=round(dense["patch_equivalents_per_s"]
                                         / patch["patch_equivalents_per_s"], 1))
    if args.variants:  # one tile per step and one timed step each, to keep the run short
        base = results.get("two_path", {}).get("patch") \
            or bench("two_path", 1, args.patch_batch, args.steps)
        t = args.tile
        v = {f"tile{t}_batch1": bench("two_path", t, 1, 1),
             f"tile{2 * t}_batch1": bench("two_path", 2 * t, 1, 1),
             f"tile{t}_batch1_channels_last": bench("two_path", t, 1, 1, channels_last=True)}
        torch.backends.mkldnn.enabled = False
        v[f"tile{t}_batch1_mkldnn_off"] = bench("two_path", t, 1, 1)
        torch.backends.mkldnn.enabled = True
        for r in v.values():
            r.pop("losses")
            r["ratio_vs_patch"] = round(r["patch_equivalents_per_s"]
                                        / base["patch_equivalents_per_s"], 1)
        results["two_path_variants"] = v
    results["_meta"] = machine_meta(
        "patch-equivalents = output pixels with loss per SGD step (forward, weighted"
        " cross-entropy, backward, update); random inputs; untrained models; float32")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
