"""`tumorseg demo`: the whole pipeline on synthetic cases, in a few minutes on a CPU.

1. write synthetic BraTS-like cases (tumorseg.phantom) in the BraTS 2017 layout;
2. train a small two_path model on some of them with dense tiles;
3. segment a held-out case with it and with the released model;
4. evaluate both and print a per-region table;
5. print the commands to run on real data, and every file written.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tumorseg import metrics
from tumorseg.datasets import find_cases
from tumorseg.errors import TumorsegInputError
from tumorseg.evaluation import evaluate_folder
from tumorseg.html_report import write_report
from tumorseg.phantom import make_phantom, write_phantom
from tumorseg.postprocess import PostprocessConfig
from tumorseg.segment import SegmentOptions, segment_cases
from tumorseg.train import DataConfig, PhaseConfig, TrainConfig, train
from tumorseg.weights import RELEASED, resolve_model

N_CASES = 6
MARKER = ".tumorseg-demo"  # marks a folder the demo made and may replace
SHAPE = (96, 96, 48)
# Phantom tumours are a few thousand voxels: scale the clean-up thresholds to them.
DEMO_POSTPROCESS = PostprocessConfig(min_component_mm3=100, min_enhancing_mm3=20)  # 1 mm phantoms
DEMO_TRAIN = TrainConfig(
    model="two_path", seed=0, threads=0,
    model_options={"init": "default", "dropout": 0.2},
    data=DataConfig(val=["demo_004"], val_slices=6),
    phase1=PhaseConfig(sampling="balanced", tile=24, batch_size=4, epochs=3, steps_per_epoch=35,
                       lr=0.01, momentum=(0.5, 0.9), momentum_epochs=2, lr_decay_epochs=3,
                       grad_clip=5.0),
    phase2=PhaseConfig(sampling="natural", output_layer_only=True, tile=24, batch_size=4,
                       epochs=1, steps_per_epoch=15, lr=0.002, grad_clip=5.0),
)


def run_demo(out: str | Path = "tumorseg_demo", progress: bool = True, log=print) -> dict:
    """Run the demo into `out`. Returns {"files": [...], "tables": {...}, "model_file": path,
    "problems": [one line per failed case, missing prediction or failed report entry]}.

    A previous demo's folder (it holds the MARKER file) is replaced; any other existing,
    non-empty `out` is refused, so `--out .` can never delete the user's files."""
    t0 = time.time()
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise TumorsegInputError(out, "exists and is not a folder: choose another --out")
        if (out / MARKER).is_file():
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise TumorsegInputError(out, f"is not empty and holds no {MARKER} (not made by "
                                          "tumorseg demo): choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by tumorseg demo; the next demo run replaces this folder\n")
    data, test = out / "data", out / "heldout"
    log(f"1/5 writing {N_CASES} synthetic cases {SHAPE} to {data}/ (BraTS 2017 layout)")
    for seed in range(N_CASES - 1):
        write_phantom(make_phantom(SHAPE, seed=seed, case_id=f"demo_{seed:03d}"), data, "brats2017")
    write_phantom(make_phantom(SHAPE, seed=N_CASES - 1, case_id="demo_heldout"), test, "brats2017")

    log("2/5 training a small two_path on 4 cases (1 validates) with 24x24 dense tiles")
    summary = train(DEMO_TRAIN, data, out / "run", progress=progress, log=log)
    model_file = Path(summary["model_file"])

    log("3/5 segmenting the held-out case")
    cases = find_cases(test)
    tables = {}
    models = {"demo_model": str(model_file)}
    for name in RELEASED:
        try:
            resolve_model(name)
            models[f"released_{name}"] = name
        except Exception as exc:  # a fresh clone may lack weights: say so, go on
            log(f"    released {name}: not available ({exc})")
    problems: list[str] = []
    for label, spec in models.items():
        pred_dir = out / f"pred_{label}"
        _, failures = segment_cases(spec, cases, pred_dir, SegmentOptions(
            overlay=True, postprocess=DEMO_POSTPROCESS, progress=progress))
        problems += [f"{label}: case {f.case_id} failed: {f.reason}" for f in failures]
        rows, missing = evaluate_folder(pred_dir, test)
        problems += [f"{label}: case {cid}: {msg}" for cid, msg in missing]
        tables[label] = metrics.summarize(rows)
        metrics.write_csv(rows, pred_dir / "metrics.csv")
        report = write_report(pred_dir, pred_dir / "report.html", images=test,
                              metrics=pred_dir / "metrics.csv")
        problems += [f"{label}: report: case {f['case_id']}: {f['reason']}"
                     for f in report.get("failed", [])]

    log("4/5 evaluation on the held-out synthetic case (Dice / HD95 mm)")
    log(f"    {'model':<26}{'whole':>15}{'core':>15}{'enhancing':>15}")
    for label, summ in tables.items():
        cells = "".join(f"{summ[r]['dice']['mean']:>8.3f} /{summ[r]['hd95']['mean']:>5.1f}"
                        for r in ("whole", "core", "enhancing"))
        log(f"    {label:<26}{cells}")
    log("    (the released models learned real BraTS MRI; synthetic phantoms are not their domain)")

    log("5/5 on your own data:")
    log("    tumorseg segment -i /path/to/BraTS_folder -o predictions/ --overlay")
    log("    tumorseg evaluate --pred predictions/ --ref /path/to/BraTS_folder -o metrics.csv")
    log("    tumorseg report -i predictions/ --images /path/to/BraTS_folder --metrics metrics.csv "
        "-o report.html")
    files = sorted(p for p in out.rglob("*") if p.is_file() and "cache" not in p.parts)
    log(f"files written under {out}/ ({time.time() - t0:.0f} s):")
    for p in files:
        log(f"    {p}  {_how_to_open(p)}")
    for problem in problems:  # a failed case must not pass for a Dice of 0
        log(f"demo problem: {problem}")
    return {"files": files, "tables": tables, "model_file": model_file, "problems": problems}


def _how_to_open(p: Path) -> str:
    if p.name == "labels.txt":
        return "<- ITK-SNAP: Segmentation > Import Label Descriptions"
    if p.name == "labels.ctbl":
        return "<- 3D Slicer: colour table for the label maps"
    if p.name == "curves.png":
        return "<- training curves: loss per step, validation Dice per epoch"
    if p.suffix == ".png":
        return "<- overlay: four modalities, prediction, ground truth"
    if p.parent.name.startswith("pred_") and p.name.endswith(".nii.gz"):
        return "<- label map: open over the T1 in ITK-SNAP or 3D Slicer"
    if p.name == "report.html":
        return "<- open in a web browser: volumes, metrics, three views per case"
    if p.name == "model.pt":
        return "<- trained model: tumorseg segment --model " + str(p)
    return ""
