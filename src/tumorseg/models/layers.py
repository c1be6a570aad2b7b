"""Maxout convolution: the paper's only hidden-layer activation."""

from __future__ import annotations

import torch
from torch import nn


class MaxoutConv2d(nn.Module):
    """A 'valid' convolution to `out_channels * pieces` maps, then the max over each group of K.

    Input [B, C_in, H, W] -> output [B, C_out, H - k + 1, W - k + 1]. With `batchnorm`, the
    K*C_out pre-activations are batch-normalised before the max (the Keras variant's choice).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, pieces: int = 2,
                 batchnorm: bool = False):
        super().__init__()
        self.out_channels, self.pieces, self.kernel = out_channels, pieces, kernel
        self.conv = nn.Conv2d(in_channels, out_channels * pieces, kernel)
        self.norm = nn.BatchNorm2d(out_channels * pieces) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.conv(x))  # [B, C_out*K, H', W']
        b, _, h, w = z.shape
        # Channel c*K + k is piece k of map c.
        return z.view(b, self.out_channels, self.pieces, h, w).amax(dim=2)

    @property
    def paper_weights(self) -> int:
        """Kernel weights as the paper counts them: one maxout piece, no bias."""
        return self.conv.weight.numel() // self.pieces
