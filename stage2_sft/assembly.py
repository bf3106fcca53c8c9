"""Assemble the stage-2 model from a config: tokenizer, decoder, LoRA, loss weights, prompt builder.

Saving and reloading a generator is ``ReportGenerator.save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mammorg.io import MammorgError
from stage2_sft.config import DecoderSettings, LoraSettings, Stage2Config, TerminologySettings
from stage2_sft.data import PromptBuilder
from stage2_sft.importer import language_model_of
from stage2_sft.knowledge import KnowledgeVocabulary
from stage2_sft.model import ReportGenerator, SpecialIds, prompt_token_words, prompt_tokens, token_id
from terminology.lexicon import Lexicon, load_lexicon
from terminology.normalize import Normalizer
from terminology.tokenizer import (
    extend_tokenizer,
    frequency_balanced_weights,
    init_term_embeddings,
    term_loss_weights,
    term_token_ids,
    train_bpe_tokenizer,
    word_pieces,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_runtime(cfg: Stage2Config) -> None:
    """What the config asks of this machine."""
    if cfg.decoder.dtype == "bfloat16" and not torch.cuda.is_available():
        raise MammorgError("decoder.dtype=bfloat16 trains under CUDA autocast: it needs a GPU")


def lexicon_of(terminology: TerminologySettings) -> Lexicon:
    return load_lexicon(terminology.lexicon) if terminology.lexicon else load_lexicon()


def _local_pretrained(path: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MammorgError(
            f"{folder}: not a local Hugging Face model folder (no config.json); models are never downloaded"
        )
    return folder


def load_pretrained(name_or_path: str, dtype: torch.dtype, attn_implementation: str = "sdpa") -> Any:
    """A local pretrained model; a multimodal one (Gemma 3 / MedGemma's class) loads whole, its
    language model is taken by ``language_model_of``."""
    folder = _local_pretrained(name_or_path)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    loader: Any = AutoModelForImageTextToText if hasattr(config, "text_config") else AutoModelForCausalLM
    return loader.from_pretrained(
        str(folder), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
    )


def build_tokenizer(
    cfg: Stage2Config, train_texts: list[str], out_dir: Path
) -> tuple[PreTrainedTokenizerBase, dict[str, list[int]]]:
    """The decoder's tokenizer with atomic lexicon terms (optional) and stage-2 special tokens.

    For a pretrained decoder also the piece ids of each added token: of a term its own pieces, of
    a prompt token those of the words it stands for (``prompt_token_words``); their mean starts
    the token's embedding row."""
    lexicon = lexicon_of(cfg.terminology)
    pieces: dict[str, list[int]] = {}
    if cfg.decoder.name_or_path:
        tok = AutoTokenizer.from_pretrained(_local_pretrained(cfg.decoder.name_or_path), local_files_only=True)
        prompt_pieces = {t: word_pieces(tok, " " + words) for t, words in prompt_token_words(lexicon).items()}
        if cfg.terminology.atomic_terms:
            pieces = extend_tokenizer(tok, lexicon)
    else:
        tok = train_bpe_tokenizer(
            train_texts,
            lexicon,
            out_dir,
            cfg.terminology.vocab_size,
            atomic_terms=cfg.terminology.atomic_terms,
        )
    tok.add_tokens(prompt_tokens(), special_tokens=True)
    if cfg.decoder.name_or_path:
        pieces |= prompt_pieces
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(out_dir))
    return tok, pieces


def build_decoder(cfg: DecoderSettings, tok: PreTrainedTokenizerBase, pieces: dict[str, list[int]]) -> PreTrainedModel:
    """A local pretrained causal LM (embeddings resized for new tokens) or a fresh Llama, in
    ``decoder.dtype`` (float32, or bfloat16 on a GPU)."""
    dtype = DTYPES[cfg.dtype]
    model: Any
    if cfg.name_or_path:
        model = language_model_of(load_pretrained(cfg.name_or_path, dtype, cfg.attn_implementation))
        init_term_embeddings(model, tok, pieces)  # also resizes for the special tokens
        return model
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **dict(cfg.from_config),
    )
    config._attn_implementation = cfg.attn_implementation
    model = LlamaForCausalLM(config)
    return model.to(dtype)


def apply_lora(decoder: PreTrainedModel, lora: LoraSettings) -> PeftModel:
    """LoRA adapters with fp32 weights on any base dtype. PEFT's cast of each adapter's input to
    fp32 is switched off: under CUDA autocast the adapter matmuls run in bf16 like the base's
    (no fp32 copies of the activations), and an fp32 base needs no cast."""
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(decoder, config)
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            setattr(module, "cast_input_dtype_enabled", False)  # noqa: B010
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


def term_weights(terminology: TerminologySettings, tok: PreTrainedTokenizerBase) -> torch.Tensor | None:
    if not terminology.term_loss_weight or terminology.term_loss_weight == 1.0:
        return None
    ids = term_token_ids(tok, lexicon_of(terminology))
    return term_loss_weights(len(tok), ids, terminology.term_loss_weight)


