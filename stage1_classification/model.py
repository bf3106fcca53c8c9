"""Multi-view classifier: shared timm backbone, view embeddings, per-breast CC+MLO fusion."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mammorg.labels import BIRADS_CLASSES, DENSITIES, DESCRIBED_FINDING, DESCRIPTORS, FINDINGS
from mammorg.training.checkpoint import load_tensors
from stage1_classification.config import Stage1Model
from stage1_classification.localisation import box_targets, peak_centres

MIL_POOLINGS = ("lse", "topk", "attention")


class MilPooling(nn.Module):
    """Breast-level finding logits from the heatmap cells of the breast's views (multiple-instance
    pooling): ``lse`` (log-mean-exp with sharpness ``r``), ``topk`` (mean of the top 5% of
    cells), ``attention`` (per-finding attention over the cells' features)."""

    def __init__(self, kind: str, dim: int, findings: int, r: float = 4.0):
        super().__init__()
        if kind not in MIL_POOLINGS:
            raise ValueError(f"unknown MIL pooling {kind!r}; choose from {MIL_POOLINGS}")
        self.kind, self.r = kind, r
        self.attention = (
            nn.Sequential(nn.Linear(dim, dim // 2), nn.Tanh(), nn.Linear(dim // 2, findings))
            if kind == "attention"
            else None
        )

    def forward(self, heat: torch.Tensor, feats: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        """``heat [B, 2, F, N]`` logits, ``feats [B, 2, N, D]``, ``valid [B, 2, N]`` -> ``[B, 2, F]``."""
        mask = valid.unsqueeze(2)  # [B, 2, 1, N]
        if self.kind == "lse":
            scaled = (self.r * heat).masked_fill(~mask, float("-inf"))
            count = mask.sum(-1).clamp_min(1)
            pooled = (torch.logsumexp(scaled, -1) - torch.log(count.float())) / self.r
            return torch.where(mask.any(-1), pooled, torch.zeros_like(pooled))
        if self.kind == "topk":
            k = max(1, round(0.05 * heat.shape[-1]))
            top = heat.masked_fill(~mask, -1e4).topk(k, dim=-1).values
            return torch.where(mask.any(-1), top.mean(-1), torch.zeros_like(top[..., 0]))
        assert self.attention is not None and feats is not None
        scores = self.attention(feats).transpose(2, 3)  # [B, 2, F, N]
        weights = scores.masked_fill(~mask, -1e4).softmax(-1)
        return (weights * heat).sum(-1)


CROPPED = (FINDINGS.index("mass"), FINDINGS.index("calcification"))  # the findings read from crops


def first_boxes(findings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``findings [..., K]`` (the boxes' finding column) -> for each cropped finding, the index
    of its first box and whether there is one (``[..., k]`` each)."""
    has = torch.stack([findings == f for f in CROPPED], -2)  # [..., k, K]
    return has.float().argmax(-1), has.any(-1)


class LesionCrops(nn.Module):
    """Each breast's mass and calcification read at the input's full resolution: a crop of each
    view around where the finding's heatmap points (in training: the centre of the view's box of
    that finding, where it has one), ``fraction`` of the image height square, resampled to
    ``size`` pixels and encoded by a small CNN; a breast's CC and MLO crops are averaged, and
    ``category`` reads a lesion's own BI-RADS category from them. The backbone's cells (32
    pixels) are coarser than a mass's margin or a calcification's shape, which decide the
    category (DOMAIN.md); a crop keeps them. ``train.crop_epochs`` trains the reader first, on
    its own (``crop_reader.py``)."""

    def __init__(self, dim: int, size: int = 48, fraction: float = 0.2):
        super().__init__()
        self.size, self.fraction = size, fraction
        widths = (1, 32, 64, 96)
        layers: list[nn.Module] = []
        for i, o in itertools.pairwise(widths):  # group norm: trains fast, the same in training and inference
            layers += [nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.GELU(), nn.MaxPool2d(2)]
        self.encoder = nn.Sequential(
            *layers,
            nn.Conv2d(widths[-1], dim, 3, padding=1),
            nn.GroupNorm(math.gcd(8, dim), dim),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        # each crop's own BI-RADS category (trained by the crop reader's phase on the boxes' categories)
        self.category = nn.Linear(dim, len(BIRADS_CLASSES))

    def centres(self, heat: torch.Tensor, boxes: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """``[B, 4, 2, 2]`` each view's crop centre (x, y in [0, 1]) for each cropped finding:
        the heatmap's peak (``peak_centres``: within a cell), or the centre of the first box of
        that finding in ``boxes`` (``[B, 4, K, 5]`` in image pixels), where given."""
        centre = peak_centres(heat[:, :, list(CROPPED)])
        if boxes is None:
            return centre
        scale = torch.tensor([size[1], size[0]], dtype=centre.dtype, device=centre.device)
        first, has = first_boxes(boxes[..., 0])  # [B, 4, k]
        box = boxes.gather(2, first.unsqueeze(-1).expand(-1, -1, -1, 5))  # [B, 4, k, 5]
        middle = torch.stack([box[..., 1] + box[..., 3], box[..., 2] + box[..., 4]], -1) / 2 / scale
        return torch.where(has.unsqueeze(-1), middle.to(centre.dtype), centre)

    def shifted(self, boxes: torch.Tensor, height: int, spread: float) -> torch.Tensor:
        """``boxes [..., 5]`` (image pixels) each moved by a uniform random offset of up to
        ``spread`` crop sides along x and along y (the torch generator's draw): in training, crops
        cut around them sit off the lesion's centre as far as the heatmap's peak does at inference
        (measured: a median 0.13 crop sides), not always on it."""
        side = self.fraction * height
        offset = (torch.rand(*boxes.shape[:-1], 2, device=boxes.device) * 2 - 1) * spread * side
        shift = torch.cat([offset, offset], -1).to(boxes.dtype)  # (x, y, x, y)
        return torch.cat([boxes[..., :1], boxes[..., 1:] + shift], -1)

    def cut(self, images: torch.Tensor, centre: torch.Tensor, margin: int = 0) -> torch.Tensor:
        """``images [B, 4, 1, H, W]``, ``centre [B, 4, k, 2]`` (x, y in [0, 1]) -> the crops
        ``[B, 4, k, S + 2 margin, S + 2 margin]``: ``margin`` pixels more on each side, at the
        same scale (room to shift the crop in training)."""
        b, views, _, height, width = images.shape
        k, side = centre.shape[2], self.size + 2 * margin
        theta = centre.new_zeros(b, views, k, 2, 3)
        theta[..., 0, 0] = self.fraction * side / self.size * height / width
        theta[..., 1, 1] = self.fraction * side / self.size
        theta[..., :, 2] = centre * 2 - 1  # grid coordinates
        grid = F.affine_grid(theta.reshape(-1, 2, 3), [b * views * k, 1, side, side], align_corners=False)
        # the findings' crops of a view side by side: one sampling pass over each view, no copies
        grid = grid.reshape(b * views, k, side, side, 2).transpose(1, 2).reshape(b * views, side, -1, 2)
        crops = F.grid_sample(images.reshape(b * views, 1, height, width), grid.to(images.dtype), align_corners=False)
        return crops.reshape(b, views, side, k, side).transpose(2, 3)

    def encode_views(self, crops: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``crops [B, 4, k, S, S]``, ``weight [B, 4, k]`` -> each crop's feature ``[B, 4, k, D]``
        (zeros where the weight is 0: those crops are not encoded)."""
        used = weight.reshape(-1) > 0
        encoded = self.encoder(crops.reshape(-1, 1, self.size, self.size)[used])
        feats = encoded.new_zeros(used.numel(), encoded.shape[-1]).index_copy(0, used.nonzero().squeeze(1), encoded)
        return feats.reshape(*crops.shape[:3], -1)

    @staticmethod
    def pool(views: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Each breast's feature per finding ``[B, 2, k, D]`` from its views' ``[B, 4, k, D]``:
        their mean by ``weight [B, 4, k]`` (a weight of 0: the view does not count)."""
        b, n, k, d = views.shape
        w = weight.reshape(b, 2, n // 2, k, 1).to(views.dtype)
        return (views.reshape(b, 2, n // 2, k, d) * w).sum(2) / w.sum(2).clamp_min(1e-6)

    def encode(self, crops: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``crops [B, 4, k, S, S]``, ``weight [B, 4, k]`` -> each breast's feature per finding."""
        return self.pool(self.encode_views(crops, weight), weight)

    def forward(
        self, images: torch.Tensor, present: torch.Tensor, heat: torch.Tensor, boxes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``images [B, 4, 1, H, W]``, ``present [B, 4]``, ``heat [B, 4, F, h, w]`` ->
        ``[B, 2, 2, D]`` (breast L/R, finding mass/calcification)."""
        centre = self.centres(heat.detach(), boxes, (images.shape[-2], images.shape[-1]))
        weight = present.unsqueeze(-1).expand(-1, -1, len(CROPPED))
        return self.encode(self.cut(images, centre), weight)


class MultiViewClassifier(nn.Module):
    """Input ``images [B, 4, 1, H, W]`` (views L_CC, L_MLO, R_CC, R_MLO) and ``view_mask [B, 4]``.

    With ``localise`` a 1x1 convolution turns each view's feature map into per-location finding
    logits (``heatmaps [B, 4, F, h, w]``), pooled per breast over both views' cells (multiple
    instances) into the finding logits; the BI-RADS head also sees these finding probabilities.

    With ``lesion_features`` (needs ``localise``) each breast also gets one feature per finding,
    read where its heatmap points (the cells' features weighted by the softmax of the heatmap over
    both views, and that point's position): the descriptor heads read the mass's and the
    calcification's, and the BI-RADS head (two layers) all of them, so that the category can
    follow the most suspicious lesion's look instead of the whole breast's average."""

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
        localise: bool = False,
        mil_pooling: str = "lse",
        lesion_features: bool = False,
        lesion_crops: bool = False,
        crop_size: int = 48,
        crop_fraction: float = 0.2,
    ):
        super().__init__()
        if (lesion_features or lesion_crops) and not localise:
            raise ValueError("lesion features and crops are read at the finding heatmaps: they need localise")
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
        self.localise = localise
        features = int(getattr(self.backbone, "num_features"))  # noqa: B009
        if localise:
            self.heat_head = nn.Conv2d(features, len(FINDINGS), kernel_size=1)
            self.cell_proj = nn.Linear(features, dim) if mil_pooling == "attention" else None
            self.mil = MilPooling(mil_pooling, dim, len(FINDINGS))
        self.crops = LesionCrops(dim, crop_size, crop_fraction) if lesion_crops else None
        self.birads_head: nn.Module
        if localise and (lesion_features or lesion_crops):
            lesions = len(FINDINGS) * (dim + 2) if lesion_features else 0  # each finding's feature and position
            lesions += len(CROPPED) * (dim + len(BIRADS_CLASSES)) if lesion_crops else 0  # features, categories
            self.birads_head = nn.Sequential(
                nn.Linear(dim + len(FINDINGS) + lesions, dim), nn.GELU(), nn.Linear(dim, len(BIRADS_CLASSES))
            )
        elif localise:
            self.birads_head = nn.Linear(dim + len(FINDINGS), len(BIRADS_CLASSES))
        else:
            self.finding_head = nn.Linear(dim, len(FINDINGS))
            self.birads_head = nn.Linear(dim, len(BIRADS_CLASSES))
        self.lesion_proj = nn.Linear(features, dim) if lesion_features else None
        self.descriptor_heads = nn.ModuleDict(
            {name: nn.Linear(dim, len(classes)) for name, classes in DESCRIPTORS.items()} if descriptor_heads else {}
        )
        self.dim = dim

    def _feature_maps(self, images: torch.Tensor, view_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = view_mask.bool()
        if not present.any():
            raise ValueError("an exam with no usable view cannot be classified")
        return self.backbone.forward_features(images[present]), present

    def _tokens(self, maps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b = present.shape[0]
        out = maps.new_zeros(b, 4, self.tokens[0] * self.tokens[1], self.dim)
        pooled = F.adaptive_avg_pool2d(maps, self.tokens).flatten(2).transpose(1, 2)
        out[present] = self.proj(pooled).to(out.dtype)
        return out

    def view_tokens(self, images: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """Feature tokens ``[B, 4, N, D]`` for present views (missing views stay zero)."""
        return self._tokens(*self._feature_maps(images, view_mask))

    def _localised(
        self, maps: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Heatmaps ``[B, 4, F, h, w]`` (missing views: zeros), MIL finding logits ``[B, 2, F]``
        and, with ``lesion_features``, each finding's lesion feature ``[B, 2, F, D + 2]``."""
        b, (_c, h, w) = present.shape[0], maps.shape[1:]
        heat = maps.new_zeros(b, 4, len(FINDINGS), h, w)
        heat[present] = self.heat_head(maps).to(heat.dtype)
        # attention pooling reads the cells' features
        cells = None if self.cell_proj is None else self._cells(self.cell_proj, maps, present)
        per_breast = heat.flatten(3).reshape(b, 2, 2, len(FINDINGS), h * w).permute(0, 1, 3, 2, 4)
        valid = present.reshape(b, 2, 2, 1).expand(b, 2, 2, h * w).reshape(b, 2, 2 * h * w)
        per_breast = per_breast.reshape(b, 2, len(FINDINGS), 2 * h * w)
        lesions = self._lesions(maps, present, per_breast, valid) if self.lesion_proj is not None else None
        return heat, self.mil(per_breast, cells, valid), lesions

    def _cells(self, proj: nn.Module, maps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``proj`` of each cell's feature, per breast ``[B, 2, N, D]`` (CC cells, then MLO
        cells; missing views: zeros)."""
        b, (_c, h, w) = present.shape[0], maps.shape[1:]
        cells = maps.new_zeros(b, 4, h * w, self.dim)
        cells[present] = proj(maps.flatten(2).transpose(1, 2)).to(cells.dtype)
        return cells.reshape(b, 2, 2 * h * w, self.dim)

    def _lesions(
        self, maps: torch.Tensor, present: torch.Tensor, heat: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Each finding's feature where its heatmap points: ``heat [B, 2, F, N]`` logits over a
        breast's cells, ``valid [B, 2, N]`` -> ``[B, 2, F, D + 2]`` (weighted features, then the
        point's row and column in [0, 1]). The weights do not train the heatmaps (detached)."""
        assert self.lesion_proj is not None
        h, w = maps.shape[2:]
        cells = self._cells(self.lesion_proj, maps, present)
        rows = torch.linspace(0, 1, h, device=maps.device).repeat_interleave(w)
        cols = torch.linspace(0, 1, w, device=maps.device).repeat(h)
        where = torch.stack([rows, cols], -1).repeat(2, 1).to(cells.dtype)  # [N, 2] (CC cells, MLO cells)
        weights = heat.detach().masked_fill(~valid.unsqueeze(2), -1e4).softmax(-1)
        weights = weights * valid.any(-1, keepdim=True).unsqueeze(-1)  # a breast with no view: zeros
        return torch.cat([weights @ cells, weights @ where], -1)

    def forward(
        self, images: torch.Tensor, view_mask: torch.Tensor, boxes: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``boxes [B, 4, K, 5]`` (training, optional): the lesion crops' centres where known."""
        maps, present = self._feature_maps(images, view_mask)
        tokens = self._tokens(maps, present)
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
        out = {"density": self.density_head(breast.flatten(1)), "tokens": tokens}
        lesions = crops = None
        if self.localise:
            out["heatmaps"], out["findings"], lesions = self._localised(maps, present)
            seen = [breast, torch.sigmoid(out["findings"])]
            if lesions is not None:
                seen.append(lesions.flatten(2))
            if self.crops is not None:
                crops = self.crops(images, view_mask.bool(), out["heatmaps"], boxes).to(breast.dtype)  # [B, 2, 2, D]
                seen += [crops.flatten(2), self.crops.category(crops).softmax(-1).flatten(2)]
            out["birads"] = self.birads_head(torch.cat(seen, -1))
        else:
            out["birads"], out["findings"] = self.birads_head(breast), self.finding_head(breast)
        for name, head in self.descriptor_heads.items():
            finding = FINDINGS.index(DESCRIBED_FINDING[name])
            if crops is not None:
                source = crops[:, :, CROPPED.index(finding)]
            else:
                source = breast if lesions is None else lesions[:, :, finding, : self.dim]
            out[f"desc_{name}"] = head(source)
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
        localise=cfg.localise,
        mil_pooling=cfg.mil_pooling,
        lesion_features=cfg.lesion_features,
        lesion_crops=cfg.lesion_crops,
        crop_size=cfg.crop_size,
        crop_fraction=cfg.crop_fraction,
    )


def localisation_loss(heatmaps: torch.Tensor, batch: dict) -> torch.Tensor | None:
    """Balanced BCE on the heatmap cells of the (view, finding) maps whose target is known:
    inside the boxes 1, elsewhere 0 (positive and negative cells weigh half each)."""
    known = batch["box_known"].bool() & batch["view_mask"].bool().unsqueeze(-1)  # [B, 4, F]
    if not known.any():
        return None
    size = (batch["images"].shape[-2], batch["images"].shape[-1])
    target = box_targets(batch["boxes"], size, (heatmaps.shape[-2], heatmaps.shape[-1]))
    bce = F.binary_cross_entropy_with_logits(heatmaps, target, reduction="none")
    cells = known.unsqueeze(-1).unsqueeze(-1).expand_as(bce)
    pos, neg = cells & (target > 0.5), cells & (target <= 0.5)
    loss = bce[neg].mean() if neg.any() else bce.new_zeros(())
    if pos.any():
        loss = 0.5 * loss + 0.5 * bce[pos].mean()
    return loss


def stage1_loss(
    out: dict,
    batch: dict,
    focal_gamma: float = 0.0,
    birads_weights: torch.Tensor | None = None,
    localisation_weight: float = 1.0,
) -> torch.Tensor:
    """Density CE + BI-RADS partial-label NLL (label masks; optional per-class weights) + masked
    (focal) BCE for findings + the heatmaps' localisation loss where boxes are known."""
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
    if "heatmaps" in out and localisation_weight and "boxes" in batch:
        loc = localisation_loss(out["heatmaps"], batch)
        if loc is not None:
            loss = loss + localisation_weight * loc
    for key in (k for k in heads if k.startswith("desc_")):  # descriptors: masked CE (-1 = none)
        target = batch[key]
        if (target >= 0).any():
            loss = loss + F.cross_entropy(out[key].flatten(0, 1), target.flatten(), ignore_index=-1)
    return loss
