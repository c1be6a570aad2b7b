"""Valid convolution with a fast backward, and the maxout convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ValidConvFn(torch.autograd.Function):
    """conv2d (valid, stride 1) whose gradients are computed as forward convolutions.

    oneDNN's backward kernels for the large 13x13 and 21x21 kernels are an order of magnitude
    slower than its forward ones on a CPU; the same gradients written as forward convolutions
    are exact up to float rounding:
      d/dx = conv2d(pad(g, k-1), flip(W)^T)          (a full convolution)
      d/dW = conv2d(x^T, g^T)^T                      (batch and channel axes swapped)
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        k, l = weight.shape[-2:]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            w_t = weight.flip(-2, -1).transpose(0, 1)  # [C, O, k, l]
            gx = F.conv2d(F.pad(g, (l - 1, l - 1, k - 1, k - 1)), w_t)
        if ctx.needs_input_grad[1]:
            gw = F.conv2d(x.transpose(0, 1), g.transpose(0, 1)).transpose(0, 1)  # [O, C, k, l]
        if ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb


class ValidConv2d(nn.Conv2d):
    """nn.Conv2d (valid, stride 1) with the fast backward above; same parameters and state."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__(in_channels, out_channels, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _ValidConvFn.apply(x, self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias)


class MaxoutConv2d(nn.Module):
    """A 'valid' convolution to `out_channels * pieces` maps, then the max over each group of K.

    Input [B, C_in, H, W] -> output [B, C_out, H - k + 1, W - k + 1]. With `batchnorm`, the
    K*C_out pre-activations are batch-normalised before the max (the Keras variant's choice).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, pieces: int = 2,
                 batchnorm: bool = False):
        super().__init__()
        self.out_channels, self.pieces, self.kernel = out_channels, pieces, kernel
        self.conv = ValidConv2d(in_channels, out_channels * pieces, kernel)
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
