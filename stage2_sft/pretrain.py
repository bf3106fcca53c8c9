"""Recipe: ``mammorg stage2 pretrain --config configs/stage2/pretrain.yaml [key=value ...]``.

Domain pre-training of the small from-scratch decoder on report text (causal LM on whole
reports), saved as a plain Hugging Face folder (model + tokenizer with atomic lexicon terms).
Point ``decoder.name_or_path`` at it to fine-tune it with LoRA like any local pretrained model.
setup (BPE tokenizer, Llama) → train (length-grouped batches) → save (``save_pretrained``).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from mammorg.config import load_config, save_config
from mammorg.io import MammorgError, read_jsonl
from mammorg.optim import cosine_with_warmup
from stage2_sft.data import length_grouped_batches
from terminology.lexicon import load_lexicon
from terminology.normalize import Normalizer
from terminology.tokenizer import train_bpe_tokenizer


def report_texts(manifest: str, split: str | None) -> list[str]:
    texts = [r["report"] for r in read_jsonl(manifest)
             if r.get("report") and (split is None or r.get("split") == split)]
    if not texts:
        raise MammorgError(f"{manifest}: no reports" + (f" in split '{split}'" if split else ""))
    return texts


def encode(tok, texts: list[str], normalizer: Normalizer, max_tokens: int) -> list[list[int]]:
    ids = tok([normalizer(t) for t in texts], add_special_tokens=False)["input_ids"]
    return [[tok.bos_token_id] + x[: max_tokens - 2] + [tok.eos_token_id] for x in ids]


def batch_tensors(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], attn[i, :len(s)] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": attn, "labels": ids.masked_fill(attn == 0, -100)}


def run(cfg: DictConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, "pretrain_config.yaml")
    torch.manual_seed(cfg.seed)
    lexicon = load_lexicon(cfg.lexicon) if cfg.lexicon else load_lexicon()
    texts = report_texts(cfg.data.manifest, cfg.data.split)
    tok = train_bpe_tokenizer(texts, lexicon, out, cfg.vocab_size)
    seqs = encode(tok, texts, Normalizer(lexicon), cfg.max_tokens)
    arch = OmegaConf.to_container(cfg.model, resolve=True)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         **arch))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    per_epoch = math.ceil(len(seqs) / cfg.train.batch_size)
    sched = cosine_with_warmup(opt, cfg.train.warmup_steps, cfg.train.epochs * per_epoch)
    lengths = [len(s) for s in seqs]
    losses = []
    for epoch in range(cfg.train.epochs):
        epoch_losses = []
        for idx in tqdm(length_grouped_batches(lengths, cfg.train.batch_size, cfg.seed, epoch),
                        desc=f"pretrain epoch {epoch}", leave=False):
            batch = {k: v.to(device) for k, v in batch_tensors([seqs[i] for i in idx],
                                                               tok.pad_token_id).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            epoch_losses.append(float(loss.detach()))
        losses.append(sum(epoch_losses) / len(epoch_losses))
        print(f"epoch {epoch}: lm_loss={losses[-1]:.4f}")
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    with open(out / "pretrain_log.json", "w", encoding="utf-8") as fh:
        json.dump({"reports": len(texts), "epoch_losses": losses}, fh)
    return {"out_dir": str(out), "reports": len(texts), "final_loss": losses[-1] if losses else None}


def main(args: argparse.Namespace) -> None:
    print(json.dumps(run(load_config(args.config, args.overrides))))
