"""Out-of-fold probabilities of a `tumorseg crossval` run, for choosing post-processing on them.

    python scripts/oof_probabilities.py --run ~/runs/cv_v2 [--tta]

For each fold, the fold's model predicts its held-out cases (the preprocessed arrays of the
run's cache, the `segment` pipeline's dense inference, no post-processing) and
RUN/oof[_tta]/<case_id>.npz gets: probs (X, Y, Z, 5) float16 on the cropped grid (canonical
classes; (1, 0, 0, 0, 0) outside the brain), label (X, Y, Z) uint8 canonical reference, mask
(X, Y, Z) bool brain, spacing (3,) mm, fold. Finished cases are skipped. Keep these files
outside the repository: they are derived from the data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tumorseg import checkpoint as ckpt
from tumorseg.io import atomic_write
from tumorseg.models import fastconv
from tumorseg.postprocess import PostprocessConfig
from tumorseg.preprocess import cache_path, load_preprocessed
from tumorseg.segment import SegmentOptions, label_case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--tta", action="store_true")
    args = ap.parse_args()
    folds = json.loads((args.run / "folds.json").read_text())["folds"]
    config = next(args.run.glob("fold*/config.json"), None)
    if config is None:
        raise SystemExit(f"oof_probabilities: no fold*/config.json in {args.run}")
    cache = Path(json.loads(config.read_text())["data"]["cache_dir"] or args.run / "cache")
    out = args.run / ("oof_tta" if args.tta else "oof")
    out.mkdir(exist_ok=True)
    options = SegmentOptions(probabilities=True, tta=args.tta,
                             postprocess=PostprocessConfig(enabled=False))
    for i, fold in enumerate(folds):
        weights = args.run / f"fold{i}" / "model.pt"
        if not weights.exists():  # a run of some folds only (crossval --fold)
            print(f"fold {i}: no {weights}, skipped", flush=True)
            continue
        model, meta = ckpt.load_model(weights)
        for cid in fold:
            dest = out / f"{cid}.npz"
            if dest.exists():
                continue
            pre = load_preprocessed(cache_path(cache, cid))
            with fastconv.options(options.engine_options()):
                _, probs, _, _ = label_case(model, pre, options, desc=cid)
            probs[~pre.mask] = (1, 0, 0, 0, 0)
            with atomic_write(dest) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, probs=probs.astype(np.float16), label=pre.label, mask=pre.mask,
                             spacing=np.asarray(pre.spacing, np.float32), fold=i)
            print(f"fold {i}: {cid}", flush=True)


if __name__ == "__main__":
    main()
