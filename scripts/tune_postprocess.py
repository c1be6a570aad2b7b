"""Choose the post-processing thresholds on validation predictions made with --no-postprocess.

    python scripts/tune_postprocess.py --pred RAW_PRED_DIR --ref VAL_DATA_DIR

Prints JSON: mean Dice per region for each (min_component_voxels, min_enhancing_voxels) pair,
and the pair with the best mean of the three regions. Only validation cases may be used.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from tumorseg.datasets import find_cases
from tumorseg.evaluate import prediction_path
from tumorseg.io import read_volume
from tumorseg.labels import get_convention
from tumorseg.metrics import dice
from tumorseg.postprocess import PostprocessConfig, postprocess

COMPONENTS = (0, 1000, 3000, 5000, 10000, 20000, 50000)
ENHANCING = (0, 500, 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pred", required=True)
    ap.add_argument("--ref", required=True)
    args = ap.parse_args()
    from pathlib import Path

    cases = [c for c in find_cases(args.ref) if c.label is not None]
    loaded = []
    for case in cases:
        conv = get_convention(case.convention)
        pred = conv.encode(read_volume(prediction_path(Path(args.pred), case.case_id)).data)
        ref = conv.encode(read_volume(case.label).data)
        loaded.append((pred, ref))
    results = []
    for comp, enh in itertools.product(COMPONENTS, ENHANCING):
        cfg = PostprocessConfig(min_component_voxels=comp, min_enhancing_voxels=enh)
        scores = {"whole": [], "core": [], "enhancing": []}
        for pred, ref in loaded:
            post = postprocess(pred, cfg)
            for region, classes in (("whole", (1, 2, 3, 4)), ("core", (1, 3, 4)), ("enhancing", (4,))):
                scores[region].append(dice(np.isin(post, classes), np.isin(ref, classes)))
        mean = {r: float(np.mean(v)) for r, v in scores.items()}
        results.append({"min_component_voxels": comp, "min_enhancing_voxels": enh, **mean,
                        "mean": float(np.mean(list(mean.values())))})
    best = max(results, key=lambda r: r["mean"])
    print(json.dumps({"cases": [c.case_id for c in cases], "grid": results, "best": best}, indent=1))


if __name__ == "__main__":
    main()
