"""Stage-2 throughput: the generator (visual + knowledge tokens) vs. a bare transformers(+peft) loop.

Usage: python benchmarks/stage2_throughput.py [--shape llama-3.2-1b|gemma-3-270m|gemma-3-1b|tiny]
           [--batch 8] [--seq 1024] [--gen-batch 32] [--compile | --no-compile] [--report-vocab N]
           [--modes full lora] [--no-generate]
Defaults: a Llama-3.2-1B-shaped decoder (random init, bf16 weights, sdpa) on a GPU; the tiny
default (configs/stage2/tiny.yaml) in fp32 on CPU. Both loops see the same token batches; the
recipe's carry four views of visual tokens filled through the projector with masked_scatter.
Reports training tokens/s for full fine-tuning and LoRA (rank 16 on all seven projections), their
ratio to the bare loop, model FLOP utilisation on a GPU (``flops_per_token``), and generation
reports/s. The recipe's model computes logits only at report positions and, with --compile (the
default on a GPU, as train.compile=true), compiles each decoder block and the report loss; its
LoRA runs as ``apply_lora`` sets it up (under autocast on a GPU). The bare loops stay plain eager
transformers(+peft with its defaults), without autocast. With ``--report-vocab N`` the recipe's
model computes its loss over N report-vocabulary rows (``decoder.report_vocab_head``), as it does
for pretrained decoders with large vocabularies, and ``head_ratio`` compares it with the same
recipe on the full head (same batches, same run). Gemma shapes are Gemma 3 text models (262,144
pieces); the real Gemma 3 270M weights are not needed for speed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from stage2_sft.assembly import apply_lora, compile_generator  # noqa: E402
from stage2_sft.config import LoraSettings  # noqa: E402
from stage2_sft.model import ReportGenerator, SpecialIds  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    "gemma-3-270m": dict(
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        max_position_embeddings=32768,
        sliding_window=512,
        tie_word_embeddings=True,
    ),
    "gemma-3-1b": dict(
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        max_position_embeddings=32768,
        sliding_window=512,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1200,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
VISUAL_DIM, TOKENS_PER_VIEW = 128, 8
IMAGE_ID, KNOWLEDGE_ID, REPORT_ID = 3, 4, 5
LORA = dict(
    rank=16,
    alpha=32,
    dropout=0.0,
    modules_to_save=None,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def decoder(shape: str, device, dtype, lora: bool):
    """The bare model: transformers (+ peft with its defaults: fp32 adapters, fp32 input casts)."""
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (a 1B model's CPU init takes longer than its steps)
        if shape.startswith("gemma"):
            model: Any = Gemma3ForCausalLM(Gemma3TextConfig(**SHAPES[shape], attn_implementation="sdpa"))
        else:
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], attn_implementation="sdpa"))
    model = model.to(device, dtype)
    if lora:
        model = get_peft_model(
            model,
            LoraConfig(
                r=LORA["rank"],
                lora_alpha=LORA["alpha"],
                task_type="CAUSAL_LM",
                target_modules=LORA["target_modules"],
            ),
        )
    return model


def recipe_decoder(shape: str, device, dtype, lora: bool):
    """The recipe's model: the same weights; LoRA through ``apply_lora`` (fp32 adapters whose
    matmuls run under autocast, without PEFT's fp32 input casts)."""
    model = decoder(shape, device, dtype, False)
    return apply_lora(model, LoraSettings(enabled=True, **LORA)) if lora else model


def batches(n: int, batch: int, seq: int, vocab: int, device):
    """Token batches: 4 views x N image placeholders, then report tokens (labels on the report)."""
    out = []
    n_img = 4 * TOKENS_PER_VIEW
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(10, vocab, (batch, seq), generator=g)
        ids[:, 1 : 1 + n_img] = IMAGE_ID
        labels = ids.clone()
        labels[:, : 2 + n_img] = -100
        visual = torch.randn(batch * 4, TOKENS_PER_VIEW, VISUAL_DIM, generator=g)
        out.append(
            {
                k: v.to(device)
                for k, v in {
                    "input_ids": ids,
                    "labels": labels,
                    "visual": visual,
                    "attention_mask": torch.ones_like(ids),
                }.items()
            }
        )
    return out


def timed(step, data, warmup: int, device) -> float:
    for b in data[:warmup]:
        step(b)
    _sync(device)
    t0 = time.perf_counter()
    for b in data[warmup:]:
        step(b)
    _sync(device)
    return sum(b["input_ids"].numel() for b in data[warmup:]) / (time.perf_counter() - t0)


