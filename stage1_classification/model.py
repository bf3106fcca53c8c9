"""Multi-view classifier: shared timm backbone, view embeddings, per-breast CC+MLO fusion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mammorg.labels import BIRADS_CLASSES, DENSITIES, DESCRIPTORS, FINDINGS
from mammorg.training.checkpoint import load_tensors
from stage1_classification.config import Stage1Model


class MultiViewClassifier(nn.Module):
    """Input ``images [B, 4, 1, H, W]`` (views L_CC, L_MLO, R_CC, R_MLO) and ``view_mask [B, 4]``."""

    def __init__(
        self,
        backbone: str = "resnet10t",
        dim: int = 128,
        tokens: tuple[int, int] = (4, 2),
        heads: int = 4,
        dropout: float = 0.1,
        pretrained_path: str | None = None,
        backbone_kwargs: dict | None = None,
        descriptor_heads: bool = False,
    ):
        super().__init__()
        self.backbone: Any = timm.create_model(
            backbone, pretrained=False, in_chans=1, num_classes=0, global_pool="", **(backbone_kwargs or {})
        )
        if pretrained_path:
            state = load_tensors(Path(pretrained_path))
            self.backbone.load_state_dict(state, strict=False)
        self.tokens: tuple[int, int] = (int(tokens[0]), int(tokens[1]))
        self.proj = nn.Linear(int(getattr(self.backbone, "num_features")), dim)  # noqa: B009
        self.view_embed = nn.Parameter(torch.zeros(4, 1, dim))
        nn.init.normal_(self.view_embed, std=0.02)
        self.fusion = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True)
        self.density_head = nn.Linear(2 * dim, len(DENSITIES))
        self.birads_head = nn.Linear(dim, len(BIRADS_CLASSES))
        self.finding_head = nn.Linear(dim, len(FINDINGS))
        self.descriptor_heads = nn.ModuleDict(
            {name: nn.Linear(dim, len(classes)) for name, classes in DESCRIPTORS.items()}
            if descriptor_heads
            else {}
        )
        self.dim = dim

    def view_tokens(self, images: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """Feature tokens ``[B, 4, N, D]`` for present views (missing views stay zero)."""
        b = images.shape[0]
        n = self.tokens[0] * self.tokens[1]
        out = images.new_zeros(b, 4, n, self.dim)
        present = view_mask.bool()
        if not present.any():
            raise ValueError("an exam with no usable view cannot be classified")
        feats = self.backbone.forward_features(images[present])
        feats = F.adaptive_avg_pool2d(feats, self.tokens).flatten(2).transpose(1, 2)
        out[present] = self.proj(feats).to(out.dtype)
        return out

    def forward(self, images: torch.Tensor, view_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.view_tokens(images, view_mask)
        b, _, n, d = tokens.shape
        tokens_e = tokens + self.view_embed.unsqueeze(0)
        breasts = []
        for side in range(2):
            seq = tokens_e[:, 2 * side : 2 * side + 2].reshape(b, 2 * n, d)
            pad = ~view_mask[:, 2 * side : 2 * side + 2].bool().repeat_interleave(n, dim=1)
            pad_all = pad.all(dim=1)
            pad = pad.clone()
            pad[pad_all] = False  # a breast with no view attends to zeros; its labels are masked
            fused = self.fusion(seq, src_key_padding_mask=pad)
            keep = (~pad).float().unsqueeze(-1)
            breasts.append((fused * keep).sum(1) / keep.sum(1).clamp_min(1.0))
        breast = torch.stack(breasts, 1)  # [B, 2, D]  (L, R)
        out = {
            "density": self.density_head(breast.flatten(1)),
            "birads": self.birads_head(breast),
            "findings": self.finding_head(breast),
            "tokens": tokens,
        }
        out.update({f"desc_{name}": head(breast) for name, head in self.descriptor_heads.items()})
        return out


def create_model(cfg: Stage1Model) -> MultiViewClassifier:
    """The classifier a ``model`` config section describes."""
    return MultiViewClassifier(
        backbone=cfg.backbone,
        dim=cfg.dim,
        tokens=(cfg.tokens[0], cfg.tokens[1]),
        heads=cfg.heads,
        dropout=cfg.dropout,
        pretrained_path=cfg.pretrained_path,
        backbone_kwargs=dict(cfg.backbone_kwargs) or None,
        descriptor_heads=cfg.descriptor_heads,
    )


def stage1_loss(
    out: dict, batch: dict, focal_gamma: float = 0.0, birads_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Density CE + BI-RADS partial-label NLL (label masks; optional per-class weights) + masked
    (focal) BCE for findings."""
    dens = batch["density"]
    # every head joins the graph even when a batch has none of its labels (DDP needs all grads)
    heads = [k for k in out if k != "tokens"]
    loss = 0.0 * sum(out[k].sum() for k in heads)
    if (dens >= 0).any():
        loss = loss + F.cross_entropy(out["density"][dens >= 0], dens[dens >= 0])
    mask = batch["birads_mask"]  # [B, 2, C] compatible classes
    has = mask.any(-1)
    if has.any():
        logp = out["birads"].log_softmax(-1)
        nll = -torch.logsumexp(logp.masked_fill(~mask, -1e4), dim=-1)
        if birads_weights is None:
            loss = loss + nll[has].mean()
        else:  # a partial label takes the mean weight of its compatible classes
            w = (mask.float() * birads_weights).sum(-1) / mask.sum(-1).clamp_min(1)
            loss = loss + (nll * w)[has].sum() / w[has].sum()
    fmask = batch["finding_mask"]
    if fmask.any():
        bce = F.binary_cross_entropy_with_logits(out["findings"], batch["findings"], reduction="none")
        if focal_gamma:
            p = torch.sigmoid(out["findings"])
            pt = torch.where(batch["findings"] > 0.5, p, 1 - p)
            bce = bce * (1 - pt) ** focal_gamma
        loss = loss + (bce * fmask).sum() / fmask.sum()
    for key in (k for k in heads if k.startswith("desc_")):  # descriptors: masked CE (-1 = none)
        target = batch[key]
        if (target >= 0).any():
            loss = loss + F.cross_entropy(out[key].flatten(0, 1), target.flatten(), ignore_index=-1)
    return loss
