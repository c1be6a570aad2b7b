"""Record this CPU's inference choices into the plans tumorseg ships (engine_plans.json).

Runs `tumorseg segment` on real cases with a fresh plan file for each released model and
precision, keeps the inference call sites (`|nograd|` keys) and replaces this machine's entry
in src/tumorseg/models/engine_plans.json (`--merge`: adds to it, the new measurements winning
where both hold a call site). Run it on quiet cores (nothing else running): the
choices are timings. A first `tumorseg segment` on a CPU found there then skips measuring.

    python scripts/record_engine_plan.py --cases ../shared/data/brats2018/Brats18_2013_11_1 \
        ../shared/data/brats2018/Brats18_CBICA_AQN_1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tumorseg.io import atomic_write
from tumorseg.models import fastconv


def record(cases: list[str], models: list[str], precisions: list[str], threads: int) -> dict:
    """{plan key: choice} of the inference call sites met segmenting `cases` with each model
    and precision, each combination measured from a fresh plan file."""
    choices: dict[str, str] = {}
    machine = None
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for precision in precisions:
                plan = Path(tmp) / f"plan-{model}-{precision}.json"
                env = {**os.environ, "TUMORSEG_ENGINE_PLAN": str(plan)}
                for case in cases:
                    cmd = [sys.executable, "-m", "tumorseg.cli", "segment", "-i", case,
                           "-o", str(Path(tmp) / "out"), "--model", model, "--precision",
                           precision, "--threads", str(threads), "--no-progress"]
                    print(" ".join(cmd[2:]), flush=True)
                    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                for machine, keys in json.loads(plan.read_text()).items():
                    choices.update({k: v for k, v in keys.items() if "|nograd|" in k})
    if machine is None:
        raise SystemExit("no plan was written")
    return {machine: dict(sorted(choices.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", required=True, help="case folders")
    ap.add_argument("--models", nargs="+", default=["two_path", "input_cascade"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=fastconv.SHIPPED_PLANS)
    ap.add_argument("--merge", action="store_true",
                    help="keep this machine's recorded choices that these runs did not meet")
    args = ap.parse_args(argv)
    recorded = record(args.cases, args.models, args.precisions, args.threads)
    plans = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for machine, keys in recorded.items():
        plans[machine] = {**plans.get(machine, {}), **keys} if args.merge else keys
    with atomic_write(args.out) as tmp:
        tmp.write_text(json.dumps(plans, indent=1, sort_keys=True) + "\n")
    for machine in recorded:
        print(f"{args.out}: {len(plans[machine])} choices for {machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
