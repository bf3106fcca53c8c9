"""Assemble the stage-2 model from a config: tokenizer, decoder, LoRA, and reloading a saved one.

A saved generator folder (a run's checkpoint or an export bundle) holds::

    tokenizer/                 HF tokenizer with terminology and stage-2 special tokens
    decoder/                   HF model folder (full weights), or a PEFT adapter folder
    base_decoder/              the frozen base model under a LoRA adapter (LoRA only)
    extras.safetensors         projector and soft-knowledge weights
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedModel, PreTrainedTokenizerBase)

from mammorg.io import MammorgError
from stage2_sft.knowledge import HEAD_KEYS, MODES, SOURCES, plan_category_tokens, verbal_forms
from stage2_sft.data import PromptBuilder
from stage2_sft.model import ReportGenerator, SpecialIds, prompt_tokens
from terminology.lexicon import load_lexicon
from terminology.normalize import Normalizer
from terminology.tokenizer import (extend_tokenizer, frequency_balanced_weights, init_term_embeddings,
                                   term_loss_weights, term_token_ids, train_bpe_tokenizer)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_config(cfg: DictConfig) -> None:
    if cfg.knowledge.mode not in MODES:
        raise MammorgError(f"knowledge.mode={cfg.knowledge.mode!r}: expected one of {', '.join(MODES)}")
    if cfg.knowledge.source not in SOURCES:
        raise MammorgError(f"knowledge.source={cfg.knowledge.source!r}: expected {' or '.join(SOURCES)}")
    gold_fraction = cfg.knowledge.get("gold_fraction", 0.0)  # runs saved before the key existed
    if not 0.0 <= float(gold_fraction) <= 1.0:
        raise MammorgError(f"knowledge.gold_fraction={gold_fraction}: expected 0..1")
    heads = gold_heads(cfg)
    if not heads or not set(heads) <= set(HEAD_KEYS):
        raise MammorgError(f"knowledge.gold_heads={list(heads)}: expected a non-empty subset of "
                           f"{', '.join(HEAD_KEYS)}")
    if not cfg.decoder.name_or_path and not cfg.decoder.from_config:
        raise MammorgError("decoder: set name_or_path (a local model folder) or from_config")
    dtype = cfg.decoder.get("dtype", "float32")
    if dtype not in DTYPES:
        raise MammorgError(f"decoder.dtype={dtype!r}: expected {' or '.join(DTYPES)}")
    if dtype == "bfloat16" and not torch.cuda.is_available():
        raise MammorgError("decoder.dtype=bfloat16 trains under CUDA autocast: it needs a GPU")


def gold_heads(cfg: DictConfig) -> tuple[str, ...]:
    """The stage-1 heads whose labels stand in for predictions when knowledge is gold."""
    heads = cfg.knowledge.get("gold_heads")
    return tuple(HEAD_KEYS) if heads is None else tuple(heads)  # runs saved before the key: all


def _lexicon(cfg: DictConfig):
    return load_lexicon(cfg.terminology.lexicon) if cfg.terminology.lexicon else load_lexicon()


def _local_pretrained(path: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MammorgError(f"{folder}: not a local Hugging Face model folder (no config.json); "
                           "models are never downloaded")
    return folder


def build_tokenizer(cfg: DictConfig, train_texts: list[str], out_dir: Path
                    ) -> tuple[PreTrainedTokenizerBase, dict[str, list[int]]]:
    """The decoder's tokenizer with atomic lexicon terms (optional) and stage-2 special tokens."""
    lexicon = _lexicon(cfg)
    pieces: dict[str, list[int]] = {}
    if cfg.decoder.name_or_path:
        tok = AutoTokenizer.from_pretrained(_local_pretrained(cfg.decoder.name_or_path),
                                            local_files_only=True)
        if cfg.terminology.atomic_terms:
            pieces = extend_tokenizer(tok, lexicon)
    else:
        tok = train_bpe_tokenizer(train_texts, lexicon, out_dir, cfg.terminology.vocab_size,
                                  atomic_terms=cfg.terminology.atomic_terms)
    tok.add_tokens(prompt_tokens(), special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(out_dir))
    return tok, pieces


def build_decoder(cfg: DictConfig, tok: PreTrainedTokenizerBase,
                  pieces: dict[str, list[int]]) -> PreTrainedModel:
    """A local pretrained causal LM (embeddings resized for new tokens) or a fresh Llama, in
    ``decoder.dtype`` (float32, or bfloat16 on a GPU)."""
    dtype = DTYPES[cfg.decoder.get("dtype", "float32")]
    if cfg.decoder.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(_local_pretrained(cfg.decoder.name_or_path),
                                                     local_files_only=True, dtype=dtype,
                                                     attn_implementation=cfg.decoder.attn_implementation)
        init_term_embeddings(model, tok, pieces)  # also resizes for the special tokens
        return model
    arch = OmegaConf.to_container(cfg.decoder.from_config, resolve=True)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **arch)
    config._attn_implementation = cfg.decoder.attn_implementation
    return LlamaForCausalLM(config).to(dtype)


def apply_lora(decoder: PreTrainedModel, lora: DictConfig) -> PeftModel:
    """LoRA adapters with fp32 weights on any base dtype. PEFT's cast of each adapter's input to
    fp32 is switched off: under CUDA autocast the adapter matmuls run in bf16 like the base's
    (no fp32 copies of the activations), and an fp32 base needs no cast."""
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules),
                        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
                        task_type="CAUSAL_LM")
    model = get_peft_model(decoder, config)
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    return model


