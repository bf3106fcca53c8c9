"""Config schemas of stage 2 (``configs/stage2/*.yaml``) and of decoder pre-training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from mammorg.training.settings import DeepSpeedSettings, TrainSettings

KNOWLEDGE_MODES = ("none", "discrete", "soft", "both")
KNOWLEDGE_SOURCES = ("predicted", "gold")
KNOWLEDGE_HEADS = ("density", "birads", "findings")
ASSESSMENTS = ("free", "stage1", "plan")
CACHES = ("auto", "static", "dynamic")
DTYPES = ("float32", "bfloat16")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        expected = " or ".join(options) if len(options) == 2 else "one of " + ", ".join(options)
        raise ValueError(f"{name}={value!r}: expected {expected}")


@dataclass
class Stage2Data:
    manifest: str = "manifest.jsonl"  # exams with reports (ingest or cache manifest)
    predictions: str = "stage1/pred.jsonl"  # ``stage1 predict --oof K`` output, with feature tokens
    stage1_run: str | None = None  # the stage-1 run (for export)
    train_split: str = "train"
    val_split: str = "val"
    max_report_tokens: int = 192
    assessment_plan: bool = False  # targets open with the stated BI-RADS categories (<plan> ... </plan>)
    findings_plan: bool = False  # the plan (with assessment_plan) also names the stated findings (<R:mass>)


@dataclass
class VisualSettings:
    enabled: bool = True
    tokens_per_view: int | None = None  # read from the feature files when null
    dim: int | None = None
    # training exams (redrawn each epoch) shown without their visual tokens: the stage-1 features
    # of training exams come from a model that saw them, so the decoder must not learn to read its
    # assessment from them instead of the knowledge tokens
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"visual.drop_rate={self.drop_rate}: expected 0 <= rate < 1")


@dataclass
class KnowledgeSettings:
    mode: str = "discrete"  # none | discrete | soft | both
    source: str = "predicted"  # predicted | gold (oracle upper bound)
    gold_fraction: float = 0.0  # training exams (redrawn each epoch) given their labels as knowledge
    gold_heads: list[str] = field(default_factory=lambda: list(KNOWLEDGE_HEADS))
    confidence: bool = True  # discrete: a <conf:low|mid|high> token after each stated class
    verbal_tie: bool = False  # discrete: each token also carries the embedding of its report words
    locations: bool = True  # discrete: a <loc:quadrant> token after each finding stage 1 localised

    def __post_init__(self) -> None:
        _choice("knowledge.mode", self.mode, KNOWLEDGE_MODES)
        _choice("knowledge.source", self.source, KNOWLEDGE_SOURCES)
        if not 0.0 <= self.gold_fraction <= 1.0:
            raise ValueError(f"knowledge.gold_fraction={self.gold_fraction}: expected 0..1")
        if not self.gold_heads or not set(self.gold_heads) <= set(KNOWLEDGE_HEADS):
            raise ValueError(
                f"knowledge.gold_heads={list(self.gold_heads)}: expected a non-empty subset of "
                f"{', '.join(KNOWLEDGE_HEADS)}"
            )


@dataclass
class TerminologySettings:
    atomic_terms: bool = True  # lexicon terms as single tokens
    normalize: bool = True  # rewrite variants to canonical terms before tokenising
    lexicon: str | None = None  # default: terminology/lexicon.yaml
    vocab_size: int = 800  # BPE size when the decoder is trained from scratch
    term_loss_weight: float = 1.0  # >1 weights lexicon-term tokens in the loss
    category_weight_power: float = 0.0  # >0: BI-RADS category terms weigh (mean count / count)^p
    train_term_rows: bool = True  # pretrained decoders: added rows (terms, knowledge tokens) train, also under LoRA


@dataclass
class DecoderSettings:
    name_or_path: str | None = None  # a local HF model folder (never downloaded); else from_config
    attn_implementation: str = "sdpa"
    dtype: str = "float32"  # bfloat16 (GPU): bf16 weights (LoRA adapters stay fp32)
    gradient_checkpointing: bool = False
    # the loss (and generation) over the report vocabulary only: pieces of the training reports,
    # lexicon terms, special tokens. auto: for vocabularies over 32k (pretrained decoders)
    report_vocab_head: str = "auto"  # auto | always | never
    chat_template: bool = False  # wrap the prompt in the tokenizer's chat template (instruction-tuned)
    from_config: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": 96,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        }
    )

    def __post_init__(self) -> None:
        _choice("decoder.dtype", self.dtype, DTYPES)
        _choice("decoder.report_vocab_head", self.report_vocab_head, ("auto", "always", "never"))
        if not self.name_or_path and not self.from_config:
            raise ValueError("decoder: set name_or_path (a local model folder) or from_config")


@dataclass
class LoraSettings:
    enabled: bool = False
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list[str] | None = None  # e.g. [embed_tokens, lm_head] to train whole matrices


@dataclass
class Stage2Train(TrainSettings):
    epochs: int = 4
    batch_size: int = 8
    lr: float = 2.0e-3
    warmup_steps: int = 5
    clip: float = 1.0
    compile: bool = False  # torch.compile each decoder block (GPU: faster steps after warm-up)
    align_epochs: int = 0  # first epochs with the decoder frozen: projector, knowledge and term rows only


@dataclass
class GenerateSettings:
    max_new_tokens: int = 200
    num_beams: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 8
    cache: str = "auto"  # KV cache: static (compiled decoding) | dynamic; auto = static on a GPU
    assessment: str = "free"  # stated BI-RADS categories: stage1 = stage 1's decisions; plan = the plan's
    management: str = "consistent"  # consistent: management terms agree with the stated category | free
    findings: str = "free"  # stage1: the report states stage 1's decided findings and no other | free
    locations: str = "free"  # stage1 (with findings: stage1): each finding where stage 1 located it | free

    def __post_init__(self) -> None:
        _choice("generate.cache", self.cache, CACHES)
        _choice("generate.assessment", self.assessment, ASSESSMENTS)
        _choice("generate.management", self.management, ("consistent", "free"))
        _choice("generate.findings", self.findings, ("stage1", "free"))
        _choice("generate.locations", self.locations, ("stage1", "free"))


@dataclass
class Stage2Config:
    run_dir: str = "runs/stage2"
    seed: int = 0
    data: Stage2Data = field(default_factory=Stage2Data)
    visual: VisualSettings = field(default_factory=VisualSettings)
    knowledge: KnowledgeSettings = field(default_factory=KnowledgeSettings)
    terminology: TerminologySettings = field(default_factory=TerminologySettings)
    decoder: DecoderSettings = field(default_factory=DecoderSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: Stage2Train = field(default_factory=Stage2Train)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)

    RENAMED: ClassVar[dict[str, str]] = {}
    REMOVED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.generate.assessment == "plan" and not self.data.assessment_plan:
            raise ValueError("generate.assessment=plan needs a run trained with data.assessment_plan: true")
        if self.generate.findings == "stage1" and not self.terminology.atomic_terms:
            raise ValueError(
                "generate.findings=stage1 needs finding terms as atomic terms (terminology.atomic_terms: true)"
            )
        for key in ("assessment", "findings"):
            if getattr(self.generate, key) == "stage1" and self.knowledge.mode == "none":
                raise ValueError(
                    f"generate.{key}=stage1 states stage 1's decisions, which knowledge.mode=none withholds: "
                    f"set generate.{key} to {'plan or free' if key == 'assessment' else 'free'}"
                )


@dataclass
class PretrainData:
    manifest: str = "manifest.jsonl"
    split: str | None = "train"


@dataclass
class PretrainTrain(TrainSettings):
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2.0e-3
    warmup_steps: int = 10


@dataclass
class PretrainConfig:
    """``mammorg stage2 pretrain``: a small Llama pre-trained on report text."""

    out_dir: str = "runs/decoder-pretrained"
    seed: int = 0
    lexicon: str | None = None
    vocab_size: int = 800
    max_tokens: int = 256
    data: PretrainData = field(default_factory=PretrainData)
    model: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        }
    )
    train: PretrainTrain = field(default_factory=PretrainTrain)

    RENAMED: ClassVar[dict[str, str]] = {}
    REMOVED: ClassVar[tuple[str, ...]] = ()
