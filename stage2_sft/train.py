"""Recipe: ``mammorg stage2 train --config stage2/tiny [key=value ...]``.

Also under a launcher, e.g. ``deepspeed --num_gpus 8 -m mammorg stage2 train --config ...
deepspeed.config=deepspeed/zero3`` or ``torchrun --nproc_per_node 2 -m mammorg ...``.

setup (tokenizer -> decoder -> LoRA -> generator -> back-end) -> train (the skeleton's epoch loop:
length-grouped batches, report-only loss, validation loss, checkpoints, exact resume) -> save
(the generator folders in ``checkpoints/best`` and ``last``, complete weights gathered from ZeRO-3).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mammorg.config import save_config
from mammorg.io import MammorgError, atomic_path, read_jsonl
from mammorg.schema import read_predictions
from mammorg.training.backends import barrier, init_distributed, make_backend, mean_over_ranks
from mammorg.training.checkpoint import load_tensors, save_tensors
from mammorg.training.optim import cosine_with_warmup
from mammorg.training.recipe import EpochRecipe
from stage2_sft.assembly import (
    apply_lora,
    build_decoder,
    build_tokenizer,
    category_weights,
    check_runtime,
    compile_generator,
    lexicon_of,
    make_builder,
    report_vocabulary,
    trained_term_ids,
    uses_report_vocab,
    wrap,
)
from stage2_sft.config import Stage2Config
from stage2_sft.data import (
    PromptBuilder,
    ReportDataset,
    Sample,
    collate,
    length_grouped_batches,
    read_features,
    resolve_path,
)
from stage2_sft.model import ReportGenerator
from terminology.tokenizer import term_token_ids

TRAINABLE = "trainable.safetensors"


def visual_shape(predictions: str | Path) -> tuple[int, int]:
    """(tokens per view, feature dim) of the stage-1 feature files named in the predictions."""
    path = Path(predictions)
    rows = read_predictions(path)
    if not rows or rows[0].features is None:
        raise MammorgError(f"{path}: no feature tokens (run 'mammorg stage1 predict' with features)")
    tokens, _ = read_features(resolve_path(path.parent, rows[0].features))
    return int(tokens.shape[1]), int(tokens.shape[2])


def prepare_tokenizer(cfg: Stage2Config, run_dir: Path, rank: int) -> tuple[PreTrainedTokenizerBase, dict]:
    """Rank 0 builds (or a resumed run reuses) the tokenizer; every rank then loads it."""
    folder = run_dir / "tokenizer"
    pieces_file = folder / "term_pieces.json"
    if rank == 0 and not pieces_file.exists():
        texts = [
            r["report"]
            for r in read_jsonl(cfg.data.manifest)
            if r.get("split") == cfg.data.train_split and r.get("report")
        ]
        if not texts:
            raise MammorgError(f"{cfg.data.manifest}: no reports in split '{cfg.data.train_split}'")
        _, pieces = build_tokenizer(cfg, texts, folder)
        with atomic_path(pieces_file) as tmp:
            tmp.write_text(json.dumps(pieces))
    barrier()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tok, json.loads(pieces_file.read_text())


def zero_stage(cfg: Stage2Config) -> int:
    """The ZeRO stage of the run's DeepSpeed config (0 without one)."""
    if not cfg.deepspeed.config:
        return 0
    from mammorg.config import resolve_config

    raw = json.loads(resolve_config(cfg.deepspeed.config).read_text())
    return int(raw.get("zero_optimization", {}).get("stage", 0))


def datasets(cfg: Stage2Config, builder: PromptBuilder) -> tuple[ReportDataset, ReportDataset]:
    def make(split: str, **kw: Any) -> ReportDataset:
        return ReportDataset(cfg.data.manifest, cfg.data.predictions, builder, split, cfg.knowledge.source, **kw)

    train = make(
        cfg.data.train_split,
        visual_drop=cfg.visual.drop_rate,
        gold_fraction=cfg.knowledge.gold_fraction,
        seed=cfg.seed,
        gold_heads=tuple(cfg.knowledge.gold_heads),
    )
    if len(train) == 0:
        raise MammorgError(f"{cfg.data.manifest}: no exams with reports in split '{cfg.data.train_split}'")
    return train, make(cfg.data.val_split)


