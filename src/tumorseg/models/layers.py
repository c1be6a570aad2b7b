"""The layers of the Havaei networks; how they are computed is `fastconv`'s business."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tumorseg.models import fastconv


class ValidConv2d(nn.Conv2d):
    """nn.Conv2d (valid, stride 1; same parameters and state) computed by `fastconv.conv2d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__(in_channels, out_channels, kernel)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """x [B, C, H, W], or a list of maps whose channel concatenation has C channels."""
        return fastconv.conv2d(x, self.weight, self.bias)


class MaxPool(nn.Module):
    """k x k max pooling with stride 1 (`fastconv.max_pool`): [B, C, H, W] -> [B, C, H-k+1, W-k+1]."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fastconv.max_pool(x, self.kernel)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride=1"


def dropout_noise(shape: Sequence[int], p: float, like: torch.Tensor) -> torch.Tensor:
    """Dropout's scaled keep mask of `shape`: 1 / (1 - p) with probability 1 - p, else 0.

    Drawn as U[0, 1) < 1 - p from the default generator. Not bernoulli_: on a CPU that is
    single-threaded and about 3x slower, a tenth of a two_path training step."""
    noise = like.new_empty(shape).uniform_()
    return noise.lt_(1 - p).mul_(1 / (1 - p))


class ConcatDropout(nn.Module):
    """Dropout of the channel concatenation of a list of maps, returned as the list of its parts
    (the concatenation is never materialised). Bitwise equal to the concatenation times one
    `dropout_noise` tensor, split back; the plain engine computes exactly that."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.training or self.p == 0:
            return list(xs)
        b, _, h, w = xs[0].shape
        channels = [x.shape[1] for x in xs]
        noise = dropout_noise((b, sum(channels), h, w), self.p, xs[0])
        if fastconv.current().mode == "plain":  # the reference: one concatenated tensor
            return [torch.cat(list(xs), 1) * noise]
        return [x * n for x, n in zip(xs, noise.split(channels, 1))]

    def extra_repr(self) -> str:
        return f"p={self.p}"


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
        if isinstance(self.norm, nn.Identity):  # one engine call: it may fuse the max
            return fastconv.conv2d_maxout(x, self.conv.weight, self.conv.bias, self.pieces)
        z = self.norm(self.conv(x))  # [B, C_out*K, H', W']
        return fastconv.maxout(z, self.pieces)  # channel c*K + k is piece k of map c

    @property
    def paper_weights(self) -> int:
        """Kernel weights as the paper counts them: one maxout piece, no bias."""
        return self.conv.weight.numel() // self.pieces
