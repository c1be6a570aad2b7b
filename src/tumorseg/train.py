"""Training: `train(cfg, data_root, run_dir)` is a function of a TrainConfig.

Two phases (the paper's `*` models): phase 1 trains every trainable weight on balanced
sampling; phase 2 retrains only the output layer on natural sampling. A cascade loads (or first
trains) a TwoPathCNN as its frozen first stage, then trains its second stage the same way.

Reproducibility and resume: the random draws of step s of phase p come from generators seeded
with (seed, p, s), so a run resumed from a checkpoint takes exactly the draws an uninterrupted
run takes; with the model and optimiser state restored, the final weights are bitwise equal.
Under torchrun every rank draws the same global batch and trains on its share; the loss weights
are normalised over the global batch, so gradients match a single-process run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tumorseg import checkpoint as ckpt
from tumorseg.augment import AugmentConfig, augment
from tumorseg.config import to_dict
from tumorseg.curves import eta_seconds, format_duration, plot_curves
from tumorseg.errors import Interrupted, TumorsegInputError, one_line  # noqa: F401 (re-exported)
from tumorseg.geometry import MODEL_SPACE
from tumorseg.io import atomic_write
from tumorseg.labels import CANONICAL_REGIONS
from tumorseg.models import Cascade, build_model, check_options, fastconv
from tumorseg.models.fastconv import EngineOptions
from tumorseg.models.two_path import TwoPathCNN
from tumorseg.postprocess import PostprocessConfig
from tumorseg.preprocess import PreprocessSettings
from tumorseg.sampling import (SAMPLING_MODES, Sampler, SliceData, check_anchor_options,
                               class_frequencies, prepare)


OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase. An epoch is `steps_per_epoch` steps of `batch_size` tiles."""

    sampling: str = "balanced"  # balanced | natural | slice_weighted
    healthy_share: float = 0.0  # balanced: fraction of anchors on healthy brain; 0 = 1/K
    border_share: float = 0.0  # balanced: fraction of healthy anchors within border_mm of tumour
    border_mm: float = 10.0
    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 8  # tiles per step (global, over all ranks)
    tile: int = 1  # T: a tile yields T x T outputs; 1 = the paper's single 33x33 patches
    output_layer_only: bool = False
    optimizer: str = "sgd"  # sgd | adam | adamw
    weight_decay: float = 0.0  # adamw's decoupled weight decay
    lr: float = 0.005
    schedule: str = "linear"  # linear: per epoch, as below | cosine: per step, lr -> lr * lr_decay
    warmup_steps: int = 0  # cosine: linear warm-up from 0
    lr_decay: float = 0.1  # the learning rate falls linearly to lr * lr_decay ...
    lr_decay_epochs: int = 10  # ... over this many epochs
    momentum: tuple[float, float] = (0.5, 0.9)  # rises linearly ...
    momentum_epochs: int = 10  # ... over this many epochs
    l1: float = 0.0
    l2: float = 0.0
    max_norm: float = 0.0  # bound on each kernel's L2 norm; 0 = off
    grad_clip: float = 0.0  # bound on the gradient's global L2 norm; 0 = off
    loss: str = "ce"  # ce: weighted cross-entropy | ce_dice: + dice_weight x soft Dice of the regions
    dice_weight: float = 1.0
    patience: int = 0  # early stopping: epochs without validation gain; 0 = off
    keep: str = "best"  # with validation: the weights of the best epoch, or the last

    def __post_init__(self):
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        check_anchor_options(self.sampling, self.healthy_share, self.border_share, self.border_mm)
        for key, value, valid in (("optimizer", self.optimizer, OPTIMIZERS),
                                  ("schedule", self.schedule, ("linear", "cosine")),
                                  ("loss", self.loss, ("ce", "ce_dice")),
                                  ("keep", self.keep, ("best", "last"))):
            if value not in valid:
                raise ValueError(f"{key} must be one of {valid}, got {value!r}")
        if self.tile < 1 or self.batch_size < 1 or self.epochs < 0 or self.steps_per_epoch < 1:
            raise ValueError("tile, batch_size and steps_per_epoch must be >= 1, epochs >= 0")


