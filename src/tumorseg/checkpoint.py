"""Saving and loading models: training checkpoints and portable model files.

A model file is a dict with the architecture (registry name and options; a cascade's first
stage's full TwoPathConfig and its preprocessing settings), the weights, and what segmentation
needs to reproduce training: the preprocessing settings and the label convention of the
training data. Writes are atomic.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from tumorseg.errors import TumorsegInputError
from tumorseg.io import atomic_write
from tumorseg.models import Cascade, build_model

FORMAT = "tumorseg-model-v1"


def describe(model: torch.nn.Module, name: str, options: dict) -> dict:
    """Architecture description stored with weights."""
    meta = {"format": FORMAT, "model": name, "model_options": dict(options),
            "receptive_field": model.receptive_field}
    if isinstance(model, Cascade):  # every field: a first stage unlike the defaults rebuilds
        meta["first_options"] = dataclasses.asdict(model.first.cfg)
    return meta


def _tuples(options: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def build_from_meta(meta: dict) -> torch.nn.Module:
    """Instantiate the architecture a model file describes (weights not loaded)."""
    # Files written before `freeze_first` was removed may carry it; the first stage was frozen
    # in every training run regardless of its value.
    options = _tuples({k: v for k, v in meta["model_options"].items() if k != "freeze_first"})
    if "first_options" in meta:  # older files hold 3 fields; the rest were the defaults
        model = build_model(meta["model"], **options)
        model.first = build_model("two_path", **_tuples(meta["first_options"]))
        model.first.requires_grad_(False)
        return model
    return build_model(meta["model"], **options)


def check_first_stage_preprocess(where: str | Path, first: dict | None,
                                 cascade: dict | None) -> None:
    """Refuse a cascade whose first stage was trained on inputs preprocessed otherwise (`first`,
    `cascade`: PreprocessSettings dicts): it would see intensities unlike its training data."""
    from tumorseg.preprocess import PreprocessSettings

    if first is None or cascade is None:
        raise TumorsegInputError(where, "a cascade's first stage must record its preprocessing "
                                        "settings, to be checked against the cascade's")
    try:
        a, b = PreprocessSettings.from_dict(first), PreprocessSettings.from_dict(cascade)
    except (TumorsegInputError, TypeError) as exc:
        raise TumorsegInputError(where, f"unreadable preprocessing settings: {exc}") from None
    # N4's own settings change nothing while neither side corrects.
    ignore = () if a.n4 or b.n4 else ("n4_shrink", "n4_iterations", "n4_modalities")
    differ = [f"{f.name} {getattr(a, f.name)} vs {getattr(b, f.name)}"
              for f in dataclasses.fields(a)
              if f.name not in ignore and getattr(a, f.name) != getattr(b, f.name)]
    if differ:
        raise TumorsegInputError(where, "a cascade's first stage must be trained with the "
                                        "cascade's preprocessing; first stage vs cascade: "
                                        + "; ".join(differ))


def save(path: str | Path, payload: dict) -> Path:
    """torch.save `payload` atomically."""
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_model(path: str | Path, expected_sha256: str | None = None,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load a model file or training checkpoint -> (model in eval mode, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise TumorsegInputError(path, "model file does not exist")
    if expected_sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected_sha256:
            raise TumorsegInputError(path, f"sha256 {digest[:12]}... does not match the released "
                                           f"{expected_sha256[:12]}...; the file is corrupt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise TumorsegInputError(path, f"not a readable tumorseg model ({type(exc).__name__}; "
                                       "only tensors and plain settings are loaded)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TumorsegInputError(path, f"not a tumorseg model file (format {FORMAT} expected)")
    if "first_preprocess" in payload:  # absent from files written before it was recorded
        check_first_stage_preprocess(path, payload["first_preprocess"], payload.get("preprocess"))
    model = build_from_meta(payload)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    model.load_state_dict(state)
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "optimizer", "best_state")}
    return model.to(device).eval(), meta
