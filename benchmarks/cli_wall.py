"""Wall-clock seconds of `tumorseg segment` as a user runs it: a new process, Python start-up,
imports, the engine plan already on disk, read, preprocess, infer, post-process, write.

    python benchmarks/cli_wall.py [--data ../shared/data/brats2018] [--case Brats18_2013_3_1]
        [--model two_path] [--rounds 3] [--idle 25] [--baseline REF] [--threads 2]
        [--first-touch] [--fresh-plan | --new-home]

Each run waits `--idle` seconds first: the project's virtual machines hand freed memory back to
the host, and a process that starts after a pause pays for touching its memory afresh (see
--first-touch). With `--baseline REF` (a git revision) the same command of that revision runs
too, alternating with the working tree's, round by round (the machines are noisy: compare the
two in one run, not across runs); the label maps of the two must be identical. `--first-touch`
also times the first touch of a 512 MB numpy array in new processes, with and without numpy's
transparent huge pages. `--fresh-plan` gives each tree a new engine plan file every round and
runs it twice: "first" (the engine measures its choices, as on a new machine) and "warm" (the
plan it just wrote on disk); the spread of "warm" across rounds shows how much the choices
measured in a first run cost later runs. `--new-home` does the same with a new, empty HOME
each round and no TUMORSEG_ENGINE_PLAN: a new user's first run, which reads the plans tumorseg
ships (src/tumorseg/models/engine_plans.json) if this CPU is among them. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_meta  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "brats2018"

RUN = ("import sys, tumorseg; assert tumorseg.__file__.startswith(sys.argv[1]), tumorseg.__file__;"
       "from tumorseg.cli import main; sys.exit(main(sys.argv[2:]))")
TOUCH = ("import sys, time, numpy as np; from numpy._core.multiarray import _set_madvise_hugepage;"
         "_set_madvise_hugepage(sys.argv[1] == '1'); t = time.perf_counter();"
         "a = np.empty(512 << 20, np.uint8); a[::4096] = 1; print(time.perf_counter() - t)")


def _run(src: Path, args: argparse.Namespace, out: Path, env: dict) -> float:
    """Seconds of one `tumorseg segment` of args.case with the package in `src`."""
    cmd = [sys.executable, "-c", RUN, str(src), "segment", "-i", str(args.data / args.case),
           "-o", str(out), "--model", args.model, "--no-progress", "--threads", str(args.threads)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**env, "PYTHONPATH": str(src)}, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{src}: tumorseg segment failed: {done.stderr.strip()[-500:]}")
    return seconds


def _digest(folder: Path) -> str:
    files = sorted(folder.glob("*.nii*")) + sorted(folder.glob("*.mha"))
    return hashlib.md5(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def _first_touch(idle: float, rounds: int) -> dict:
    times: dict[str, list[float]] = {"huge_pages": [], "4k_pages": []}
    for _ in range(rounds):
        for name, flag in (("huge_pages", "1"), ("4k_pages", "0")):
            time.sleep(idle)
            out = subprocess.run([sys.executable, "-c", TOUCH, flag], capture_output=True,
                                 text=True, check=True)
            times[name].append(round(float(out.stdout), 3))
    return {"seconds_512MB": times,
            "median": {k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--case", default="Brats18_2013_3_1")
    parser.add_argument("--model", default="two_path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=25.0)
    parser.add_argument("--baseline", help="git revision to run alternately as the control")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--first-touch", action="store_true")
    plans = parser.add_mutually_exclusive_group()
    plans.add_argument("--fresh-plan", action="store_true")
    plans.add_argument("--new-home", action="store_true")
    args = parser.parse_args()
    staged = args.fresh_plan or args.new_home
    if not (args.data / args.case).is_dir():
        raise SystemExit(f"{args.data / args.case}: no such case folder")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"current": ROOT / "src"}
        if args.baseline:
            worktree = tmp / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                            str(worktree), args.baseline], check=True)
            trees = {"baseline": worktree / "src", **trees}
        try:
            runs = [(name, "") for name in trees] if not staged else \
                [(name, stage) for name in trees for stage in ("first", "warm")]
            seconds: dict[str, list[float]] = {name + stage: [] for name, stage in runs}
            digests = {}
            for r in range(args.rounds):
                for name, stage in runs:
                    if args.fresh_plan:
                        env["TUMORSEG_ENGINE_PLAN"] = str(tmp / f"plan-{name}-{r}.json")
                    elif args.new_home:
                        env.pop("TUMORSEG_ENGINE_PLAN", None)
                        env["HOME"] = str(tmp / f"home-{name}-{r}")
                        Path(env["HOME"]).mkdir(exist_ok=True)
                    time.sleep(args.idle)
                    out = tmp / f"out-{name}"
                    seconds[name + stage].append(round(_run(trees[name], args, out, env), 3))
                    digests[name] = _digest(out)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tmp / "baseline")], check=False)
    result = {
        "meta": machine_meta(f"tumorseg segment of {args.case}, a new process per run, "
                             f"{args.idle:g} s idle before each"),
        "model": args.model, "case": args.case, "seconds": seconds,
        "median": {k: statistics.median(v) for k, v in seconds.items()},
        "labels_md5": digests,
    }
    if args.baseline:
        result["baseline"] = args.baseline
        for stage in ("", "first", "warm") if staged else ("",):
            if "baseline" + stage in seconds:
                result["ratio_baseline_over_current" + (f"_{stage}" if stage else "")] = round(
                    result["median"]["baseline" + stage] / result["median"]["current" + stage], 3)
        result["identical_labels"] = digests["baseline"] == digests["current"]
    if args.first_touch:
        result["first_touch"] = _first_touch(args.idle, args.rounds)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
