"""Saving and loading models: training checkpoints and portable model files.

A model file is a dict with the architecture (registry name and options, and the first stage's
options for a cascade), the weights, and what segmentation needs to reproduce training: the
preprocessing settings and the label convention of the training data. Writes are atomic.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tumorseg.errors import TumorsegInputError
from tumorseg.io import atomic_write
from tumorseg.models import Cascade, build_model
from tumorseg.models.two_path import TwoPathCNN

FORMAT = "tumorseg-model-v1"


def describe(model: torch.nn.Module, name: str, options: dict) -> dict:
    """Architecture description stored with weights."""
    meta = {"format": FORMAT, "model": name, "model_options": dict(options),
            "receptive_field": model.receptive_field}
    if isinstance(model, Cascade):
        meta["first_options"] = _options_of(model.first)
    return meta


def _options_of(model: TwoPathCNN) -> dict:
    cfg = model.cfg
    return {"pieces": cfg.pieces, "dropout": cfg.dropout, "batchnorm": cfg.batchnorm}


def build_from_meta(meta: dict) -> torch.nn.Module:
    """Instantiate the architecture a model file describes (weights not loaded)."""
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_options"].items()}
    if "first_options" in meta:
        first = build_model("two_path", **meta["first_options"])
        model = build_model(meta["model"], **options)
        model.first = first
        model.first.requires_grad_(not model.freeze_first)
        return model
    return build_model(meta["model"], **options)


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
    model = build_from_meta(payload)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    model.load_state_dict(state)
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "optimizer", "best_state")}
    return model.to(device).eval(), meta
