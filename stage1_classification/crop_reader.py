"""The lesion-crop reader's own training phase (``train.crop_epochs``), before the main epochs.

A mass's margin and a calcification's morphology decide its BI-RADS category, and they are read
from full-resolution crops (``LesionCrops``). The reader learns them from the breast's
descriptors and from each box's own category (VinDr-Mammo's ``finding_birads``) where given.
Inside the main epochs the crop encoder sees each lesion once per epoch, far too rarely to
learn them (measured: calcification morphology 0.07 after 12 epochs). Here it trains alone, on
crops cut once around the lesion boxes of the training split, for many cheap epochs: the crops
are small, the backbone is not run. The encoder and the heads it feeds are then frozen, and the
main epochs teach the BI-RADS head to read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mammorg.labels import BIRADS_CLASSES, DESCRIBED_FINDING, FINDINGS
from stage1_classification.data import ExamDataset
from stage1_classification.model import CROPPED, MultiViewClassifier, first_boxes


@dataclass
class CropSet:
    """The crops of the breasts that have a described lesion with a box on at least one view."""

    crops: torch.Tensor  # [N, 4, k, T, T] (views L_CC, L_MLO, R_CC, R_MLO; findings of CROPPED; T > S: shifts)
    weight: torch.Tensor  # [N, 4, k]: 1 where the view has a box of that finding
    birads: torch.Tensor  # [N, 4, k, C]: the BI-RADS classes compatible with the box's own category
    targets: dict[str, torch.Tensor]  # desc_<name> -> [N, 2] class index per breast (-1: none)

    def __len__(self) -> int:
        return self.crops.shape[0]


def _finding_slot(name: str) -> int:
    """The crop (index into CROPPED) a descriptor head reads."""
    return CROPPED.index(FINDINGS.index(DESCRIBED_FINDING[name]))


def _first_box_birads(sample: dict) -> torch.Tensor:
    """``[4, k, C]``: the category mask of each view's first box of each cropped finding (the
    box ``LesionCrops.centres`` cuts around)."""
    first, has = first_boxes(sample["boxes"][..., 0])  # [4, k]
    masks = sample["box_birads"]  # [4, K, C]
    return masks.gather(1, first.unsqueeze(-1).expand(-1, -1, masks.shape[-1])) & has.unsqueeze(-1)


SHIFT = 0.3  # of the crop's side: how far a training crop moves off the box's centre, each way


def shift_pixels(model: MultiViewClassifier) -> int:
    """The margin cut around each crop, in crop pixels: the heatmap's top cell is where the crop
    is cut at inference, up to half a backbone cell (about 0.3 of the crop's side at 0.2 of the
    image height) from the lesion's centre; the reader learns to read lesions that far off."""
    assert model.crops is not None
    return round(SHIFT * model.crops.size)


@torch.no_grad()
def crop_set(model: MultiViewClassifier, ds: ExamDataset, progress: bool = True) -> CropSet:
    """Crops around each view's first box of a mass and of a calcification, for the exams of
    ``ds`` (unaugmented) that have one with a label: a descriptor of its breast or the box's own
    BI-RADS category."""
    assert model.crops is not None
    names = list(model.descriptor_heads)
    crops, weights, birads = [], [], []
    targets: dict[str, list[torch.Tensor]] = {f"desc_{n}": [] for n in names}
    for i in tqdm(range(len(ds)), desc="lesion crops", leave=False, disable=not progress):
        sample = ds[i]
        boxes = sample["boxes"].unsqueeze(0)  # [1, 4, K, 5]
        has = first_boxes(sample["boxes"][..., 0])[1].float() * sample["view_mask"].float().unsqueeze(-1)  # [4, k]
        categories = _first_box_birads(sample)
        labelled = any((sample[f"desc_{n}"] >= 0).any() for n in names) or bool(categories.any())
        if not has.any() or not labelled:
            continue
        images = sample["images"].unsqueeze(0)
        heat = images.new_zeros(1, 4, len(FINDINGS), 1, 1)  # no heatmap: the boxes say where
        centre = model.crops.centres(heat, boxes, (images.shape[-2], images.shape[-1]))
        crops.append(model.crops.cut(images, centre, shift_pixels(model))[0].half())
        weights.append(has)
        birads.append(categories)
        for n in names:
            targets[f"desc_{n}"].append(sample[f"desc_{n}"])
    if not crops:
        size, k = model.crops.size + 2 * shift_pixels(model), len(CROPPED)
        return CropSet(
            torch.zeros(0, 4, k, size, size),
            torch.zeros(0, 4, k),
            torch.zeros(0, 4, k, len(BIRADS_CLASSES), dtype=torch.bool),
            {key: torch.zeros(0, 2, dtype=torch.long) for key in targets},
        )
    return CropSet(
        torch.stack(crops), torch.stack(weights), torch.stack(birads), {k: torch.stack(v) for k, v in targets.items()}
    )