@dataclass(frozen=True)
class DataConfig:
    """Which cases train and which validate (case ids); empty lists: split by `val_fraction`."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    val_fraction: float = 0.2
    val_slices: int = 0  # 0: whole volumes through the segment pipeline; n: n axial slices, raw
    val_every: int = 1  # validate every n epochs (and after each phase's last)
    cache_dir: str = ""  # preprocessing cache; default RUN_DIR/cache
    layout: str = ""  # override layout detection
    labels: str = ""  # override the label convention

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0 or self.val_slices < 0 or self.val_every < 1:
            raise ValueError(f"need 0 <= val_fraction < 1, val_slices >= 0 and val_every >= 1, "
                             f"got {self.val_fraction}, {self.val_slices}, {self.val_every}")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "two_path"
    seed: int = 0
    model_options: dict = field(default_factory=dict)
    first_stage: str = ""  # cascades: model file of the first TwoPathCNN, trained with this
    # config's preprocessing (checked); empty = train it here
    preprocess: PreprocessSettings = PreprocessSettings()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    phase1: PhaseConfig = PhaseConfig(sampling="balanced")
    phase2: PhaseConfig = PhaseConfig(sampling="natural", output_layer_only=True, epochs=2)
    checkpoint_every: int = 50  # steps
    threads: int = 0  # torch CPU threads; 0 = torch's default
    workers: int = 1  # preprocessing processes
    precision: str = "fp32"  # "bf16": bfloat16 convolutions where they measure faster (opt-in)
    engine: str = "auto"  # "plain": direct fp32 convolutions (the reference; models.fastconv)

    def __post_init__(self):
        EngineOptions(mode=self.engine, precision=self.precision)  # raises ValueError if bad
        check_options(self.model, self.model_options)


# -- distributed -------------------------------------------------------------------------------

def _dist_init(device: str) -> bool:
    """Join the torchrun process group if WORLD_SIZE > 1 and none exists; True if created here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def _dist_shutdown(completed: bool) -> None:
    """Destroy the process group this process created. Left to interpreter exit, gloo's threads
    can be torn down while still joinable, and the rank aborts ("terminate called without an
    active exception"). After a completed run the ranks first wait for each other, so that none
    closes its connections while a peer still writes its files; after an error or interruption
    they do not, because the peers may never arrive."""
    try:
        if completed:
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _dist_rank_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return torch.distributed.get_rank(), world
    return 0, 1


# -- helpers -----------------------------------------------------------------------------------

def _step_seed(seed: int, phase: int, step: int) -> list[int]:
    return [seed, phase, step]


def _schedule(p: PhaseConfig, epoch: int) -> tuple[float, float]:
    """(learning rate, momentum) of `epoch` (0-based)."""
    t_lr = min(epoch / p.lr_decay_epochs, 1.0) if p.lr_decay_epochs > 0 else 1.0
    t_m = min(epoch / p.momentum_epochs, 1.0) if p.momentum_epochs > 0 else 1.0
    lr = p.lr * (1.0 - (1.0 - p.lr_decay) * t_lr)
    return lr, p.momentum[0] + (p.momentum[1] - p.momentum[0]) * t_m


def _kernels(params) -> list[torch.Tensor]:
    return [p for p in params if p.dim() == 4]


def _split(cfg: DataConfig, ids: list[str], seed: int) -> tuple[list[str], list[str]]:
    known = set(ids)
    for name in list(cfg.train) + list(cfg.val):
        if name not in known:
            raise TumorsegInputError(None, f"data: case {name!r} is not in the dataset")
    both = sorted(set(cfg.train) & set(cfg.val))
    if both:
        raise TumorsegInputError(None, f"data: cases {both} are in both train and val")
    if cfg.train:
        return list(cfg.train), list(cfg.val)
    rest = [i for i in ids if i not in set(cfg.val)]
    if cfg.val:
        return rest, list(cfg.val)
    order = list(np.random.default_rng(seed).permutation(len(ids)))
    n_val = int(round(len(ids) * cfg.val_fraction))
    val = sorted(ids[i] for i in order[:n_val])
    return [i for i in ids if i not in set(val)], val


def validation_slices(mask: np.ndarray, n: int) -> list[int]:
    """`n` axial slices evenly spaced over the slices that contain brain (mask (X, Y, Z))."""
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    if len(zs) <= n:
        return [int(z) for z in zs]
    return [int(zs[i]) for i in np.linspace(0, len(zs) - 1, n).round().astype(int)]


def prior_correction(class_freq: np.ndarray) -> np.ndarray:
    """[5] factors that turn a balanced-sampling model's probabilities into natural ones.

    Balanced sampling trains every present class with prior 1/K; Bayes' rule turns p_bal(c|x)
    into p(c|x) by dividing by that prior and multiplying by the natural class frequency, then
    renormalising: the factors are the frequencies (classes never seen in training get 0).
    """
    return np.asarray(class_freq, np.float64) / max(float(np.sum(class_freq)), 1e-12)


