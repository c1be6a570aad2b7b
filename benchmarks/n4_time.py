"""Seconds of N4 bias correction (preprocess.n4_correct) per modality of one real case, on the
brain's box as preprocessing runs it, for images shrunk 8x and 4x (median of 3).

    python benchmarks/n4_time.py [CASE_DIR]
"""
import json
import sys
import time

import numpy as np

from tumorseg.datasets import MODALITIES, find_cases, load_case
from tumorseg.preprocess import bounding_box, brain_mask, n4_correct

(case,) = find_cases(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/brats2018/Brats18_2013_11_1")
img = load_case(case).image
mask = brain_mask(img)
crop = bounding_box(mask, 8)
inside = crop.crop(mask)
out = {"case": case.case_id, "box": list(inside.shape), "seconds": {}}
for shrink in (8, 4):
    for c, name in enumerate(MODALITIES):
        vol = crop.crop(img[c]).astype(np.float32)
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            n4_correct(vol, inside, shrink)
            ts.append(time.perf_counter() - t)
        out["seconds"][f"shrink{shrink}_{name}"] = round(sorted(ts)[1], 3)
print(json.dumps(out))
