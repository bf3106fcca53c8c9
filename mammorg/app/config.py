"""Config schemas of the application layer: pipelines (``configs/pipeline``) and ablation grids
(``configs/ablations``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mammorg.synth.reports import REPORT_STYLES


@dataclass
class SynthStep:
    exams: int = 300
    seed: int = 0
    height: int = 256
    width: int = 128
    styles: list[str] = field(default_factory=lambda: ["us_screening", "per_breast"])
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        unknown = set(self.styles) - set(REPORT_STYLES)
        if unknown:
            raise ValueError(f"synth.styles: unknown {sorted(unknown)}; choose from {', '.join(REPORT_STYLES)}")


@dataclass
class PreprocessStep:
    height: int = 128
    width: int = 64
    workers: int = 2


@dataclass
class Stage1Step:
    config: str = "stage1/default"  # a config name, or a path relative to the pipeline file
    overrides: list[str] = field(default_factory=list)
    oof_folds: int = 2

    def __post_init__(self) -> None:
        if self.oof_folds == 1 or self.oof_folds < 0:
            raise ValueError(f"stage1.oof_folds={self.oof_folds}: 0 (none) or at least 2")


@dataclass
class Stage2Step:
    config: str = "stage2/tiny"
    overrides: list[str] = field(default_factory=list)


@dataclass
class GenerateStep:
    split: str = "test"


@dataclass
class EvaluateStep:
    bootstrap: int = 200
    meteor: bool = False


@dataclass
class ExportStep:
    merge_lora: bool = False


@dataclass
class PipelineConfig:
    """synthesise -> ingest -> preprocess -> stage 1 -> predict -> stage 2 -> generate ->
    evaluate -> export -> report."""

    synth: SynthStep = field(default_factory=SynthStep)
    preprocess: PreprocessStep = field(default_factory=PreprocessStep)
    stage1: Stage1Step = field(default_factory=Stage1Step)
    stage2: Stage2Step = field(default_factory=Stage2Step)
    generate: GenerateStep = field(default_factory=GenerateStep)
    evaluate: EvaluateStep = field(default_factory=EvaluateStep)
    export: ExportStep = field(default_factory=ExportStep)

    RENAMED: ClassVar[dict[str, str]] = {}
    REMOVED: ClassVar[tuple[str, ...]] = ()


@dataclass
class AblationRow:
    stage1: list[str] = field(default_factory=list)  # overrides on top of the pipeline's
    stage2: list[str] = field(default_factory=list)
    versus: str | None = None  # the row this one is tested against (default: the baseline)
    stage2_config: str | None = None  # this row's stage-2 config (name or path; default: the pipeline's)


@dataclass
class AblationConfig:
    out: str = "runs/ablation"
    pipeline: str = "pipeline/demo"  # a config name, or a path relative to this file
    baseline: str = "none"
    seeds: list[int] = field(default_factory=lambda: [0])
    bootstrap: int = 1000
    grid: dict[str, AblationRow] = field(default_factory=dict)

    RENAMED: ClassVar[dict[str, str]] = {}
    REMOVED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError("the grid is empty")
        if not self.seeds:
            raise ValueError("seeds is empty")
        for name in (self.baseline, *(row.versus for row in self.grid.values() if row.versus)):
            if name not in self.grid:
                raise ValueError(f"baseline '{name}' is not a row of the grid")