def validate_cases(model, cases, n_slices: int, device,
                   class_weights: np.ndarray | None = None) -> list[dict]:
    """Per-case Dice of each region over `cases` (Preprocessed with labels).

    n_slices = 0: what `tumorseg segment` does on the whole volume (each slice's brain box,
    voxels outside the brain 0, default post-processing), so selection optimises the pipeline
    users run. n_slices > 0: the raw argmax on `n_slices` evenly spaced axial slices (quick).
    class_weights: see infer.predict_labels (a prior correction). Returns one dict per case:
    {"case_id", "whole", "core", "enhancing", "mean"}.
    """
    from tumorseg.infer import predict_volume
    from tumorseg.metrics import dice
    from tumorseg.segment import SegmentOptions, label_case

    options = SegmentOptions(device=str(device))  # segment's defaults: post-processing included
    rows = []
    for pre in cases:
        if n_slices:
            zs = validation_slices(pre.mask, n_slices)
            probs = predict_volume(model, pre.image, zs, device=device)
            if class_weights is not None:
                probs *= np.asarray(class_weights, np.float32)[:, None, None, None]
            pred, ref = probs.argmax(0), pre.label[..., zs]
        else:
            pred, _, _, _ = label_case(model, pre, options, class_weights)
            ref = pre.label
        row = {"case_id": pre.case_id}
        for region, classes in CANONICAL_REGIONS.items():
            row[region] = dice(np.isin(pred, classes), np.isin(ref, classes))
        row["mean"] = float(np.mean([row[r] for r in CANONICAL_REGIONS]))
        rows.append(row)
    return rows


def validate(model, cases, n_slices: int, device, class_weights: np.ndarray | None = None
             ) -> dict[str, float]:
    """Mean over `cases` of each region's Dice and of their mean ("mean"); see validate_cases."""
    return _mean_scores(validate_cases(model, cases, n_slices, device, class_weights))


def _mean_scores(rows: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in (*CANONICAL_REGIONS, "mean")}


# -- the training function ---------------------------------------------------------------------