class Stage2Recipe(EpochRecipe):
    """The report decoder's fine-tuning (see the module docstring)."""

    def __init__(self, cfg: Stage2Config):
        super().__init__(cfg.run_dir, cfg.train)
        self.cfg = cfg

    def setup(self) -> None:
        cfg = self.cfg
        check_runtime(cfg)
        self.device = init_distributed(bool(cfg.deepspeed.config))
        if cfg.visual.dim is None or cfg.visual.tokens_per_view is None:
            cfg.visual.tokens_per_view, cfg.visual.dim = visual_shape(cfg.data.predictions)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir)
        self.tok, pieces = prepare_tokenizer(cfg, self.run_dir, self.rank)
        self.train_ds, self.val_ds = datasets(cfg, make_builder(cfg, self.tok))
        reports = [self.train_ds.report_ids(i) for i in range(len(self.train_ds))]
        term_ids = trained_term_ids(cfg, self.tok, pieces)
        vocab = None
        if zero_stage(cfg) == 3 and not cfg.lora.enabled:  # full fine-tuning under ZeRO-3: the plain LM head
            term_ids = None  # (every row trains anyway; a partitioned head is read only inside its own forward)
        elif uses_report_vocab(cfg, self.tok):
            terms = term_token_ids(self.tok, lexicon_of(cfg.terminology))
            vocab = report_vocabulary(self.tok, reports, terms)
        model = self.build_generator(pieces, term_ids, vocab).to(self.device)
        weights = category_weights(cfg, self.tok, reports, model.term_weights)
        model.term_weights = None if weights is None else weights.to(self.device)
        self.lengths = self.train_ds.lengths()
        per_epoch = len(length_grouped_batches(self.lengths, cfg.train.batch_size, cfg.seed, 0, self.rank, self.world))
        params = [p for p in model.parameters() if p.requires_grad]
        self.decoder_trainable = {
            n for n, p in model.named_parameters() if p.requires_grad and n.startswith("decoder.")
        }
        if cfg.train.align_epochs and cfg.deepspeed.config:
            raise MammorgError("train.align_epochs needs the plain torch back-end (no deepspeed.config)")
        fused = torch.cuda.is_available() and not cfg.deepspeed.config  # one kernel for all parameters
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)
        steps = cfg.train.epochs * math.ceil(per_epoch / cfg.train.grad_accum)
        self.backend = make_backend(
            model,
            optimizer,
            cosine_with_warmup(optimizer, cfg.train.warmup_steps, steps),
            deepspeed_config=cfg.deepspeed.config,
            batch_size=cfg.train.batch_size,
            grad_accum=cfg.train.grad_accum,
            clip=cfg.train.clip,
        )

    def build_generator(
        self, pieces: dict, term_ids: torch.Tensor | None = None, vocab: torch.Tensor | None = None
    ) -> ReportGenerator:
        """Decoder (+ LoRA, saving the frozen base once) wrapped with projector and knowledge."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        decoder: Any = build_decoder(cfg.decoder, self.tok, pieces)
        if cfg.lora.enabled:
            base = self.run_dir / "base_decoder"
            if self.rank == 0 and not (base / "config.json").exists():
                tmp = self.run_dir / ".base_decoder.tmp"
                decoder.save_pretrained(str(tmp), safe_serialization=True)
                shutil.rmtree(base, ignore_errors=True)
                tmp.rename(base)
            decoder = apply_lora(decoder, cfg.lora)
        if cfg.decoder.gradient_checkpointing:
            decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert cfg.visual.dim is not None
        model = wrap(cfg, decoder, self.tok, cfg.visual.dim, term_ids, vocab)
        if cfg.train.compile:
            compile_generator(model)
        return model

    @property
    def generator(self) -> ReportGenerator:
        module = self.backend.module
        assert isinstance(module, ReportGenerator)
        return module

    def loss(self, samples: list[Sample]) -> torch.Tensor:
        batch = collate(samples, self.tok.pad_token_id).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.backend.model(
                batch.input_ids, batch.attention_mask, batch.labels, batch.visual, batch.knowledge
            )

    def set_alignment(self, on: bool) -> None:
        """Alignment phase (LLaVA's first stage): the decoder frozen, LoRA adapters included;
        the projector, soft knowledge and term rows train."""
        for name, param in self.generator.named_parameters():
            if name.startswith("decoder."):
                param.requires_grad_(not on and name in self.decoder_trainable)

    def train_epoch(self, epoch: int) -> float:
        cfg, losses = self.cfg, []
        if cfg.train.align_epochs:
            self.set_alignment(epoch < cfg.train.align_epochs)
        batches = length_grouped_batches(self.lengths, cfg.train.batch_size, cfg.seed, epoch, self.rank, self.world)
        self.train_ds.epoch = epoch
        for i, idx in enumerate(tqdm(batches, desc=f"stage2 epoch {epoch}", disable=self.rank != 0, leave=False)):
            loss = self.loss([self.train_ds[j] for j in idx])
            self.backend.backward(loss)
            self.backend.step(last_of_epoch=i + 1 == len(batches))
            losses.append(float(loss.detach()))
        return mean_over_ranks(sum(losses) / max(len(losses), 1))

    @torch.no_grad()
    def validate(self, epoch: int, train_loss: float) -> tuple[float | None, dict[str, Any]]:
        """Validation loss on every rank (the whole split); the score is its negative."""
        lr = self.backend.scheduler.get_last_lr()[0]
        if len(self.val_ds) == 0:
            return None, {"val_loss": None, "lr": lr}
        self.generator.eval()
        size = self.cfg.train.batch_size
        losses = [
            float(self.loss([self.val_ds[j] for j in range(i, min(i + size, len(self.val_ds)))]))
            for i in range(0, len(self.val_ds), size)
        ]
        self.generator.train()
        val = sum(losses) / len(losses)
        return -val, {"val_loss": val, "lr": lr}

    def gathered_state(self) -> dict[str, torch.Tensor]:
        """The weights to save (complete, ZeRO-3 partitions gathered): trainable ones under LoRA,
        all with full fine-tuning; only rank 0 receives them."""
        named = [(n, p) for n, p in self.generator.named_parameters() if p.requires_grad or not self.cfg.lora.enabled]
        state: dict[str, torch.Tensor] = {}
        with self.backend.gathered([p for _, p in named]):
            if self.rank == 0:
                state = {n: p.detach().float().cpu().clone() for n, p in named}
        return state

    def write_weights(self, folder: Path) -> None:
        """The generator folder (decoder or adapter, extras) and the trainable weights for resume."""
        state = self.gathered_state()
        if self.rank != 0:
            return
        trainable = {n for n, p in self.generator.named_parameters() if p.requires_grad}
        save_tensors({n: v for n, v in state.items() if n in trainable}, folder / TRAINABLE)
        self.generator.save_pretrained(folder, state)

    def read_weights(self, folder: Path) -> None:
        weights = load_tensors(folder / TRAINABLE)
        unexpected = self.generator.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise MammorgError(f"{folder / TRAINABLE}: checkpoint does not match the model ({unexpected[0]})")

    def result(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "best_val_loss": -self.best if math.isfinite(self.best) else None,
        }


def train(cfg: Stage2Config) -> dict[str, Any]:
    """Train (or resume) a stage-2 run."""
    return Stage2Recipe(cfg).run()