def _window(crops: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """``size``-pixel windows of ``crops [b, 4, k, T, T]``: a random one per crop (``generator``),
    else the centre."""
    extra = crops.shape[-1] - size
    if generator is None:
        start = extra // 2
        return crops[..., start : start + size, start : start + size]
    b, views, k = crops.shape[:3]
    offset = torch.randint(0, extra + 1, (2, b, views, k, 1), generator=generator)
    ramp = torch.arange(size)
    rows = (offset[0] + ramp)[..., :, None]  # [b, 4, k, size, 1]
    cols = (offset[1] + ramp)[..., None, :]  # [b, 4, k, 1, size]
    index = [torch.arange(n).reshape(-1, *([1] * (4 - i))) for i, n in enumerate((b, views, k))]
    return crops[index[0], index[1], index[2], rows.to(crops.device), cols.to(crops.device)]


def _augment(crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per exam of the batch: flips and quarter turns (a lesion's margin and morphology do not
    depend on its orientation), a gamma and a contrast."""
    shape = (crops.shape[0], 1, 1, 1, 1)
    for dim in (-1, -2):
        crops = torch.where(torch.rand(shape, generator=generator) < 0.5, crops.flip(dim), crops)
    crops = torch.where(torch.rand(shape, generator=generator) < 0.5, crops.transpose(-1, -2), crops)
    gamma = torch.empty(shape).uniform_(0.8, 1.25, generator=generator)
    contrast = torch.empty(shape).uniform_(0.9, 1.1, generator=generator)
    return (crops.clamp(0, 1) ** gamma.to(crops.device) * contrast.to(crops.device)).clamp(0, 1)


def crop_loss(
    model: MultiViewClassifier, data: CropSet, index: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """The crops of ``index``: cross-entropy of every descriptor head on its breast's crops, and
    the partial-label NLL of each crop's own category (``LesionCrops.category``); per target
    (correct, counted). ``generator``: augment (training); ``None``: as cut (evaluation)."""
    assert model.crops is not None
    device = next(model.parameters()).device
    crops = _window(data.crops[index], model.crops.size, generator).to(device, torch.float32)
    if generator is not None:
        crops = _augment(crops, generator)
    weight = data.weight[index].to(device)
    views = model.crops.encode_views(crops, weight)  # [b, 4, k, D]
    feats = model.crops.pool(views, weight)  # [b, 2, k, D]
    seen = weight.reshape(-1, 2, 2, len(CROPPED)).sum(2) > 0  # [b, 2, k]
    loss, tally = feats.new_zeros(()), {}
    for name, head in model.descriptor_heads.items():
        slot = _finding_slot(name)
        target = data.targets[f"desc_{name}"][index].to(device)  # [b, 2]
        use = (target >= 0) & seen[..., slot]
        if use.any():
            logits = head(feats[:, :, slot])[use]
            loss = loss + F.cross_entropy(logits, target[use])
            tally[name] = (int((logits.argmax(-1) == target[use]).sum()), int(use.sum()))
    mask = data.birads[index].to(device)  # [b, 4, k, C]
    use = mask.any(-1) & (weight > 0)
    if use.any():
        logp = model.crops.category(views[use]).log_softmax(-1)
        loss = loss - torch.logsumexp(logp.masked_fill(~mask[use], -1e4), -1).mean()
        tally["lesion_birads"] = (int(mask[use].gather(1, logp.argmax(-1, keepdim=True)).sum()), int(use.sum()))
    return loss, tally


def train_crop_reader(
    model: MultiViewClassifier,
    train: CropSet,
    val: CropSet | None,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Train the crop encoder and the descriptor heads on ``train`` (nothing else moves); the
    summary: breasts, epochs, the first and last epochs' training loss and the validation
    accuracy per descriptor and of the crops' own categories (crops at the boxes)."""
    assert model.crops is not None
    params = [*model.crops.parameters(), *model.descriptor_heads.parameters()]  # the category head is in crops
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    losses: list[float] = []
    for _epoch in tqdm(range(epochs), desc="crop reader", leave=False, disable=not progress):
        order = torch.randperm(len(train), generator=generator)
        total, steps = 0.0, 0
        for start in range(0, len(train), batch_size):
            loss, _ = crop_loss(model, train, order[start : start + batch_size], generator)
            if not loss.requires_grad:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        losses.append(round(total / max(steps, 1), 4))
    summary: dict = {
        "train_breasts": len(train),
        "epochs": epochs,
        "lr": lr,
        "train_loss_first_epoch": losses[0] if losses else None,
        "train_loss": losses[-1] if losses else None,
    }
    if val is not None and len(val):
        model.eval()
        with torch.no_grad():
            _, tally = crop_loss(model, val, torch.arange(len(val)), None)
        summary["val_accuracy_at_boxes"] = {n: round(c / max(t, 1), 4) for n, (c, t) in tally.items()}
        summary["val_counted"] = {n: t for n, (_c, t) in tally.items()}  # breasts; crops for lesion_birads
    model.train(was_training)
    return summary


def freeze_crop_reader(model: MultiViewClassifier) -> None:
    """The crop encoder and the descriptor heads keep what their phase taught them."""
    assert model.crops is not None
    for p in [*model.crops.parameters(), *model.descriptor_heads.parameters()]:
        p.requires_grad_(False)