def train(cfg: TrainConfig, data_root: str | Path, run_dir: str | Path, resume: bool = False,
          device: str = "auto", progress: bool = True, log=print) -> dict:
    """Train `cfg.model` on the cases under `data_root`; write everything to `run_dir`.

    Writes config.json, metrics.jsonl, checkpoint.pt (atomic, every `checkpoint_every` steps and
    at each phase end), model.pt (final weights + preprocessing + convention), summary.json and
    curves.png (redrawn each epoch; tumorseg.curves). Each epoch's log line ends with the run's
    estimated time left (eta=). Layers are computed as `cfg.engine` and `cfg.precision` say (models.fastconv).
    Returns the summary.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fastconv.reuse_freed_memory()
    created = _dist_init(device)  # False inside a cascade's first-stage run: the caller owns it
    completed = False
    try:
        with fastconv.options(EngineOptions(mode=cfg.engine, precision=cfg.precision)):
            summary = _train(cfg, data_root, run_dir, resume, device, progress, log)
        completed = True
        return summary
    finally:
        if created:
            _dist_shutdown(completed)
        # The run's tile data (GBs with augment.planes) sits in reference cycles: a 4-fold
        # crossval kept a fold's data per fold until killed at 17 GB. Collecting stops that
        # growth; the trim then hands back the heap reuse_freed_memory keeps (three short
        # in-process runs: RSS 2.9 GB after each with the collection alone, 0.38 GB with both).
        gc.collect()
        fastconv.release_freed_memory()


def _train(cfg: TrainConfig, data_root: str | Path, run_dir: str | Path, resume: bool,
           device: str, progress: bool, log) -> dict:
    t0 = time.time()
    run_dir = Path(run_dir)
    rank, world = _dist_rank_world()
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main_rank = rank == 0
    ckpt_path = run_dir / "checkpoint.pt"
    if main_rank:
        _write_config(cfg, run_dir, resume)
    first_path = _first_stage(cfg, data_root, run_dir, resume, device, progress, log)
    first_meta = _first_stage_meta(first_path, cfg.preprocess) if first_path else None
    train_ids, val_ids, train_cases, val_cases, convention = _load_data(cfg, data_root, run_dir,
                                                                       main_rank, world, log)
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, first_path)
    data = prepare(train_cases, model.receptive_field, cfg.augment.slicing)
    if cfg.model_options.get("init", "paper") == "paper" and "class_freq" not in cfg.model_options:
        head = model.output_layer()
        with torch.no_grad():  # the paper's softmax biases: log of the class frequencies
            head.bias.copy_(torch.log(torch.tensor(np.maximum(class_frequencies(data), 1e-4), dtype=torch.float32)))
    model.to(device)
    meta = ckpt.describe(model, cfg.model, dict(cfg.model_options))
    meta.update(preprocess=cfg.preprocess.to_dict(), convention=convention,
                train_cases=train_ids, val_cases=val_ids, seed=cfg.seed,
                geometry=MODEL_SPACE.to_dict(),  # the cache's grid: segment maps cases to it
                postprocess=PostprocessConfig().to_dict())  # what validation scored
    if first_meta is not None:
        meta["first_stage"] = str(first_path)
        meta["first_preprocess"] = first_meta["preprocess"]  # checked again on every load

    state = {"phase": 0, "epoch": 0, "step": 0, "best": -1.0, "best_state": None, "bad_epochs": 0,
             "done": False, "phase_log": [], "loss": None, "last_val": None}
    saved = None
    if resume and ckpt_path.exists():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        state.update({k: saved.get(k, v) for k, v in state.items()})
        log(f"resumed from {ckpt_path}: phase {state['phase'] + 1}, epoch {state['epoch']}, "
            f"step {state['step']}")
        if main_rank:
            _truncate_metrics(run_dir / "metrics.jsonl", state["phase"], state["epoch"], state["step"])
    run = _Run(cfg, model, data, val_cases, meta, run_dir, device, rank, world, progress,
               {"signal": None}, log)
    _run_phases(run, state, saved)

    last = state["last_val"]
    if last and last["phase"] == 1 and last["step"] == state["step"]:
        per_case = last["rows"]  # the last epoch's validation scored these very weights
    else:
        per_case = validate_cases(model, val_cases, cfg.data.val_slices, device) if val_cases else []
    summary = {"model": cfg.model, "run_dir": str(run_dir), "train_cases": train_ids,
               "val_cases": val_ids, "phases": state["phase_log"],
               "val_dice": _mean_scores(per_case) if per_case else {},
               "val_dice_per_case": per_case,
               "seconds": round(time.time() - t0, 1), "model_file": str(run_dir / "model.pt")}
    if world > 1:  # every rank must end with the same weights; record each rank's digest
        digests: list = [None] * world
        torch.distributed.all_gather_object(digests, state_digest(model.state_dict()))
        summary["rank_state_sha256"] = digests
    if main_rank:
        ckpt.save(run_dir / "model.pt", {**meta, "state_dict": model.state_dict(), "summary": summary})
        with atomic_write(run_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    return summary


def _write_config(cfg: TrainConfig, run_dir: Path, resume: bool) -> None:
    """Write RUN_DIR/config.json; refuse a resume with another config, or a fresh run over a
    checkpoint."""
    resolved = to_dict(cfg)
    ckpt_path, config_path = run_dir / "checkpoint.pt", run_dir / "config.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and config_path.exists():
        if not same_config(json.loads(config_path.read_text()), resolved):
            raise TumorsegInputError(config_path, "--resume with a different config than the run's")
    elif not resume and ckpt_path.exists():
        raise TumorsegInputError(ckpt_path, "run folder holds a checkpoint: pass --resume or "
                                            "choose a new --out")
    with atomic_write(config_path) as tmp:
        tmp.write_text(json.dumps(resolved, indent=2))


def same_config(saved: dict, resolved: dict) -> bool:
    """Whether a run folder's config.json describes `resolved`. Keys the saved file lacks take
    their defaults, so a run started before a new option existed (off by default) resumes."""
    from tumorseg.config import from_dict

    try:
        saved = to_dict(from_dict(TrainConfig, saved))
    except (TumorsegInputError, ValueError, TypeError):
        pass  # unknown keys or bad values: compared as written, hence different
    return json.loads(json.dumps(saved)) == json.loads(json.dumps(resolved))


def _first_stage(cfg: TrainConfig, data_root: str | Path, run_dir: Path, resume: bool, device: str,
                 progress: bool, log) -> str:
    """A cascade's first-stage model file ("" for other models). Without `cfg.first_stage` it is
    trained here first, as a two_path run of its own (its config.json, checkpoints and model.pt
    under RUN_DIR/first_stage) with this config's data, preprocessing, seed, options and phases."""
    if not cfg.model.endswith("cascade"):
        return ""
    if cfg.first_stage:
        return cfg.first_stage
    first_cfg = dataclasses.replace(cfg, model="two_path", first_stage="")
    first_dir = run_dir / "first_stage"
    train(first_cfg, data_root, first_dir, resume=resume and (first_dir / "checkpoint.pt").exists()
          or (first_dir / "summary.json").exists(), device=device, progress=progress, log=log)
    return str(first_dir / "model.pt")


