"""Seconds per case, per stage, and peak memory of `tumorseg segment` on real BraTS cases.

    python benchmarks/segment_case.py [--data ../shared/data/brats2018] [--cases 1] [--repeats 3]
        [--models two_path input_cascade ...] [--control-repeats 1] [--batch 0] [--threads 2]

For each model, three variants run side by side in one invocation, each in a fresh subprocess
(so that its peak RSS, resource.getrusage ru_maxrss, is its own):
- "control": the plain engine (direct fp32 convolutions, NCHW pooling) on whole slices: what
  segmentation did before models.fastconv and the per-slice brain boxes;
- "fp32": the default (engine auto, fp32, per-slice boxes);
- "bf16": `--precision bf16`.
Per case the whole pipeline of segment.segment_case is timed (read, preprocess without N4,
infer, post-process, write: the JSON gives each stage), `--repeats` times (`--control-repeats`
for the slow control); the reported time is the median over repeats of each case, then over
cases. The engine's choices are measured in a warm-up case (not timed) and kept in a plan file
in a temporary folder, as a user's second run would find them. Released weights are used when
installed; otherwise an untrained model of the same architecture (same cost), flagged
"weights": "untrained". With `--batch N`, the default variant also segments N cases with
segment_cases (prefetch on, then off) and reports wall seconds per case against the inference
seconds per case. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_meta  # benchmarks/ is on sys.path when run as a script

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brats2018"
MODELS = ["two_path", "input_cascade", "local_path", "global_path", "local_cascade", "mf_cascade"]
VARIANTS = {"control": {"engine": "plain", "crop_slices": False},
            "fp32": {},
            "bf16": {"precision": "bf16"}}


def _model(name: str):
    from tumorseg import weights
    from tumorseg.errors import TumorsegInputError
    from tumorseg.models import build_model
    from tumorseg.preprocess import PreprocessSettings

    try:
        model, meta = weights.resolve_model(name)
        return model, meta, "released"
    except TumorsegInputError:
        model = build_model(name).eval()
        return model, {"model": name, "preprocess": PreprocessSettings().to_dict()}, "untrained"


def worker(args) -> dict:
    import torch

    from tumorseg.datasets import find_cases
    from tumorseg.models import fastconv
    from tumorseg.segment import SegmentOptions, segment_case, segment_cases

    torch.set_num_threads(args.threads)
    fastconv.reuse_freed_memory()  # as segment_cases (and so the CLI) does
    model, meta, kind = _model(args.worker)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    options = SegmentOptions(**VARIANTS[args.variant])
    all_cases = find_cases(args.data)
    cases = all_cases[: args.cases]
    warm = all_cases[-1]  # the engine measures its choices here, untimed
    per_case, stages = {}, {}
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        segment_case(model, meta, warm, tmp, options)
        fastconv.release_freed_memory()
        for case in cases:
            times, runs = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = segment_case(model, meta, case, tmp, options)
                times.append(time.perf_counter() - t0)
                fastconv.release_freed_memory()  # as segment_cases does between cases
                runs.append(res["stages"])
            per_case[case.case_id] = round(statistics.median(times), 2)
            stages[case.case_id] = {k: round(statistics.median(r[k] for r in runs), 2)
                                    for k in runs[0]}
        if args.batch:
            batch = all_cases[: args.batch]
            for prefetch in (True, False):
                opts = SegmentOptions(**VARIANTS[args.variant], prefetch=prefetch)
                t0 = time.perf_counter()
                results, _ = segment_cases((model, meta), batch, Path(tmp) / f"b{prefetch}", opts)
                wall = time.perf_counter() - t0
                out[f"batch_prefetch_{'on' if prefetch else 'off'}"] = {
                    "cases": len(batch), "wall_s_per_case": round(wall / len(batch), 2),
                    "infer_s_per_case": round(statistics.mean(
                        r["stages"]["infer"] for r in results), 2)}
    return {
        "weights": kind,
        "receptive_field": model.receptive_field,
        "seconds_per_case": round(statistics.median(per_case.values()), 2),
        "seconds_by_case": per_case,
        "stages_by_case": stages,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_model_load_mb": round(rss_model, 1),
        "torch_threads": torch.get_num_threads(),
        **out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--control-repeats", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=0, help="also time N cases as a batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    results: dict = {}
    with tempfile.TemporaryDirectory() as plan_dir:
        env = {**os.environ, "TUMORSEG_ENGINE_PLAN": str(Path(plan_dir) / "plan.json")}
        for name in args.models:
            results[name] = {}
            for variant in args.variants:
                repeats = args.control_repeats if variant == "control" else args.repeats
                cmd = [sys.executable, __file__, "--worker", name, "--variant", variant,
                       "--data", str(args.data), "--cases", str(args.cases),
                       "--repeats", str(repeats), "--threads", str(args.threads),
                       "--batch", str(args.batch if variant == "fp32" and name == args.models[0]
                                      else 0)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{name}/{variant}: worker failed:\n{proc.stderr}")
                results[name][variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[name]
            if "control" in r and "fp32" in r:
                r["speedup_fp32_vs_control"] = round(
                    r["control"]["seconds_per_case"] / r["fp32"]["seconds_per_case"], 2)
            if "control" in r and "bf16" in r:
                r["speedup_bf16_vs_control"] = round(
                    r["control"]["seconds_per_case"] / r["bf16"]["seconds_per_case"], 2)
    print(json.dumps({
        "benchmark": "segment_case",
        "command": " ".join(["python", "benchmarks/segment_case.py", *sys.argv[1:]]),
        "data": str(args.data.resolve()),
        "cases": args.cases, "repeats": args.repeats, "control_repeats": args.control_repeats,
        "models": results,
        "_meta": machine_meta("median seconds per case of segment_case (read, preprocess, "
                              "infer, post-process, write); control = plain engine on whole "
                              "slices"),
    }, indent=1))


if __name__ == "__main__":
    main()