def category_weights(
    cfg: Stage2Config, tok: PreTrainedTokenizerBase, reports: Iterable[list[int]], base: torch.Tensor | None
) -> torch.Tensor | None:
    """Loss weights with ``terminology.category_weight_power`` p > 0: each BI-RADS category term
    (an atomic token) weighs ``(mean count / its count) ** p`` over the training reports, so
    that stating a rare category (4C, 5) counts as much as the common ones. With an assessment
    plan, the plan's category tokens are weighted the same way, among themselves."""
    power = cfg.terminology.category_weight_power
    if not power:
        return base
    weights = base if base is not None else torch.ones(len(tok))
    counts = Counter(token for report in reports for token in report)
    groups = [[term.term for term in lexicon_of(cfg.terminology).terms if "birads" in term.label]]
    if cfg.data.assessment_plan:
        groups.append([t for row in KnowledgeVocabulary.plan_categories() for t in row])
    for group in groups:
        found: Any = tok.convert_tokens_to_ids(group)
        ids = [i for i in found if i is not None and i != tok.unk_token_id]
        weights = frequency_balanced_weights(weights, ids, counts, power)
    return weights


def verbal_table(tok: PreTrainedTokenizerBase, forms: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocabulary id → row, rows of word-piece ids padded with -1) for ``ReportGenerator``; the
    pieces are those of the words as written mid-sentence, bare-space pieces left out."""
    row = torch.full((len(tok),), -1, dtype=torch.long)
    seqs: list[list[int]] = []
    for token, words in forms.items():
        row[token_id(tok, token)] = len(seqs)
        seqs.append(word_pieces(tok, " " + words))  # as written mid-sentence
    pieces = torch.full((len(seqs), max(map(len, seqs))), -1, dtype=torch.long)
    for i, ids in enumerate(seqs):
        pieces[i, : len(ids)] = torch.tensor(ids)
    return row, pieces


def trained_term_ids(
    cfg: Stage2Config, tok: PreTrainedTokenizerBase, pieces: dict[str, list[int]]
) -> torch.Tensor | None:
    """Ids of the tokens added to a pretrained vocabulary (lexicon terms, prompt and knowledge
    tokens), whose rows train (also under LoRA: a frozen random row cannot say what it stands for)."""
    if not (cfg.decoder.name_or_path and cfg.terminology.train_term_rows) or not pieces:
        return None
    return torch.tensor(sorted(token_id(tok, t) for t in pieces), dtype=torch.long)


def uses_report_vocab(cfg: Stage2Config, tok: PreTrainedTokenizerBase) -> bool:
    setting = cfg.decoder.report_vocab_head
    return setting == "always" or (setting == "auto" and len(tok) > 32768)


def report_vocabulary(
    tok: PreTrainedTokenizerBase, reports: Iterable[list[int]], extra: Iterable[int] = ()
) -> torch.Tensor:
    """Sorted ids of the report vocabulary: every token of the training targets (reports, plans),
    the lexicon terms, the special tokens and eos/pad."""
    ids = {i for report in reports for i in report} | set(extra)
    ids |= {int(i) for i in tok.all_special_ids} | {int(tok.eos_token_id), int(tok.pad_token_id)}
    return torch.tensor(sorted(ids), dtype=torch.long)


def wrap(
    cfg: Stage2Config,
    decoder: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    visual_dim: int,
    term_ids: torch.Tensor | None = None,
    report_vocab: torch.Tensor | None = None,
) -> ReportGenerator:
    """The generator around a decoder, as the config describes it."""
    verbal = None
    if cfg.knowledge.verbal_tie and cfg.knowledge.mode in ("discrete", "both"):
        verbal = verbal_table(tok, KnowledgeVocabulary.verbal_forms(lexicon_of(cfg.terminology)))
    return ReportGenerator(
        decoder,
        SpecialIds.from_tokenizer(tok),
        visual_dim,
        cfg.knowledge.mode,
        term_weights(cfg.terminology, tok),
        verbal,
        term_ids,
        report_vocab,
    )


def make_builder(cfg: Stage2Config, tok: PreTrainedTokenizerBase) -> PromptBuilder:
    """The prompt/report tokeniser of a stage-2 config (training, generation and bundles alike)."""
    if cfg.visual.tokens_per_view is None:
        raise MammorgError("visual.tokens_per_view is unset (read from the stage-1 features at training)")
    normalizer = Normalizer.for_reports(lexicon_of(cfg.terminology)) if cfg.terminology.normalize else None
    return PromptBuilder(
        tok,
        cfg.visual.tokens_per_view,
        cfg.knowledge.mode,
        cfg.visual.enabled,
        cfg.data.max_report_tokens,
        normalizer,
        cfg.knowledge.confidence,
        cfg.data.assessment_plan,
        cfg.knowledge.locations,
        chat_wrapper(tok) if cfg.decoder.chat_template else None,
        cfg.data.findings_plan,
    )


def chat_wrapper(tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the prompt in the tokenizer's chat template, as one user turn
    followed by the start of the model's turn (instruction-tuned decoders)."""
    if not getattr(tok, "chat_template", None):
        raise MammorgError("decoder.chat_template: true, but the tokenizer has no chat template")
    marker = "\u2063MAMMORG\u2063"
    text = str(
        tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    )
    before, after = text.split(marker, 1)
    encode: Any = tok
    return (
        list(encode(before, add_special_tokens=False)["input_ids"]),
        list(encode(after, add_special_tokens=False)["input_ids"]),
    )