def _load_data(cfg: TrainConfig, data_root: str | Path, run_dir: Path, main_rank: bool, world: int,
               log) -> tuple[list[str], list[str], list, list, str]:
    """Find and split the cases, preprocess them into the cache (rank 0), load them.
    -> (train ids, validation ids, train Preprocessed, validation Preprocessed, label convention)."""
    from tumorseg.datasets import find_cases
    from tumorseg.preprocess import cache_path, cached_preprocess, load_preprocessed

    cases = find_cases(data_root, layout=cfg.data.layout or None, labels=cfg.data.labels or None)
    by_id = {c.case_id: c for c in cases}
    train_ids, val_ids = _split(cfg.data, sorted(by_id), cfg.seed)
    unlabelled = [i for i in train_ids + val_ids if by_id[i].label is None]
    if unlabelled:
        raise TumorsegInputError(data_root, f"cases without a label map cannot train: {unlabelled}")
    conventions = {by_id[i].convention for i in train_ids}
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    if main_rank:
        for cid in train_ids + val_ids:
            cached_preprocess(by_id[cid], cfg.preprocess, cache_dir)
    if world > 1:
        torch.distributed.barrier()
    train_cases = [load_preprocessed(cache_path(cache_dir, i)) for i in train_ids]
    val_cases = [load_preprocessed(cache_path(cache_dir, i)) for i in val_ids]
    log(f"train: {len(train_cases)} cases, validation: {len(val_cases)} cases ({', '.join(val_ids)})")
    return train_ids, val_ids, train_cases, val_cases, sorted(conventions)[0]


def _build_model(cfg: TrainConfig, first_path: str) -> torch.nn.Module:
    """The untrained model (call after seeding); a cascade gets its frozen first stage."""
    if not first_path:
        return build_model(cfg.model, **cfg.model_options)
    # loaded (again) after the seed, so that the second stage starts from the same random
    # weights as in runs before the early check; describe() stores this stage's own config
    first, _ = ckpt.load_model(first_path)
    model = build_model(cfg.model, **cfg.model_options)
    model.first = first  # replaces the placeholder built from the second stage's options
    model.first.requires_grad_(False)
    return model


def _run_phases(run: _Run, state: dict, saved: dict | None) -> None:
    """Both phases from `state` on, with SIGINT/SIGTERM turned into a checkpoint and Interrupted."""
    def on_signal(signum, _frame):
        run.stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading_main() else {}
    try:
        phases = [run.cfg.phase1, run.cfg.phase2]
        while state["phase"] < len(phases) and not state["done"]:
            p_idx = state["phase"]
            p = phases[p_idx]
            if p.epochs > 0:
                _run_phase(run, p, p_idx, state, saved)
            saved = None
            if p_idx + 1 < len(phases):
                state.update(phase=p_idx + 1, epoch=0, step=0, best=-1.0, best_state=None, bad_epochs=0)
            else:
                state["done"] = True
            if run.rank == 0:
                _save_checkpoint(run.run_dir / "checkpoint.pt", run.model, None, state, run.meta)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _first_stage_meta(path: str | Path, preprocess: PreprocessSettings) -> dict:
    """Metadata of a cascade's first-stage model file, refused unless it is a TwoPathCNN trained
    with `preprocess` (the cascade's), since both stages see the same preprocessed inputs."""
    first, meta = ckpt.load_model(path)
    if not isinstance(first, TwoPathCNN):
        raise TumorsegInputError(path, f"a cascade's first stage must be a TwoPathCNN (two_path, "
                                       f"local_path or global_path), not {meta['model']!r}")
    ckpt.check_first_stage_preprocess(path, meta.get("preprocess"), preprocess.to_dict())
    return meta


