"""Model registry: a plain dict of builder functions, and the dense whole-slice path."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tumorseg.errors import TumorsegInputError
from tumorseg.models.cascades import Cascade
from tumorseg.models.two_path import PATCH, TwoPathCNN, TwoPathConfig

__all__ = ["MODELS", "build_model", "check_options", "dense_logits", "dense_padding", "Cascade", "TwoPathCNN",
           "TwoPathConfig", "PATCH", "params_total"]


def _config(**options) -> TwoPathConfig:
    names = {f.name for f in dataclasses.fields(TwoPathConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TumorsegInputError(None, f"unknown model option(s) {unknown}; valid: {sorted(names)}")
    return TwoPathConfig(**options)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "local_path": lambda **o: TwoPathCNN(_config(**{**o, "paths": ("local",)})),
    "global_path": lambda **o: TwoPathCNN(_config(**{**o, "paths": ("global",)})),
    "two_path": lambda **o: TwoPathCNN(_config(**o)),
    "input_cascade": lambda **o: Cascade("input", None, _config(**o)),
    "local_cascade": lambda **o: Cascade("local", None, _config(**o)),
    "mf_cascade": lambda **o: Cascade("output", None, _config(**o)),
}


def check_options(name: str, options: dict) -> None:
    """Raise (TumorsegInputError or ValueError, one line) unless `name` is a registered model and
    `options` valid TwoPathConfig fields for it: a config is checked when it is read, not after
    its cases are preprocessed."""
    _builder(name)
    _config(**options)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in MODELS:
        raise TumorsegInputError(None, f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, **options) -> nn.Module:
    """Build a registered model; `options` are TwoPathConfig fields (a cascade's: its second
    stage's; its first stage is built from the second's options until a trained one replaces it)."""
    return _builder(name)(**options)


def params_total(model: nn.Module) -> int:
    """All trainable parameters (biases and every maxout piece included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def dense_padding(receptive_field: int) -> tuple[int, int]:
    """Zero padding (before, after) so that a dense output has the input's size.

    The patch 'centred' on pixel i spans [i - rf//2, i - rf//2 + rf); for an even receptive
    field it has one more pixel before the centre than after.
    """
    before = receptive_field // 2
    return before, receptive_field - 1 - before


def dense_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Whole-slice logits: x [B, C, H, W] -> [B, 5, H, W].

    Pixel (i, j) of the result equals the model's output for the patch centred on (i, j) of the
    zero-padded slice (see `dense_padding`).
    """
    before, after = dense_padding(model.receptive_field)
    return model(F.pad(x, (before, after, before, after)))
