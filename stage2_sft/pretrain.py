"""Recipe: ``mammorg stage2 pretrain --config stage2/pretrain [key=value ...]``.

Domain pre-training of the small from-scratch decoder on report text (causal LM on whole
reports), saved as a plain Hugging Face folder (model + tokenizer with atomic lexicon terms).
Point ``decoder.name_or_path`` at it to fine-tune it with LoRA like any local pretrained model.
setup (BPE tokenizer, Llama) -> train (the skeleton's epoch loop: length-grouped batches,
checkpoints, exact resume) -> save (``save_pretrained``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mammorg.config import save_config
from mammorg.io import MammorgError, read_jsonl, write_text_atomic
from mammorg.training.backends import TorchBackend
from mammorg.training.checkpoint import load_tensors, save_tensors
from mammorg.training.optim import cosine_with_warmup
from mammorg.training.recipe import EpochRecipe
from stage2_sft.config import PretrainConfig
from stage2_sft.data import length_grouped_batches
from terminology.lexicon import load_lexicon
from terminology.normalize import Normalizer
from terminology.tokenizer import train_bpe_tokenizer

WEIGHTS = "model.safetensors"


def report_texts(manifest: str, split: str | None) -> list[str]:
    texts = [
        r["report"] for r in read_jsonl(manifest) if r.get("report") and (split is None or r.get("split") == split)
    ]
    if not texts:
        raise MammorgError(f"{manifest}: no reports" + (f" in split '{split}'" if split else ""))
    return texts


def encode(tok: PreTrainedTokenizerBase, texts: list[str], normalizer: Normalizer, max_tokens: int) -> list[list[int]]:
    ids = tok([normalizer(t) for t in texts], add_special_tokens=False)["input_ids"]
    return [[tok.bos_token_id, *x[: max_tokens - 2], tok.eos_token_id] for x in ids]


def batch_tensors(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], attn[i, : len(s)] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": attn, "labels": ids.masked_fill(attn == 0, -100)}


class PretrainRecipe(EpochRecipe):
    """Causal-LM pre-training of a small Llama on report text (one process)."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg.out_dir, cfg.train)
        self.cfg = cfg
        self.losses: list[float] = []

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir, "pretrain_config.yaml")
        torch.manual_seed(cfg.seed)
        lexicon = load_lexicon(cfg.lexicon) if cfg.lexicon else load_lexicon()
        texts = report_texts(cfg.data.manifest, cfg.data.split)
        self.tok = train_bpe_tokenizer(texts, lexicon, self.run_dir, cfg.vocab_size)
        self.seqs = encode(self.tok, texts, Normalizer.for_reports(lexicon), cfg.max_tokens)
        self.model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(self.tok),
                bos_token_id=self.tok.bos_token_id,
                eos_token_id=self.tok.eos_token_id,
                pad_token_id=self.tok.pad_token_id,
                **dict(cfg.model),
            )
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.train()
        self.model.to(self.device)  # type: ignore[arg-type]
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        per_epoch = math.ceil(len(self.seqs) / cfg.train.batch_size)
        sched = cosine_with_warmup(opt, cfg.train.warmup_steps, cfg.train.epochs * per_epoch)
        self.backend = TorchBackend(self.model, opt, sched, grad_accum=1, clip=1.0)
        self.texts = len(texts)

    def train_epoch(self, epoch: int) -> float:
        cfg, losses = self.cfg, []
        lengths = [len(s) for s in self.seqs]
        for idx in tqdm(
            length_grouped_batches(lengths, cfg.train.batch_size, cfg.seed, epoch),
            desc=f"pretrain epoch {epoch}",
            leave=False,
        ):
            batch = {
                k: v.to(self.device)
                for k, v in batch_tensors([self.seqs[i] for i in idx], self.tok.pad_token_id).items()
            }
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                loss = self.model(**batch, use_cache=False).loss
            self.backend.backward(loss)
            self.backend.step()
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def validate(self, epoch: int, train_loss: float) -> tuple[float | None, dict[str, Any]]:
        return None, {}

    def write_weights(self, folder: Path) -> None:
        save_tensors(self.model.state_dict(), folder / WEIGHTS)

    def read_weights(self, folder: Path) -> None:
        self.model.load_state_dict(load_tensors(folder / WEIGHTS))

    def finish(self) -> None:
        """The plain HF folder (model + tokenizer) and the loss log."""
        self.model.save_pretrained(str(self.run_dir), safe_serialization=True)
        self.tok.save_pretrained(str(self.run_dir))
        log = self.run_dir / "metrics.jsonl"
        self.losses = [json.loads(x)["train_loss"] for x in log.read_text().splitlines()] if log.exists() else []
        write_text_atomic(
            self.run_dir / "pretrain_log.json",
            json.dumps({"reports": self.texts, "epoch_losses": self.losses}),
        )

    def result(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.run_dir),
            "reports": self.texts,
            "final_loss": self.losses[-1] if self.losses else None,
        }


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pre-train (or resume) the small decoder."""
    return PretrainRecipe(cfg).run()