def state_digest(state_dict: dict) -> str:
    """sha256 of a state dict's tensors (names, dtypes, shapes and bytes), in key order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _truncate_metrics(path: Path, phase: int, epoch: int, step: int) -> None:
    """Drop log lines written after the checkpoint a resumed run restarts from (0-based `phase`,
    `epoch` = epochs completed, `step`). A step's row is written before that step's checkpoint,
    an epoch's row (the one with patches_per_s) before the checkpoint that completes the epoch."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: dropped, the run rewrites its rows
            continue
        p = row["phase"] - 1
        done = row["epoch"] <= epoch if "patches_per_s" in row else row["step"] <= step
        if p < phase or (p == phase and done):
            keep.append(line)
    with atomic_write(path) as tmp:
        tmp.write_text("".join(k + "\n" for k in keep))


def _save_checkpoint(path, model, optimizer, state, meta) -> None:
    payload = {**meta, "state_dict": model.state_dict(), **state}
    payload["optimizer"] = optimizer.state_dict() if optimizer is not None else None
    ckpt.save(path, payload)


@dataclass
class _Run:
    """What the phases of one training run share."""

    cfg: TrainConfig
    model: torch.nn.Module
    data: SliceData
    val_cases: list
    meta: dict
    run_dir: Path
    device: str
    rank: int
    world: int
    progress: bool
    stop: dict  # {"signal": None | signum}, set by the signal handler
    log: Callable[[str], object]
    rates: list = field(default_factory=lambda: [None, None])  # measured s/step per phase


def _lr_at(p: PhaseConfig, epoch: int, step: int) -> float:
    """Learning rate of `step` (0-based, within the phase) in `epoch`."""
    if p.schedule == "linear":
        return _schedule(p, epoch)[0]
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    total = max(p.epochs * p.steps_per_epoch - p.warmup_steps, 1)
    t = min((step - p.warmup_steps) / total, 1.0)
    low = p.lr * p.lr_decay
    return low + 0.5 * (p.lr - low) * (1.0 + math.cos(math.pi * t))


def _optimizer(p: PhaseConfig, params: list) -> torch.optim.Optimizer:
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum[0])
    if p.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    return torch.optim.Adam(params, lr=p.lr)


def soft_dice_loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """1 - mean over the three regions of the soft Dice on the pixels with w > 0.

    logits [N, 5, T, T]; y [N, T, T] canonical classes; w [N, T, T] loss weights. One Dice per
    region over the whole batch (batch Dice), smoothed by 1 so tumour-free batches are defined.
    """
    probs = torch.softmax(logits, dim=1)
    valid = (w > 0).to(probs.dtype)
    terms = []
    for classes in CANONICAL_REGIONS.values():
        pr = probs[:, list(classes)].sum(1) * valid
        gt = torch.isin(y, torch.tensor(classes, device=y.device)).to(probs.dtype) * valid
        terms.append((2 * (pr * gt).sum() + 1) / (pr.sum() + gt.sum() + 1))
    return 1 - torch.stack(terms).mean()


@dataclass
class _Phase:
    """What the steps and epochs of one phase share."""

    cfg: PhaseConfig
    index: int  # 0 or 1
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    params: list  # trainable parameters
    opt: torch.optim.Optimizer
    sampler: Sampler
    val_weights: np.ndarray | None  # prior correction of validation probabilities, or None
    start_time: float
    start_step: int


def _start_phase(run: _Run, p: PhaseConfig, p_idx: int, state: dict, saved: dict | None) -> _Phase:
    """Freeze all but the phase's trainable layers; optimiser (restored from `saved`), sampler."""
    model = run.model
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = model.output_layer() if p.output_layer_only else \
        (model.second if isinstance(model, Cascade) else model)
    trainable.requires_grad_(True)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = _optimizer(p, params)
    if saved is not None and saved.get("optimizer") is not None:
        opt.load_state_dict(saved["optimizer"])
    net = torch.nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    sampler = Sampler(run.data, model.receptive_field, p.tile, p.sampling, p.healthy_share,
                      p.border_share, p.border_mm)
    # Balanced sampling teaches a uniform class prior; validation scores the natural posterior.
    val_weights = prior_correction(sampler.class_freq) if p.sampling == "balanced" else None
    return _Phase(p, p_idx, net, params, opt, sampler, val_weights, time.time(), state["step"])


