"""TwoPathCNN of Havaei et al. (2017), Fig. 2, and its one-path variants.

One configurable module: `paths` selects local, global or both; `in_channels`, `local_extra`
and `head_extra` are the three points where a cascade's first-stage probabilities can join.
All convolutions are 'valid' and all pooling has stride 1, so the network is fully
convolutional: a 33x33 patch gives one output, a larger input gives a dense map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tumorseg.models.layers import ConcatDropout, MaxoutConv2d, MaxPool, ValidConv2d

N_CLASSES = 5
# (kernel, pool) per local layer, the global kernel and the output kernel: the whole geometry.
LOCAL_LAYERS = ((7, 4), (3, 2))
GLOBAL_KERNEL = 13
HEAD_KERNEL = 21


def _rf(*kernels: int) -> int:
    """Receptive field of stacked stride-1 windows."""
    return 1 + sum(k - 1 for k in kernels)


# Spatial size of the first local hidden layer's receptive field (conv 7 + pool 4): a cascade
# joining there sees the first stage's output on a (PATCH - LOCAL1_RF + 1)^2 grid.
LOCAL1_RF = _rf(*LOCAL_LAYERS[0])
FEATURE_RF = _rf(*(k for layer in LOCAL_LAYERS for k in layer))
assert FEATURE_RF == GLOBAL_KERNEL, "local and global paths must end on the same grid"
PATCH = _rf(FEATURE_RF, HEAD_KERNEL)  # 33


@dataclass(frozen=True)
class TwoPathConfig:
    """Architecture options. `dropout` acts before the output layer (the paper gives no rate)."""

    paths: tuple[str, ...] = ("local", "global")
    in_channels: int = 4
    local_extra: int = 0  # maps joined after the first local hidden layer (LocalCascade)
    head_extra: int = 0  # maps joined before the output layer (MFCascade)
    pieces: int = 2  # maxout K
    local_maps: tuple[int, int] = (64, 64)
    global_maps: int = 160
    dropout: float = 0.5
    batchnorm: bool = False
    init: str = "paper"  # "paper": U(-0.005, 0.005); "default": PyTorch's
    class_freq: tuple[float, ...] | None = None  # softmax biases = log(freq) under paper init

    def __post_init__(self) -> None:
        if not self.paths or set(self.paths) - {"local", "global"}:
            raise ValueError(f"paths must be a non-empty subset of ('local', 'global'), got {self.paths}")
        if self.local_extra and "local" not in self.paths:
            raise ValueError("local_extra needs the local path")
        if self.init not in ("paper", "default"):
            raise ValueError(f"init must be 'paper' or 'default', got {self.init!r}")


class TwoPathCNN(nn.Module):
    """Input [B, in_channels, S, S'] -> logits [B, 5, S - 32, S' - 32] (patch 33 -> 1x1)."""

    receptive_field = PATCH
    patch_size = PATCH

    def __init__(self, cfg: TwoPathConfig = TwoPathConfig()):
        super().__init__()
        self.cfg = cfg
        (k1, p1), (k2, p2) = LOCAL_LAYERS
        features = cfg.head_extra
        if "local" in cfg.paths:
            m1, m2 = cfg.local_maps
            self.local1 = MaxoutConv2d(cfg.in_channels, m1, k1, cfg.pieces, cfg.batchnorm)
            self.pool1 = MaxPool(p1)
            self.local2 = MaxoutConv2d(m1 + cfg.local_extra, m2, k2, cfg.pieces, cfg.batchnorm)
            self.pool2 = MaxPool(p2)
            features += m2
        if "global" in cfg.paths:
            self.global1 = MaxoutConv2d(cfg.in_channels, cfg.global_maps, GLOBAL_KERNEL, cfg.pieces,
                                        cfg.batchnorm)
            features += cfg.global_maps
        self.dropout = ConcatDropout(cfg.dropout)
        self.head = ValidConv2d(features, N_CLASSES, HEAD_KERNEL)
        if cfg.init == "paper":
            self._paper_init()

    def _paper_init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.uniform_(m.weight, -0.005, 0.005)
                nn.init.zeros_(m.bias)
        if self.cfg.class_freq is not None:
            with torch.no_grad():
                self.head.bias.copy_(torch.tensor([math.log(max(f, 1e-4)) for f in self.cfg.class_freq]))

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, S, S']; extra: first-stage probabilities at this model's join point."""
        feats = []
        if "local" in self.cfg.paths:
            h = self.pool1(self.local1(x))  # [B, 64, S-9, S'-9]
            if self.cfg.local_extra:
                h = torch.cat([h, extra], 1)  # [B, 64+5, S-9, S'-9]
            feats.append(self.pool2(self.local2(h)))  # [B, 64, S-12, S'-12]
        if "global" in self.cfg.paths:
            feats.append(self.global1(x))  # [B, 160, S-12, S'-12]
        if self.cfg.head_extra:
            feats.append(extra)  # [B, 5, S-12, S'-12]
        # The head convolves the channel concatenation [B, 224 (+5), S-12, S'-12] of the list.
        return self.head(self.dropout(feats))  # [B, 5, S-32, S'-32]

    @property
    def params_paper(self) -> int:
        """Kernel weights counted as the paper counts them (no biases, one maxout piece)."""
        hidden = sum(m.paper_weights for m in self.modules() if isinstance(m, MaxoutConv2d))
        return hidden + self.head.weight.numel()

    def output_layer(self) -> nn.Module:
        """The layer that phase 2 of two-phase training retrains."""
        return self.head
