"""The `tumorseg` command: thin subcommands that parse arguments and call the Python API.

Exit codes: 0 success; 1 some cases of a batch failed (each reported on one line, whatever the
error: bad input, out of memory, a runtime error), or the one case given failed with an error
that is not bad input; 2 bad arguments or bad input (a one-line message, never a traceback);
130 interrupted (training saved a checkpoint).
"""

from __future__ import annotations

import argparse
import math
import json
import sys
from pathlib import Path

from tumorseg.datasets import MODALITIES
from tumorseg.errors import Interrupted, TumorsegInputError
from tumorseg.postprocess import PostprocessConfig


def _err(msg: str) -> None:
    print(f"tumorseg: error: {msg}", file=sys.stderr)


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


# -- models ------------------------------------------------------------------------------------

def cmd_models(args) -> int:
    from tumorseg.models import MODELS, build_model, params_total

    rows = []
    for name in MODELS:
        m = build_model(name)
        rows.append({"name": name, "patch_size": m.patch_size, "receptive_field": m.receptive_field,
                     "params_paper": m.params_paper, "params_total": params_total(m)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<15}{'patch':>7}{'rf':>5}{'params (paper)':>16}{'params (total)':>16}")
    for r in rows:
        print(f"{r['name']:<15}{r['patch_size']:>7}{r['receptive_field']:>5}"
              f"{r['params_paper']:>16,}{r['params_total']:>16,}")
    print("params (paper): kernel weights as Havaei et al. count them (no biases, one maxout "
          "piece; a cascade's second CNN only)")
    return 0


# -- preprocess --------------------------------------------------------------------------------

def cmd_preprocess(args) -> int:
    from tumorseg.datasets import find_cases
    from tumorseg.preprocess import PreprocessSettings, preprocess_dataset

    errors: list = []
    cases = find_cases(args.input, layout=args.layout, labels=args.labels, errors=errors)
    if args.n4_modalities and not args.n4:
        raise TumorsegInputError("--n4-modalities", "names what --n4 corrects: add --n4")
    try:
        chosen = {"n4_modalities": tuple(args.n4_modalities)} if args.n4_modalities else {}
        settings = PreprocessSettings(n4=args.n4, margin=args.margin, **chosen)
    except ValueError as exc:
        raise TumorsegInputError("--n4-modalities", str(exc)) from None
    done, failed = preprocess_dataset(cases, settings, args.output, workers=args.workers,
                                      progress=_progress(args))
    failed = [(str(w), str(e)) for w, e in errors] + failed
    for case_id, msg in failed:
        _err(f"case {case_id} failed: {msg}")
    print(f"preprocessed {len(done)} case(s) into {args.output}; {len(failed)} failed")
    return 1 if failed else 0


# -- train -------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from tumorseg.config import load_config
    from tumorseg.train import TrainConfig, train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    summary = train(cfg, args.data, args.out, resume=args.resume, device=args.device,
                    progress=_progress(args))
    print(json.dumps({k: summary[k] for k in ("model_file", "val_dice", "seconds")}, indent=2))
    return 0


def cmd_crossval(args) -> int:
    import torch

    from tumorseg.config import load_config
    from tumorseg.crossval import CrossvalOptions, run_crossval
    from tumorseg.segment import SegmentOptions
    from tumorseg.train import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = CrossvalOptions(k=args.folds, seed=args.seed,
                              only=tuple(args.fold) if args.fold is not None else None,
                              segment=SegmentOptions(tta=args.tta, views=args.views),
                              progress=_progress(args))
    summary = run_crossval(cfg, args.data, args.out, options)
    pooled = summary["pooled"]
    print(f"pooled over {pooled['cases']} cases: Dice whole {pooled['dice_whole']:.3f}, "
          f"core {pooled['dice_core']:.3f}, enhancing {pooled['dice_enhancing']:.3f} "
          f"(tables in {args.out})")
    return 0


# -- segment -----------------------------------------------------------------------------------

def _labels_arg(args) -> str | None:
    return None if args.labels in (None, "auto") else args.labels


def cmd_segment(args) -> int:
    import dataclasses

    from tumorseg.datasets import discard_read_ahead, files_case, find_cases, read_ahead

    labels = _labels_arg(args)
    files = {m: getattr(args, m) for m in ("t1", "t1c", "t2", "flair")}
    given = [m for m, f in files.items() if f]
    errors: list = []
    if given:
        if args.input:
            raise TumorsegInputError("-i", "give either -i INPUT or the four files --t1 --t1c "
                                           "--t2 --flair, not both")
        missing = [f"--{m}" for m in files if not files[m]]
        if missing:
            raise TumorsegInputError(None, f"explicit files need all four modalities; missing "
                                           f"{' '.join(missing)}")
        cases = [files_case(**files, convention=labels)]
    elif args.input:
        cases = find_cases(args.input, layout=args.layout, labels=labels, errors=errors)
    else:
        raise TumorsegInputError(None, "give -i INPUT (a case folder or dataset root) or the "
                                       "four files --t1 --t1c --t2 --flair")
    # One case in the input: its failure is a bad input (exit 2), as for any single file.
    single = len(cases) + len(errors) == 1
    if single and errors:
        raise errors[0][1]
    if cases and args.num_parts == 1 and not args.continue_:
        # The first case segment_cases reads (its ground truth only for the overlay), read
        # while torch imports: about 0.7 s of a BraTS case's ~17 s.
        read_ahead(cases[0] if args.overlay else dataclasses.replace(cases[0], label=None))
    import torch

    from tumorseg.segment import CaseFailure, SegmentOptions, segment_cases
    # The model file's own post-processing, with what the user gave replacing its fields.
    given = {"enabled": False if args.no_postprocess else None,
             "min_component_mm3": args.min_component, "min_enhancing_mm3": args.min_enhancing,
             "max_oedema_distance_mm": args.max_oedema_distance}
    post = {k: v for k, v in given.items() if v is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    options = SegmentOptions(
        postprocess=post, probabilities=args.probabilities, convention=args.output_labels,
        overlay=args.overlay, output_format=args.output_format, batch_size=args.batch_size,
        device=args.device, precision=args.precision, engine=args.engine,
        progress=_progress(args), tta=args.tta, views=args.views)
    try:
        results, failures = segment_cases(
            args.model, cases, args.output, options, continue_=args.continue_,
            num_parts=args.num_parts, part_id=args.part_id, log=print)
    finally:  # a model or output error before the first read leaves the read-ahead unclaimed
        discard_read_ahead()
    if args.part_id == 0:  # cases find_cases rejected belong to no part: part 0 reports them
        failures = [CaseFailure(str(cid), str(err)) for cid, err in errors] + failures
    if single and failures:  # bad input is 2, as for any single file; anything else 1
        _err(failures[0].reason)
        return 2 if failures[0].bad_input else 1
    for failure in failures:
        _err(f"case {failure.case_id} failed: {failure.reason}")
    print(f"segmented {len(results)} case(s) into {args.output}; {len(failures)} failed")
    return 1 if failures else 0


# -- evaluate ----------------------------------------------------------------------------------

def cmd_evaluate(args) -> int:
    from tumorseg import metrics
    from tumorseg.evaluation import evaluate_folder

    for flag, path in (("-o", args.output), ("--json", args.json)):
        if path and Path(path).is_dir():  # checked before the evaluation, not after it
            raise TumorsegInputError(path, f"{flag} names a folder; give a file name")
    rows, problems = evaluate_folder(args.pred, args.ref, layout=args.layout,
                                     labels=_labels_arg(args), lesionwise=args.lesionwise)
    for case_id, msg in problems:
        _err(f"case {case_id}: {msg}")
    summary = metrics.summarize(rows)
    print(metrics.format_summary(summary))
    n_cases = len({r["case_id"] for r in rows})
    print(f"evaluated {n_cases} case(s); {len(problems)} problem(s) reported")
    if args.output:
        metrics.write_csv(rows, args.output)
    if args.json:
        metrics.write_json(summary, args.json)
    return 1 if problems else 0


# -- export ----------------------------------------------------------------------------------

def cmd_export(args) -> int:
    from tumorseg.export import export_onnx
    from tumorseg.weights import resolve_model

    model, meta = resolve_model(args.model)
    try:
        result = export_onnx(model, meta, args.output, verify=not args.no_check)
    except RuntimeError as exc:  # the written graph failed its check: nothing was kept
        _err(" ".join(str(exc).split()))
        return 1
    props = result["metadata"]
    pad = json.loads(props["padding"])
    print(f"wrote {result['path']} ({result['bytes'] / 1e6:.1f} MB): {props['model']}, "
          f"input [batch, 4, H, W] padded by {pad['before']}/{pad['after']} pixels, "
          f"logits [batch, 5, H - {int(props['receptive_field']) - 1}, "
          f"W - {int(props['receptive_field']) - 1}]")
    if "max_abs_diff" in result:
        print(f"onnxruntime matches PyTorch: max |logit difference| {result['max_abs_diff']:.1e} "
              f"(logits up to {result['max_abs_logit']:.1f})")
    return 0


# -- report ----------------------------------------------------------------------------------

def cmd_report(args) -> int:
    from tumorseg.html_report import write_report

    summary = write_report(args.input, args.output, images=args.images, metrics=args.metrics,
                           progress=_progress(args), labels=args.labels, layout=args.layout,
                           modality=args.modality)
    for failure in summary["failed"]:
        _err(f"case {failure['case_id']} failed: {failure['reason']}")
    print(f"wrote {summary['path']}: {len(summary['cases'])} case(s), "
          f"{len(summary['failed'])} failed")
    return 1 if summary["failed"] else 0  # as segment: the page is written, some cases failed


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page of a segmentation folder: "
                                      "volumes, metrics, three views per case")
    p.add_argument("-i", "--input", required=True, metavar="SEG_OUTPUT",
                   help="folder of <case_id>.nii.gz label maps (what `tumorseg segment` wrote)")
    p.add_argument("-o", "--output", required=True, metavar="HTML", help="report file to write")
    p.add_argument("--images", metavar="DATASET",
                   help="the dataset that was segmented: draws the labels on its images and "
                        "lists its cases that have no label map as failed")
    p.add_argument("--metrics", metavar="CSV", help="the CSV of `tumorseg evaluate -o`: Dice "
                                                    "and HD95 per region in the table")
    p.add_argument("--modality", choices=["flair", "t1c", "t1", "t2"], default="flair",
                   help="image under the labels (default %(default)s)")
    p.add_argument("--labels", choices=["brats2013", "brats2017", "brats2023", "msd"],
                   help="convention of the label maps (default: the one SEG_OUTPUT/labels.ctbl "
                        "names, else the dataset's, else brats2017)")
    p.add_argument("--layout", choices=["brats2013", "brats2017", "brats2023", "msd", "nnunet"],
                   help="layout of --images (default: detected)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_report)


# -- demo ------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from tumorseg.demo import run_demo

    result = run_demo(args.out, progress=_progress(args))
    return 1 if result["problems"] else 0


# -- parser ------------------------------------------------------------------------------------

def _common_data(p: argparse.ArgumentParser, auto: bool = False) -> None:
    p.add_argument("--layout", choices=["brats2013", "brats2017", "brats2023", "msd", "nnunet"],
                   help="override layout detection")
    p.add_argument("--labels", choices=(["auto"] if auto else []) + ["brats2013", "brats2017",
                                                                     "brats2023", "msd"],
                   help="override the label convention" + (" (auto: the layout's own; "
                        "brats2017 for explicit files)" if auto else ""))


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _nonnegative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tumorseg",
        description="Brain tumour segmentation in multimodal MRI (Havaei et al. 2017).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the architectures and their sizes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("preprocess", help="preprocess a dataset into a cache folder")
    p.add_argument("-i", "--input", required=True, help="dataset root or case folder")
    p.add_argument("-o", "--output", required=True, help="cache folder")
    p.add_argument("--n4", action="store_true", help="N4 bias correction (of T1 and T1c, as the "
                   "paper, unless --n4-modalities names others)")
    p.add_argument("--n4-modalities", nargs="+", choices=MODALITIES,
                   metavar="MODALITY",
                   help="the modalities --n4 corrects: t1 t1c t2 flair (default: t1 t1c)")
    p.add_argument("--margin", type=_nonnegative_int, default=8, help="voxels kept around the brain box")
    p.add_argument("--workers", type=int, default=2, help="processes")
    p.add_argument("--no-progress", action="store_true")
    _common_data(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="train a model (two phases; cascades load or train a first stage)")
    p.add_argument("--config", required=True, help="TOML config, e.g. configs/paper_two_path.toml")
    p.add_argument("--data", required=True, help="dataset root with label maps")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, model.pt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. phase1.epochs=3 seed=1")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("crossval", help="k-fold cross-validation of a training config: train, "
                                        "segment and score each fold")
    p.add_argument("--config", required=True, help="training config (TOML)")
    p.add_argument("--data", required=True, help="dataset root with label maps")
    p.add_argument("--out", required=True, help="output folder (resumable: run again to continue)")
    p.add_argument("--folds", type=_positive_int, default=4, help="k (default %(default)s)")
    p.add_argument("--fold", type=int, action="append", metavar="I",
                   help="run only fold I (0-based; repeatable); default all")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument("--tta", action="store_true",
                   help="segment the folds with --tta (seg_tta/, cases_tta.csv, crossval_tta.json)")
    p.add_argument("--views", type=int, choices=[1, 3], default=1,
                   help="segment the folds with --views 3 (seg_views3/, cases_views3.csv, "
                        "crossval_views3.json)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_crossval)

    p = sub.add_parser("segment", help="segment a case, a dataset or four files into label maps")
    p.add_argument("-i", "--input", help="case folder or dataset root (any supported layout)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="released model (two_path, input_cascade; default two_path) or a "
                        "model file written by `tumorseg train`")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    for m, what in (("t1", "T1"), ("t1c", "T1 with contrast (T1gd, T1ce)"), ("t2", "T2"),
                    ("flair", "FLAIR")):
        p.add_argument(f"--{m}", metavar="FILE", help=f"{what} file, instead of -i")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <case>_probabilities.nii.gz (x, y, z, 5 classes)")
    p.add_argument("--overlay", action="store_true", help="also write a <case>.png overlay")
    p.add_argument("--continue", dest="continue_", action="store_true",
                   help="skip cases whose outputs already exist")
    p.add_argument("--num-parts", type=_positive_int, default=1, metavar="N",
                   help="split the cases into N parts (one per process or machine)")
    p.add_argument("--part-id", type=_nonnegative_int, default=0, metavar="K",
                   help="segment part K (0-based) of --num-parts")
    p.add_argument("--no-postprocess", action="store_true", help="skip post-processing")
    p.add_argument("--min-component", type=_nonnegative_float, metavar="MM3",
                   help="remove whole-tumour components smaller than MM3 cubic millimetres "
                        f"(default: the model's, {PostprocessConfig.min_component_mm3:g} for the "
                        "released ones; the largest is kept)")
    p.add_argument("--min-enhancing", type=_nonnegative_float, metavar="MM3",
                   help="less enhancing tumour than MM3 cubic millimetres in a case becomes "
                        f"necrosis (default: the model's, {PostprocessConfig.min_enhancing_mm3:g} "
                        "for the released ones)")
    p.add_argument("--max-oedema-distance", type=_nonnegative_float, metavar="MM",
                   help="oedema farther than MM millimetres from every predicted core voxel "
                        "becomes background; 0 turns it off (default: the model's; off, "
                        f"{PostprocessConfig.max_oedema_distance_mm:g}, for the released ones)")
    p.add_argument("--output-labels", choices=["brats2013", "brats2017", "brats2023", "msd"],
                   help="label convention of the written label maps (default: each case's own, "
                        "as --labels or the layout gives it)")
    p.add_argument("--output-format", choices=["nii.gz", "mha"],
                   help="label map format (default: as the input, .mha in -> .mha out)")
    p.add_argument("--batch-size", type=_positive_int, default=2, metavar="N",  # infer.BATCH_SIZE
                   help="axial slices per forward pass; bounds memory (default %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 (default) or bf16: bfloat16 convolutions, faster on CPUs with "
                        "AVX-512-BF16/AMX; labels agree with fp32 on >= 99.9%% of brain voxels "
                        "(docs/PERFORMANCE.md)")
    p.add_argument("--engine", choices=["auto", "plain"], default="auto",
                   help="auto (default): the fastest layer implementations, measured once per "
                        "machine; plain: direct fp32 convolutions, the reference")
    p.add_argument("--tta", action="store_true",
                   help="mirror test-time augmentation: average with the left-right mirrored "
                        "slices' probabilities; twice the inference time (docs/MODEL_CARD.md)")
    p.add_argument("--views", type=int, choices=[1, 3], default=1,
                   help="1 (default): axial slices, as the paper; 3: average the probabilities of "
                        "axial, coronal and sagittal slicing, three times the inference time "
                        "(docs/MODEL_CARD.md)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's, the physical core count)")
    p.add_argument("--no-progress", action="store_true")
    _common_data(p, auto=True)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", help="score predictions against reference label maps")
    p.add_argument("--pred", required=True, help="folder of <case_id>.nii.gz (or .mha) predictions")
    p.add_argument("--ref", required=True, help="dataset root with the reference label maps")
    p.add_argument("-o", "--output", metavar="CSV", help="per-case metrics CSV")
    p.add_argument("--json", metavar="JSON", help="summary JSON")
    p.add_argument("--lesionwise", nargs="?", const="brats2023", choices=("brats2023", "panoptica"),
                   metavar="RULES",
                   help="add lesion-wise Dice, HD95 and lesion counts under RULES: brats2023 "
                        "(the default; the BraTS 2023 reference code: missed and spurious "
                        "lesions score Dice 0, HD95 374) or panoptica (the organisers' current "
                        "brats-evaluation package: one-to-one matching, means over matched "
                        "lesions only)")
    _common_data(p, auto=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a model's dense network as ONNX (needs "
                                      "`pip install tumorseg[onnx]`)")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="released model (two_path, input_cascade; default two_path) or a "
                        "model file written by `tumorseg train`")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="ONNX file to write (replaced if it exists)")
    p.add_argument("--no-check", action="store_true",
                   help="do not run the written file in onnxruntime against PyTorch")
    p.set_defaults(func=cmd_export)

    _add_report_parser(sub)

    p = sub.add_parser("demo", help="the whole pipeline on synthetic cases (a few minutes)")
    p.add_argument("--out", default="tumorseg_demo",
                   help="work folder: created, or replaced if an earlier demo made it "
                        "(default %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage line
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except TumorsegInputError as exc:
        _err(str(exc))
        return 2
    except OSError as exc:  # a path that cannot be read or written: one line, not a traceback
        if exc.filename is None:
            raise
        _err(f"{exc.filename}: {exc.strerror or exc}")
        return 2
    except Interrupted as exc:  # training saved a checkpoint before stopping
        _err(str(exc))
        return 130
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