def compile_decoder(decoder: PreTrainedModel) -> int:
    """``torch.compile`` each transformer block in place; returns the number of compiled modules.

    Blocks share one graph (torchtune's per-layer compile), so compilation is quick and state-dict
    keys are unchanged. Models without a ``layers`` list are compiled whole.
    """
    body = decoder.get_decoder() if hasattr(decoder, "get_decoder") else None
    layers = getattr(body, "layers", None)
    if layers is None:
        decoder.compile()
        return 1
    for layer in layers:
        layer.compile()
    return len(layers)


def compile_generator(model: ReportGenerator) -> int:
    """Compile the decoder blocks and the report loss; returns the number of compiled modules."""
    model.compile_loss()
    return compile_decoder(model.decoder)


def term_weights(cfg: DictConfig, tok: PreTrainedTokenizerBase) -> torch.Tensor | None:
    if not cfg.terminology.term_loss_weight or cfg.terminology.term_loss_weight == 1.0:
        return None
    ids = term_token_ids(tok, _lexicon(cfg))
    return term_loss_weights(len(tok), ids, cfg.terminology.term_loss_weight)


def category_weights(cfg: DictConfig, tok: PreTrainedTokenizerBase, reports: Iterable[list[int]],
                     base: torch.Tensor | None) -> torch.Tensor | None:
    """Loss weights with ``terminology.category_weight_power`` p > 0: each BI-RADS category term
    (an atomic token) weighs ``(mean count / its count) ** p`` over the training reports, so
    that stating a rare category (4C, 5) counts as much as the common ones. With an assessment
    plan, the plan's category tokens are weighted the same way, among themselves."""
    power = float(cfg.terminology.get("category_weight_power", 0.0))
    if not power:
        return base
    weights = base if base is not None else torch.ones(len(tok))
    counts = Counter(token for report in reports for token in report)
    groups = [[term.term for term in _lexicon(cfg).terms if "birads" in term.label]]
    if cfg.data.get("assessment_plan", False):
        groups.append(plan_category_tokens())
    for group in groups:
        ids = [i for i in tok.convert_tokens_to_ids(group) if i is not None and i != tok.unk_token_id]
        weights = frequency_balanced_weights(weights, ids, counts, power)
    return weights


def verbal_table(tok: PreTrainedTokenizerBase, forms: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocabulary id → row, rows of word-piece ids padded with -1) for ``ReportGenerator``; the
    pieces are those of the words as written mid-sentence, bare-space pieces left out."""
    row = torch.full((len(tok),), -1, dtype=torch.long)
    seqs = []
    for token, words in forms.items():
        row[tok.convert_tokens_to_ids(token)] = len(seqs)
        ids = tok(" " + words, add_special_tokens=False)["input_ids"]  # as written mid-sentence
        seqs.append([i for i in ids if tok.decode([i]).strip()])  # without bare-space pieces
    pieces = torch.full((len(seqs), max(map(len, seqs))), -1, dtype=torch.long)
    for i, ids in enumerate(seqs):
        pieces[i, :len(ids)] = torch.tensor(ids)
    return row, pieces


def wrap(cfg: DictConfig, decoder: PreTrainedModel, tok: PreTrainedTokenizerBase,
         visual_dim: int) -> ReportGenerator:
    verbal = None
    if cfg.knowledge.get("verbal_tie", False) and cfg.knowledge.mode in ("discrete", "both"):
        verbal = verbal_table(tok, verbal_forms(_lexicon(cfg)))
    return ReportGenerator(decoder, SpecialIds.from_tokenizer(tok), visual_dim,
                           cfg.knowledge.mode, term_weights(cfg, tok), verbal)


def make_builder(cfg: DictConfig, tok: PreTrainedTokenizerBase) -> PromptBuilder:
    """The prompt/report tokeniser of a stage-2 config (training, generation and bundles alike)."""
    return PromptBuilder(tok, cfg.visual.tokens_per_view, cfg.knowledge.mode, cfg.visual.enabled,
                         cfg.data.max_report_tokens, normalizer_for(cfg),
                         bool(cfg.knowledge.get("confidence", True)),  # older runs lack these keys
                         bool(cfg.data.get("assessment_plan", False)))


def normalizer_for(cfg: DictConfig) -> Normalizer | None:
    if not cfg.terminology.normalize:
        return None
    return Normalizer(_lexicon(cfg))


def load_generator(folder: str | Path, cfg: DictConfig, visual_dim: int,
                   shared: str | Path | None = None, dtype: torch.dtype = torch.float32
                   ) -> tuple[ReportGenerator, PreTrainedTokenizerBase]:
    """Reload a saved generator (see module docstring); ``tokenizer/`` and ``base_decoder/`` are
    looked up in ``shared`` (a run folder) when given, else in ``folder`` (a bundle)."""
    folder = Path(folder)
    shared = Path(shared) if shared is not None else folder
    tok = AutoTokenizer.from_pretrained(str(shared / "tokenizer"), local_files_only=True)
    if (folder / "decoder" / "adapter_config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(str(shared / "base_decoder"), dtype=dtype,
                                                    local_files_only=True)
        decoder = PeftModel.from_pretrained(base, str(folder / "decoder"))
    else:
        decoder = AutoModelForCausalLM.from_pretrained(str(folder / "decoder"), dtype=dtype,
                                                       local_files_only=True)
    model = wrap(cfg, decoder, tok, visual_dim)
    extras = load_file(str(folder / "extras.safetensors"))
    missing, unexpected = model.load_state_dict(extras, strict=False)
    wrong = [k for k in missing if not k.startswith("decoder.")] + list(unexpected)
    if wrong:
        raise MammorgError(f"{folder / 'extras.safetensors'}: weights do not match the config "
                           f"({', '.join(wrong[:3])})")
    return model.to(dtype).eval(), tok