def _set_train_mode(model: torch.nn.Module, output_layer_only: bool) -> None:
    model.train()
    if output_layer_only:  # frozen layers keep their batch-norm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _step(run: _Run, ph: _Phase, step: int, lr: float, mom: float) -> float:
    """One optimiser step of the phase (`step` 0-based within it); returns the batch's loss,
    the same on every rank. Its random draws depend only on (seed, phase, step)."""
    p, seed = ph.cfg, run.cfg.seed
    for group in ph.opt.param_groups:
        group["lr"] = lr
        if p.optimizer == "sgd":
            group["momentum"] = mom
    rng = np.random.default_rng(_step_seed(seed, ph.index, step))
    torch.manual_seed(int(np.random.SeedSequence(_step_seed(seed, ph.index, step)).generate_state(1)[0]))
    anchors = ph.sampler.anchors(rng, p.batch_size)
    aug = run.cfg.augment
    if aug.rotate > 0:  # drawn only then, so runs without rotation keep their random streams
        angles = np.deg2rad(rng.uniform(-aug.rotate, aug.rotate, len(anchors)))
        images, labels, weights, window = ph.sampler.rotated(anchors, angles)
    else:
        labels, weights = ph.sampler.targets(anchors)
        images = ph.sampler.images(anchors)
        window = ph.sampler.window_labels(anchors) if aug.oedema > 0 else None
    if aug.enabled:
        images, labels, weights = augment(images, labels, weights, rng, aug, window)
    mine = list(range(run.rank, p.batch_size, run.world))
    x, y, w = (torch.from_numpy(np.ascontiguousarray(a[mine])).to(run.device)
               for a in (images, labels, weights))
    logits = ph.net(x)  # [n, 5, T, T]
    loss = (F.cross_entropy(logits, y, reduction="none") * w).sum() * run.world
    if p.loss == "ce_dice":  # per rank's share under torchrun: not the global batch Dice
        loss = loss + p.dice_weight * soft_dice_loss(logits, y, w)
    if p.l1 or p.l2:
        kernels = _kernels(ph.params)
        loss = loss + p.l1 * sum(k.abs().sum() for k in kernels) \
            + p.l2 * sum((k * k).sum() for k in kernels)
    ph.opt.zero_grad(set_to_none=True)
    loss.backward()
    if p.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(ph.params, p.grad_clip)
    ph.opt.step()
    if p.max_norm > 0:
        with torch.no_grad():
            for k in _kernels(ph.params):
                k.copy_(torch.renorm(k, 2, 0, p.max_norm))
    # Rank r holds world x (its share of the batch-normalised CE) + the regularisers (and its
    # share's Dice): the mean over ranks is the CE of the whole batch plus the same terms, i.e.
    # what one process logs, and the loss whose gradient DDP averages.
    logged = loss.detach().clone()
    if run.world > 1:
        torch.distributed.all_reduce(logged)
    return float(logged) / run.world


def _validate_epoch(run: _Run, ph: _Phase, state: dict, row: dict) -> None:
    """Score the validation cases, add `val_dice_*` to `row`, track the best epoch."""
    t_val = time.time()
    rows = validate_cases(run.model, run.val_cases, run.cfg.data.val_slices, run.device, ph.val_weights)
    scores = _mean_scores(rows)
    # what the run's final summary would compute again, if these weights are the last
    state["last_val"] = None if ph.val_weights is not None else \
        {"phase": ph.index, "step": state["step"], "rows": rows}
    row.update({f"val_dice_{r}": v for r, v in scores.items()})
    row["val_seconds"] = round(time.time() - t_val, 1)
    if scores["mean"] > state["best"]:
        state["best"], state["bad_epochs"] = scores["mean"], 0
        if ph.cfg.keep == "best":
            state["best_state"] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    else:
        state["bad_epochs"] += 1


def _log_epoch(run: _Run, ph: _Phase, state: dict, row: dict) -> None:
    """Append the epoch's row to metrics.jsonl, print it with the run's ETA, redraw curves.png."""
    metrics_path = run.run_dir / "metrics.jsonl"
    _append(metrics_path, row)
    # this phase's seconds per step so far in this process, validations included
    run.rates[ph.index] = (time.time() - ph.start_time) / max(state["step"] - ph.start_step, 1)
    eta = format_duration(eta_seconds(_steps_left(run, ph.index, state), run.rates))
    run.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items()) + f" eta={eta}")
    _write_curves(metrics_path, run)


