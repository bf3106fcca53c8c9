"""The stage-1 config schema (``configs/stage1/*.yaml`` are instances of it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from mammorg.training.settings import DeepSpeedSettings, TrainSettings


@dataclass
class Stage1Data:
    cache_manifest: str = "cache/manifest.jsonl"  # a preprocessed manifest (data preprocess)
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 0
    folds: int | None = None  # set by ``stage1 predict --oof K`` for its fold models
    fold: int | None = None

    def __post_init__(self) -> None:
        if (self.folds is None) != (self.fold is None):
            raise ValueError("data.folds and data.fold are set together (by stage1 predict --oof)")
        if self.folds is not None and self.fold is not None and not 0 <= self.fold < self.folds:
            raise ValueError(f"data.fold={self.fold}: expected 0..{self.folds - 1}")


@dataclass
class Stage1Model:
    backbone: str = "resnet10t"
    dim: int = 64
    tokens: list[int] = field(default_factory=lambda: [2, 2])  # feature tokens per view (rows, cols)
    heads: int = 4
    dropout: float = 0.1
    pretrained_path: str | None = None  # local safetensors of the backbone (never downloaded)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    descriptor_heads: bool = False  # mass shape/margin, calcification morphology/distribution
    localise: bool = False  # per-location finding heatmaps pooled by multiple-instance pooling
    mil_pooling: str = "lse"  # lse | topk | attention
    lesion_features: bool = False  # descriptor and BI-RADS heads read each finding where its heatmap points
    lesion_crops: bool = False  # ... or a crop of the input at full resolution around it (mass, calcification)
    crop_size: int = 48  # the crops' side in pixels (resampled)
    crop_fraction: float = 0.2  # the crops' side as a fraction of the image height (about 44 mm on a 22 cm field)

    def __post_init__(self) -> None:
        if len(self.tokens) != 2 or min(self.tokens) < 1:
            raise ValueError(f"model.tokens={list(self.tokens)}: expected [rows, cols] >= 1")
        if self.mil_pooling not in ("lse", "topk", "attention"):
            raise ValueError(f"model.mil_pooling={self.mil_pooling!r}: expected lse, topk or attention")
        if self.lesion_features and not self.localise:
            raise ValueError("model.lesion_features=true reads the finding heatmaps: it needs model.localise=true")
        if self.lesion_crops and not self.localise:
            raise ValueError("model.lesion_crops=true crops where the heatmaps point: it needs model.localise=true")
        if not 0.0 < self.crop_fraction <= 1.0 or self.crop_size < 8:
            raise ValueError(
                f"model.crop_fraction={self.crop_fraction}, model.crop_size={self.crop_size}: expected a fraction "
                "in (0, 1] and at least 8 pixels"
            )
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")


@dataclass
class Stage1Train(TrainSettings):
    weight_decay: float = 0.05
    focal_gamma: float = 0.0
    class_weight_power: float = 0.5  # BI-RADS class weights (1/freq)^p; 0 = unweighted
    localisation_weight: float = 1.0  # heatmap loss where lesion boxes are known (model.localise)
    crop_epochs: int = 0  # model.lesion_crops: the crop reader's own epochs on box crops first, then frozen
    crop_lr: float = 2.0e-3
    crop_jitter: float = 0.0  # lesion crops in training: up to this many crop sides off the box centres

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop_epochs < 0:
            raise ValueError(f"train.crop_epochs={self.crop_epochs}: expected >= 0")
        if not 0.0 <= self.crop_jitter <= 0.5:
            raise ValueError(f"train.crop_jitter={self.crop_jitter}: expected crop sides in [0, 0.5]")


@dataclass
class Stage1Config:
    run_dir: str = "runs/stage1"
    seed: int = 0
    data: Stage1Data = field(default_factory=Stage1Data)
    model: Stage1Model = field(default_factory=Stage1Model)
    train: Stage1Train = field(default_factory=Stage1Train)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)

    def __post_init__(self) -> None:
        if self.train.crop_epochs and not (self.model.lesion_crops and self.model.descriptor_heads):
            raise ValueError(
                "train.crop_epochs trains the lesion crops' descriptor reader: it needs model.lesion_crops=true "
                "and model.descriptor_heads=true (without crops: model.lesion_crops=false train.crop_epochs=0)"
            )

    # migrations of configs saved by older versions (mammorg.config.migrate)
    RENAMED: ClassVar[dict[str, str]] = {}
    REMOVED: ClassVar[tuple[str, ...]] = ()