def train_step_fn(model, forward, amp: bool, device):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")

    def step(b):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = forward(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bare_rate(shape, lora, data, device, dtype, amp, warmup) -> tuple[float, int]:
    """Tokens/s of a plain transformers(+peft) loop; the model is freed on return."""
    bare = decoder(shape, device, dtype, lora)
    tps = timed(
        train_step_fn(
            bare,
            lambda b: bare(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss,
            amp,
            device,
        ),
        data,
        warmup,
        device,
    )
    return tps, sum(p.numel() for p in bare.parameters())


def recipe_rate(shape, lora, data, device, dtype, amp, warmup, compiled: bool, vocab: torch.Tensor | None) -> float:
    gen = generator(recipe_decoder(shape, device, dtype, lora), device, dtype, vocab)
    if compiled:
        compile_generator(gen)
    rate = timed(
        train_step_fn(gen, lambda b: gen(b["input_ids"], b["attention_mask"], b["labels"], b["visual"]), amp, device),
        data,
        warmup,
        device,
    )
    return rate


def measure(shape, lora, data, device, dtype, amp, warmup, compiled: bool, vocab: torch.Tensor | None):
    bare_tps, n_params = bare_rate(shape, lora, data, device, dtype, False, warmup)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ours = recipe_rate(shape, lora, data, device, dtype, amp, warmup, compiled, vocab)
    return ours, bare_tps, n_params


def flops_per_token(shape: str, n_params: int, seq: int) -> float:
    """Model FLOPs of one training token (PaLM's convention): 6 x parameters (tied embeddings
    counted once, as the output head's matmul) + 12 x layers x attention width x sequence."""
    cfg = SHAPES[shape]
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return 6 * n_params + 12 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * head_dim * seq


def report_vocab(n: int, vocab_size: int, data: list[dict]) -> torch.Tensor:
    """N ids that cover every target of the batches (as a report vocabulary covers the reports)."""
    ids = {int(i) for b in data for i in b["labels"][b["labels"] >= 0].unique().tolist()}
    ids |= set(range(min(n, vocab_size)))
    return torch.tensor(sorted(ids), dtype=torch.long)


def generator(model, device, dtype, vocab: torch.Tensor | None = None) -> ReportGenerator:
    gen = ReportGenerator(
        model, SpecialIds(IMAGE_ID, KNOWLEDGE_ID, REPORT_ID), VISUAL_DIM, "discrete", report_vocab=vocab
    )
    gen.to(device)
    gen.projector.to(dtype)
    return gen


def generation_rate(shape: str, batch: int, device, dtype) -> float:
    """Reports/s of 128-token greedy reports after four views' visual tokens (a fresh, uncompiled
    generator, as ``mammorg stage2 generate`` loads it; static KV cache on a GPU, as its default)."""
    gen = generator(decoder(shape, device, dtype, False), device, dtype).eval()
    ids = torch.full((batch, 2 + 4 * TOKENS_PER_VIEW), IMAGE_ID, device=device)
    ids[:, 0], ids[:, -1] = 1, REPORT_ID
    visual = torch.randn(batch * 4, TOKENS_PER_VIEW, VISUAL_DIM, device=device)
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
    if device.type == "cuda":
        kwargs["cache_implementation"] = "static"
    gen.generate(ids, mask, visual, None, **kwargs)  # warm-up (and compilation, if any)
    _sync(device)
    t0 = time.perf_counter()
    gen.generate(ids, mask, visual, None, **kwargs)
    _sync(device)
    return batch / (time.perf_counter() - t0)


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.2-1b" if gpu else "tiny", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=8 if gpu else 4)
    ap.add_argument("--seq", type=int, default=1024 if gpu else 256)
    ap.add_argument("--steps", type=int, default=12 if gpu else 8)
    ap.add_argument("--gen-batch", type=int, default=32 if gpu else 4)
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=gpu,
        help="torch.compile the recipe's decoder blocks (default: on a GPU)",
    )
    ap.add_argument("--report-vocab", type=int, default=0, help="report-vocabulary rows of the recipe's head")
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--no-generate", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    vocab_size = SHAPES[args.shape]["vocab_size"]
    # report targets drawn from a report-sized vocabulary when a report head is measured
    data = batches(args.steps, args.batch, args.seq, min(vocab_size, args.report_vocab or vocab_size), device)
    vocab = report_vocab(args.report_vocab, vocab_size, data).to(device) if args.report_vocab else None
    out = {
        "benchmark": "stage2_throughput",
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "shape": args.shape,
        "batch": args.batch,
        "seq": args.seq,
        "precision": "bf16" if gpu else "fp32",
        "visual_tokens": 4 * TOKENS_PER_VIEW,
        "compile": args.compile,
    }
    peak = next((v for k, v in PEAK_BF16.items() if gpu and k in out["device"]), None)
    out["report_vocab"] = None if vocab is None else int(vocab.numel())
    for mode in args.modes:  # the recipe runs LoRA under CUDA autocast (bf16 adapter matmuls)
        warmup = 3 if args.compile else 2
        ours, bare, n_params = measure(
            args.shape, mode == "lora", data, device, dtype, gpu and mode == "lora", warmup, args.compile, vocab
        )
        if vocab is not None:  # the same recipe with the full head: what the report head saves
            full_head = recipe_rate(
                args.shape, mode == "lora", data, device, dtype, gpu and mode == "lora", warmup, args.compile, None
            )
            out[f"{mode}_full_head_tokens_s"] = round(full_head, 1)
            out[f"{mode}_head_ratio"] = round(ours / full_head, 3)
        out[f"{mode}_tokens_s"] = round(ours, 1)
        out[f"{mode}_bare_tokens_s"] = round(bare, 1)
        out[f"{mode}_ratio"] = round(ours / bare, 3)
        if peak and mode == "full":
            # the recipe's head computes only its report-vocabulary rows: its FLOPs count those
            unused_head = 0 if vocab is None else (vocab_size - int(vocab.numel())) * SHAPES[args.shape]["hidden_size"]
            out["full_mfu"] = round(flops_per_token(args.shape, n_params - unused_head, args.seq) * ours / peak, 3)
            out["full_bare_mfu"] = round(flops_per_token(args.shape, n_params, args.seq) * bare / peak, 3)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_generate:
        out["generate_batch"] = args.gen_batch
        out["generate_reports_s"] = round(generation_rate(args.shape, args.gen_batch, device, dtype), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