def _run_epoch(run: _Run, ph: _Phase, state: dict) -> dict:
    """The steps of the current epoch that are not done yet; returns the epoch's metrics row."""
    from tqdm import tqdm

    p, epoch = ph.cfg, state["epoch"]
    main_rank = run.rank == 0
    _, mom = _schedule(p, epoch)
    _set_train_mode(run.model, p.output_layer_only)
    bar = tqdm(total=p.steps_per_epoch, initial=state["step"] % p.steps_per_epoch,
               desc=f"phase {ph.index + 1} epoch {epoch + 1}/{p.epochs}", unit="step",
               disable=not (run.progress and sys.stderr.isatty() and main_rank), leave=False)
    t_epoch, n_seen = time.time(), 0
    lr = _lr_at(p, epoch, max(state["step"] - 1, 0))  # logged if the epoch's steps are all done
    ckpt_path = run.run_dir / "checkpoint.pt"
    while state["step"] < (epoch + 1) * p.steps_per_epoch:
        lr = _lr_at(p, epoch, state["step"])
        loss_value = state["loss"] = _step(run, ph, state["step"], lr, mom)
        state["step"] += 1
        n_seen += p.batch_size * p.tile * p.tile
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", patches_s=f"{n_seen / (time.time() - t_epoch):.0f}")
        if main_rank and (state["step"] % 10 == 0 or state["step"] == 1):
            _append(run.run_dir / "metrics.jsonl", {"phase": ph.index + 1, "epoch": epoch + 1,
                                                    "step": state["step"], "loss": loss_value,
                                                    "lr": lr, "momentum": mom})
        if run.stop["signal"] is not None:
            if main_rank:
                _save_checkpoint(ckpt_path, run.model, ph.opt, state, run.meta)
            raise Interrupted(f"signal {run.stop['signal']}: checkpoint saved to {ckpt_path}; "
                              f"continue with --resume")
        if main_rank and run.cfg.checkpoint_every and state["step"] % run.cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt_path, run.model, ph.opt, state, run.meta)
    bar.close()
    state["epoch"] = epoch + 1
    return {"phase": ph.index + 1, "epoch": epoch + 1, "step": state["step"], "loss": state["loss"],
            "lr": lr, "patches_per_s": round(n_seen / max(time.time() - t_epoch, 1e-9), 1)}


def _run_phase(run: _Run, p: PhaseConfig, p_idx: int, state: dict, saved: dict | None) -> None:
    """Train phase `p_idx` from `state` (a resumed run's position) to its last epoch or its
    early stop; checkpoint after every epoch; record the phase in state["phase_log"]."""
    ph = _start_phase(run, p, p_idx, state, saved)
    main_rank = run.rank == 0
    while state["epoch"] < p.epochs:
        row = _run_epoch(run, ph, state)
        due = state["epoch"] % max(run.cfg.data.val_every, 1) == 0 or state["epoch"] == p.epochs
        if run.val_cases and due:
            _validate_epoch(run, ph, state, row)
        if main_rank:
            _log_epoch(run, ph, state, row)
        if p.patience and state["bad_epochs"] >= p.patience:
            run.log(f"phase {p_idx + 1}: early stop after epoch {state['epoch']} (no gain for "
                    f"{p.patience} validations)")
            break
        if main_rank:
            _save_checkpoint(run.run_dir / "checkpoint.pt", run.model, ph.opt, state, run.meta)
    if state["best_state"] is not None:
        run.model.load_state_dict(state["best_state"])  # early stopping keeps the best epoch's weights
        state["last_val"] = None
    state["phase_log"].append({"phase": p_idx + 1, "sampling": p.sampling, "epochs": state["epoch"],
                               "steps": state["step"], "best_val_dice_mean": state["best"],
                               "seconds": round(time.time() - ph.start_time, 1)})


def _steps_left(run: _Run, p_idx: int, state: dict) -> list[int]:
    """Steps still to run in each phase (early stopping may end a phase sooner)."""
    phases = [run.cfg.phase1, run.cfg.phase2]
    return [0 if i < p_idx else
            (ph.epochs * ph.steps_per_epoch - (state["step"] if i == p_idx else 0))
            for i, ph in enumerate(phases)]


def _write_curves(metrics_path: Path, run: _Run) -> None:
    """curves.png beside metrics.jsonl; a plotting failure costs the picture, not the run."""
    try:
        plot_curves(metrics_path, run.run_dir / "curves.png")
    except Exception as exc:  # noqa: BLE001 - matplotlib missing fonts, a full disk, ...
        run.log(f"warning: curves.png not written: {one_line(exc)}")


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
