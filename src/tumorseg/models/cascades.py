"""The three cascades of Havaei et al. (2017), Fig. 3, as one composition.

A first TwoPathCNN sees a larger window; its softmax output joins a second TwoPathCNN at the
input ('input'), after the first local hidden layer ('local') or before the output layer
('output'). The first stage's output grid must match the second's map at the join point,
which fixes the cascade's receptive field: 65 (input), 56 (local) and 53 (output).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tumorseg.models.two_path import LOCAL1_RF, N_CLASSES, PATCH, FEATURE_RF, TwoPathCNN, TwoPathConfig

# Spatial size of the second stage's map at each join point, for a 33x33 patch.
JOIN_GRID = {"input": PATCH, "local": PATCH - LOCAL1_RF + 1, "output": PATCH - FEATURE_RF + 1}


class Cascade(nn.Module):
    """Input [B, 4, S, S'] -> logits [B, 5, S - rf + 1, S' - rf + 1].

    The first stage is frozen, as in the paper: eval mode (no dropout, fixed batch-norm
    statistics) even while the second stage trains, and no gradient (whoever replaces `first`
    with a trained TwoPathCNN freezes it: train.py, checkpoint.build_from_meta).
    """

    def __init__(self, join: str, first: TwoPathCNN | None = None,
                 second_cfg: TwoPathConfig = TwoPathConfig()):
        super().__init__()
        if join not in JOIN_GRID:
            raise ValueError(f"join must be one of {sorted(JOIN_GRID)}, got {join!r}")
        self.join = join
        self.first = first if first is not None else TwoPathCNN(TwoPathConfig(
            pieces=second_cfg.pieces, dropout=second_cfg.dropout, batchnorm=second_cfg.batchnorm,
            init=second_cfg.init))
        extra = {"input": "in_channels", "local": "local_extra", "output": "head_extra"}[join]
        base = second_cfg.in_channels if join == "input" else 0
        self.second = TwoPathCNN(dataclasses.replace(second_cfg, **{extra: base + N_CLASSES}))
        self.receptive_field = self.patch_size = JOIN_GRID[join] + PATCH - 1
        # Where the second stage's window sits inside the cascade's window (floor for even rf:
        # the local join grid has a half-pixel centre, so the stages align to within 1/2 voxel).
        self.offset = (self.receptive_field - PATCH) // 2
        self.first.requires_grad_(False)

    def train(self, mode: bool = True) -> "Cascade":
        super().train(mode)
        self.first.eval()  # a frozen stage keeps dropout off and batch-norm statistics fixed
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, t = x.shape[-2:]
        probs = torch.softmax(self.first(x), dim=1)  # [B, 5, S-32, S'-32]
        o, r = self.offset, self.receptive_field - PATCH
        x2 = x[..., o:o + s - r, o:o + t - r]  # the second stage's window: [B, 4, S-r, S'-r]
        return self.second_stage(x2, probs)

    def second_stage(self, x2: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The second CNN on its window x2 [B, 4, S-r, S'-r] and the first stage's softmax
        probs [B, 5, S-32, S'-32] (see forward) -> logits [B, 5, S-rf+1, S'-rf+1]. Inference
        runs the stages one after the other over a whole volume (infer.predict_labels)."""
        if self.join == "input":
            return self.second(torch.cat([x2, probs], 1))  # 9 input channels
        return self.second(x2, extra=probs)

    @property
    def params_paper(self) -> int:
        """The paper counts only the second CNN of a cascade."""
        return self.second.params_paper

    def output_layer(self) -> nn.Module:
        return self.second.head
