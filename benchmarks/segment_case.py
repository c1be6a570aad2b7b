"""Seconds per case and peak memory of `tumorseg segment` on real BraTS cases, per model.

    python benchmarks/segment_case.py [--data ../shared/data/brats2018] [--cases 3] [--repeats 3]
                                      [--models two_path input_cascade] [--batch-size 8]

Each model runs in a fresh subprocess, so that its peak RSS (resource.getrusage ru_maxrss:
the process's high-water mark, torch and the model included) is its own. Per case the whole
pipeline of segment.segment_case is timed (load, preprocess, dense inference, post-processing,
write), `--repeats` times; the reported time is the median over repeats of each case, then the
median over cases. Released weights are used when installed; otherwise a freshly built, untrained
model of the same architecture (same cost), flagged "weights": "untrained" in the JSON.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brats2018"


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
    from tumorseg.segment import segment_case

    model, meta, kind = _model(args.worker)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cases = find_cases(args.data)[: args.cases]
    per_case = {}
    with tempfile.TemporaryDirectory() as out:
        for case in cases:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                segment_case(model, meta, case, out, batch_size=args.batch_size)
                times.append(time.perf_counter() - t0)
            per_case[case.case_id] = round(statistics.median(times), 2)
    return {
        "weights": kind,
        "receptive_field": model.receptive_field,
        "seconds_per_case": round(statistics.median(per_case.values()), 2),
        "seconds_by_case": per_case,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_model_load_mb": round(rss_model, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["two_path", "input_cascade"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from tumorseg.datasets import find_cases

    cases = [c.case_id for c in find_cases(args.data)[: args.cases]]
    results = {}
    for name in args.models:
        cmd = [sys.executable, __file__, "--worker", name, "--data", str(args.data),
               "--cases", str(args.cases), "--repeats", str(args.repeats),
               "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{name}: worker failed:\n{proc.stderr}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "benchmark": "segment_case",
        "command": " ".join(["python", "benchmarks/segment_case.py", *sys.argv[1:]]),
        "data": str(args.data.resolve()),
        "cases": cases,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "models": results,
    }, indent=2))


if __name__ == "__main__":
    main()
