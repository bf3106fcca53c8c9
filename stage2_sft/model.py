"""Report generator: a causal LM with projected visual tokens and knowledge tokens.

Placeholders (``<image>`` per visual token, ``<knowledge>`` per soft slot) are expanded at
tokenisation and filled here with ``masked_scatter``, after checking that the number of
features equals the number of placeholders (the LLaVA port's pattern).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mammorg.io import MammorgError, write_json_atomic
from mammorg.labels import VIEWS
from mammorg.training.checkpoint import load_tensors, save_tensors
from stage2_sft.knowledge import KnowledgeState, KnowledgeVocabulary, SoftKnowledge

IMAGE, KNOWLEDGE, REPORT, MISSING = "<image>", "<knowledge>", "<report>", "<missing_view>"
IGNORE_INDEX = -100
VIEW_MARKERS = tuple(f"<view:{v}>" for v in VIEWS)
GENERATOR_FORMAT = "mammorg-generator/1"


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one token (the tokenizer API also maps lists)."""
    value: Any = tokenizer.convert_tokens_to_ids(token)
    return int(value)


def prompt_tokens() -> list[str]:
    """Special tokens every stage-2 tokenizer carries (structure, discrete knowledge, plans)."""
    return [IMAGE, KNOWLEDGE, REPORT, MISSING, *VIEW_MARKERS, *KnowledgeVocabulary.all()]


VIEW_WORDS = {"L_CC": "left craniocaudal view", "L_MLO": "left mediolateral oblique view"}
VIEW_WORDS |= {"R" + v[1:]: "right" + w[4:] for v, w in VIEW_WORDS.items()}


def prompt_token_words(lexicon: Any) -> dict[str, str]:
    """Plain words for the prompt tokens a decoder reads as embeddings of its own (all but the
    ``<image>`` and ``<knowledge>`` placeholders, which are filled): the mean embedding of their
    pieces starts each token's row in a pretrained vocabulary (see ``KnowledgeVocabulary.words``)."""
    words = {REPORT: "report", MISSING: "missing view"}
    words |= {marker: VIEW_WORDS[view] for marker, view in zip(VIEW_MARKERS, VIEWS, strict=True)}
    return words | KnowledgeVocabulary.words(lexicon)


def _gathered(param: torch.Tensor) -> Any:
    """A context in which a ZeRO-3-partitioned parameter is whole (read only); else nothing."""
    if hasattr(param, "ds_id"):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if getattr(param, "ds_status", None) != ZeroParamStatus.AVAILABLE:  # already whole inside a forward
            return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def _embed_scale(table: Any) -> Any:
    """Gemma scales its input embeddings by sqrt(hidden) inside the embedding module."""
    scale = getattr(table, "embed_scale", None)
    return 1.0 if scale is None else scale


class ReportVocabulary(LogitsProcessor):
    """Generation keeps to the report vocabulary: every other token gets -inf."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.allowed.to(scores.device)] = 0.0
        return scores + mask  # type: ignore[return-value]


class PlaceholderMismatch(ValueError):
    """The number of features differs from the number of placeholder tokens."""


@dataclass(frozen=True)
class SpecialIds:
    image: int
    knowledge: int
    report: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
        ids = [token_id(tokenizer, t) for t in (IMAGE, KNOWLEDGE, REPORT)]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError("tokenizer lacks the stage-2 special tokens (use build_tokenizer)")
        return cls(*ids)


class VisualProjector(nn.Module):
    """Two-layer MLP from stage-1 feature tokens to the decoder's hidden size."""

    def __init__(self, visual_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(visual_dim), nn.Linear(visual_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def fill_placeholders(
    embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor, name: str
) -> torch.Tensor:
    """Replace the embeddings at ``token_id`` positions with ``features`` (row order kept)."""
    mask = input_ids == token_id
    n_slots, n_feats = int(mask.sum()), features.shape[0]
    if n_slots != n_feats:
        raise PlaceholderMismatch(f"{name}: {n_feats} feature vectors for {n_slots} placeholder tokens")
    if n_slots == 0:
        return embeds
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))


def report_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean (optionally class-weighted) CE in fp32 over non-ignored targets; compiled, the fp32
    upcast fuses into the softmax instead of materialising a float copy of the logits."""
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        weight=weight,
        ignore_index=IGNORE_INDEX,
    )


class ReportGenerator(nn.Module):
    """Decoder + projector + soft knowledge; ``forward`` gives the LM loss on report tokens."""

    decoder: Any  # a transformers causal LM, or a PEFT model around one
    term_weights: torch.Tensor | None
    verbal_row: torch.Tensor | None
    verbal_pieces: torch.Tensor | None
    term_ids: torch.Tensor | None
    term_row: torch.Tensor | None
    report_vocab: torch.Tensor | None
    vocab_index: torch.Tensor | None
    projector: VisualProjector
    soft: SoftKnowledge | None

    def __init__(
        self,
        decoder: PreTrainedModel,
        ids: SpecialIds,
        visual_dim: int,
        knowledge_mode: str = "discrete",
        term_weights: torch.Tensor | None = None,
        verbal: tuple[torch.Tensor, torch.Tensor] | None = None,
        term_ids: torch.Tensor | None = None,
        report_vocab: torch.Tensor | None = None,
    ):
        """``verbal``: (vocabulary id -> row, rows of word-piece ids) of the verbal tie (see
        ``_verbal_embeddings``); ``term_weights``: per-token loss weights (training only).

        ``term_ids``: tokens whose embedding (and output) rows train here even when the decoder
        is frozen under LoRA (the atomic lexicon terms added to a pretrained vocabulary).
        ``report_vocab``: sorted ids of the report vocabulary; the loss and generation use only
        these output rows (``head_logits``), the saved decoder keeps its full head."""
        super().__init__()
        table: Any = decoder.get_input_embeddings()
        hidden = int(table.embedding_dim)
        self.decoder, self.ids, self.knowledge_mode = decoder, ids, knowledge_mode
        self.projector = VisualProjector(visual_dim, hidden)
        self.soft = SoftKnowledge(hidden) if knowledge_mode in ("soft", "both") else None
        self.register_buffer("term_weights", term_weights, persistent=False)
        # verbal tie (see ``embed``): vocabulary id -> row of ``verbal_pieces`` (-1: none)
        row, pieces = verbal if verbal is not None else (None, None)
        self.register_buffer("verbal_row", row)  # saved with the extras: reloads need no lexicon
        self.register_buffer("verbal_pieces", pieces)
        get_base: Any = getattr(decoder, "get_base_model", None)  # a PEFT model wraps the decoder
        base = get_base() if get_base is not None else decoder
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(base).forward).parameters
        self.loss_fn = report_cross_entropy
        self._init_term_rows(term_ids)
        self.register_buffer("report_vocab", report_vocab)  # saved with the extras
        vocab = int(table.num_embeddings)
        index = torch.full((vocab,), -1, dtype=torch.long)
        if report_vocab is not None:
            index[report_vocab] = torch.arange(report_vocab.numel())
        self.register_buffer("vocab_index", index if report_vocab is not None else None, persistent=False)
        self.softcap = getattr(base.config, "final_logit_softcapping", None)

    def _init_term_rows(self, term_ids: torch.Tensor | None) -> None:
        """Trainable copies of the term rows of the (frozen) input and output embeddings."""
        self.register_buffer("term_ids", term_ids)
        if term_ids is None:
            self.term_in = self.term_out = None
            self.register_buffer("term_row", None, persistent=False)
            return
        table: Any = self.decoder.get_input_embeddings()
        out: Any = self.decoder.get_output_embeddings()
        self.term_in = nn.Parameter(table.weight.detach()[term_ids].clone().float())
        tied = out is None or out.weight.data_ptr() == table.weight.data_ptr()
        self.term_out = None if tied else nn.Parameter(out.weight.detach()[term_ids].clone().float())
        row = torch.full((int(table.num_embeddings),), -1, dtype=torch.long)
        row[term_ids] = torch.arange(term_ids.numel())
        self.register_buffer("term_row", row, persistent=False)

    @torch.no_grad()
    def sync_term_rows(self) -> None:
        """Write the trained term rows into the decoder's embedding and output weights, so that
        ``generate`` and a saved decoder (loaded by transformers alone) use them."""
        if self.term_ids is None or self.term_in is None:
            return
        table: Any = self.decoder.get_input_embeddings()
        table.weight[self.term_ids] = self.term_in.to(table.weight.dtype)
        out: Any = self.decoder.get_output_embeddings()
        if self.term_out is not None and out is not None:
            out.weight[self.term_ids] = self.term_out.to(out.weight.dtype)

    def _body(self) -> Any:
        """The decoder's transformer (LoRA layers included) without its LM head."""
        get_base: Any = getattr(self.decoder, "get_base_model", None)
        base = get_base() if get_base is not None else self.decoder
        return base.get_decoder()

    def head_weight(self) -> torch.Tensor:
        """Output rows of the report vocabulary (all rows without one), term rows as trained.
        Under ZeRO-3 the (frozen) output matrix is gathered for this read."""
        out: Any = self.decoder.get_output_embeddings()
        weight = out.weight
        with _gathered(weight):
            rows = weight.clone() if self.report_vocab is None else weight[self.report_vocab]
        if self.term_ids is None or self.term_in is None:
            return rows
        trained = (self.term_out if self.term_out is not None else self.term_in).to(rows.dtype)
        where = self.term_ids if self.vocab_index is None else self.vocab_index[self.term_ids]
        keep = where >= 0
        return rows.index_copy(0, where[keep], trained[keep])

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the report vocabulary (or the whole one) from final hidden states."""
        logits = nn.functional.linear(hidden, self.head_weight())
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def own_head(self) -> bool:
        """Whether the loss computes the head here (term rows or a report vocabulary)."""
        return self.term_ids is not None or self.report_vocab is not None

    def compile_loss(self) -> None:
        """``torch.compile`` the report loss (dynamic: the number of report positions varies)."""
        self.loss_fn = torch.compile(report_cross_entropy, dynamic=True)

    def embed(
        self,
        input_ids: torch.Tensor,
        visual: torch.Tensor | None = None,
        knowledge: KnowledgeState | None = None,
    ) -> torch.Tensor:
        """Input embeddings with visual tokens (``visual [V, N, D]``, in prompt order) filled in."""
        table = self.decoder.get_input_embeddings()
        embeds = table(input_ids)
        if self.term_row is not None and self.term_in is not None:
            row = self.term_row[input_ids]
            trained = self.term_in.to(embeds.dtype)[row.clamp(min=0)] * _embed_scale(table)
            embeds = torch.where((row >= 0).unsqueeze(-1), trained, embeds)
        if self.verbal_row is not None:
            embeds = embeds + self._verbal_embeddings(table, input_ids)
        hidden = embeds.shape[-1]
        feats = (
            embeds.new_zeros(0, hidden)
            if visual is None
            else self.projector(visual.to(embeds.dtype)).reshape(-1, hidden)
        )
        embeds = fill_placeholders(embeds, input_ids, self.ids.image, feats, "visual tokens")
        soft = embeds.new_zeros(0, hidden)
        if self.soft is not None and knowledge is not None:
            soft = self.soft(knowledge.to(embeds.device, embeds.dtype)).reshape(-1, hidden)
        return fill_placeholders(embeds, input_ids, self.ids.knowledge, soft, "soft knowledge")

    def _verbal_embeddings(self, table: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean embedding of the words each knowledge token stands for (zero for other tokens).

        A discrete token thus carries the embedding of its report wording (tied to the LM head),
        so writing ``BI-RADS 5`` from ``<R:birads=5>`` uses the same copy route as the frequent
        classes instead of a mapping learnt per token."""
        assert self.verbal_row is not None and self.verbal_pieces is not None
        row = self.verbal_row[input_ids.clamp(max=self.verbal_row.numel() - 1)]
        pieces = self.verbal_pieces[row.clamp(min=0)]  # [B, T, P]
        present = (pieces >= 0) & (row >= 0).unsqueeze(-1)
        summed = (table(pieces.clamp(min=0)) * present.unsqueeze(-1)).sum(-2)
        return summed / present.sum(-1, keepdim=True).clamp(min=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        visual: torch.Tensor | None = None,
        knowledge: KnowledgeState | None = None,
    ) -> torch.Tensor:
        """Mean (term-weighted) next-token CE over report tokens.

        Logits are computed only at positions that predict a report token somewhere in the batch
        (``logits_to_keep``), so the prompt (visual and knowledge tokens) costs no LM-head work.
        """
        embeds = self.embed(input_ids, visual, knowledge)
        targets = labels[:, 1:]
        positions = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        if positions.numel() == 0:
            return embeds.sum() * 0.0  # nothing to learn here; keeps every parameter in the graph
        if self.own_head:  # hidden states at the kept positions, then this generator's head
            hidden = self._body()(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
            logits = self.head_logits(hidden.last_hidden_state[:, positions])
            wanted = targets[:, positions]
            weights = self.term_weights
            if self.vocab_index is not None:  # targets as report-vocabulary indices
                wanted = torch.where(wanted >= 0, self.vocab_index[wanted.clamp(min=0)], wanted)
                wanted = wanted.masked_fill(wanted == -1, IGNORE_INDEX)  # a piece outside it
                weights = None if weights is None else weights[self.report_vocab]
            return self.loss_fn(logits, wanted, weights)
        keep = {"logits_to_keep": positions} if self._keeps_logits else {}
        logits = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, **keep).logits
        if not keep:
            logits = logits[:, positions]
        return self.loss_fn(logits, targets[:, positions], self.term_weights)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual: torch.Tensor | None = None,
        knowledge: KnowledgeState | None = None,
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids for left-padded prompts (KV cache, greedy or beam search); with a report
        vocabulary only its tokens can be generated."""
        self.sync_term_rows()
        embeds = self.embed(input_ids, visual, knowledge)
        if self.report_vocab is not None:
            processors = list(generation_kwargs.pop("logits_processor", None) or [])
            generation_kwargs["logits_processor"] = LogitsProcessorList(
                [ReportVocabulary(self.report_vocab), *processors]
            )
        return self.decoder.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generation_kwargs)

    @property
    def is_adapter(self) -> bool:
        return isinstance(self.decoder, PeftModel)

    def split_state(
        self, state: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(decoder weights without the ``decoder.`` prefix, the rest: projector, soft knowledge,
        verbal tables). ``state`` (e.g. gathered from ZeRO-3 partitions) overrides the module's."""
        full = {**self.state_dict(), **(state or {})}
        decoder = {k[len("decoder.") :]: v for k, v in (state or {}).items() if k.startswith("decoder.")}
        extras = {k: v for k, v in full.items() if not k.startswith("decoder.")}
        return decoder, extras

    def save_pretrained(
        self,
        folder: str | Path,
        state: dict[str, torch.Tensor] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        base: str | Path | None = None,
        merge_lora: bool = False,
    ) -> None:
        """The generator folder: ``decoder/`` (HF model, or PEFT adapter), ``extras.safetensors``,
        ``generator.json``; with ``tokenizer`` and ``base`` (an adapter's frozen base model
        folder) also ``tokenizer/`` and ``base_decoder/`` (a self-contained folder, as in bundles).
        ``state``: the decoder's weights to write (ZeRO-3 gathered; default: the module's own)."""
        folder = Path(folder)
        if state is None:
            self.sync_term_rows()  # the saved decoder carries the trained term rows
        decoder_state, extras = self.split_state(state)
        decoder, adapter = self.decoder, self.is_adapter
        if adapter and merge_lora:
            decoder, adapter = self.decoder.merge_and_unload(), False
            decoder_state = {}
        decoder.save_pretrained(str(folder / "decoder"), state_dict=decoder_state or None, safe_serialization=True)
        save_tensors(extras, folder / "extras.safetensors")
        write_json_atomic(
            folder / "generator.json",
            {
                "format": GENERATOR_FORMAT,
                "visual_dim": self.projector.net[1].in_features,
                "knowledge_mode": self.knowledge_mode,
                "adapter": adapter,
            },
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder / "tokenizer"))
        if adapter and base is not None:
            shutil.copytree(base, folder / "base_decoder", dirs_exist_ok=True)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, shared: str | Path | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[ReportGenerator, PreTrainedTokenizerBase]:
        """Reload a generator folder; ``tokenizer/`` and ``base_decoder/`` are looked up in
        ``shared`` (a run folder, whose checkpoints share them) when given, else in ``folder``."""
        folder = Path(folder)
        shared = Path(shared) if shared is not None else folder
        meta_path = folder / "generator.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MammorgError(f"{meta_path}: not a generator folder ({exc})") from None
        if meta.get("format") != GENERATOR_FORMAT:
            raise MammorgError(f"{meta_path}: unknown format {meta.get('format')!r}")
        tok = AutoTokenizer.from_pretrained(str(shared / "tokenizer"), local_files_only=True)
        if meta["adapter"]:
            base = AutoModelForCausalLM.from_pretrained(
                str(shared / "base_decoder"), dtype=dtype, local_files_only=True
            )
            decoder: Any = PeftModel.from_pretrained(base, str(folder / "decoder"))
        else:
            decoder = AutoModelForCausalLM.from_pretrained(str(folder / "decoder"), dtype=dtype, local_files_only=True)
        extras = load_tensors(folder / "extras.safetensors")
        verbal = (extras["verbal_row"], extras["verbal_pieces"]) if "verbal_row" in extras else None
        model = cls(
            decoder,
            SpecialIds.from_tokenizer(tok),
            int(meta["visual_dim"]),
            meta["knowledge_mode"],
            verbal=verbal,
            term_ids=extras.get("term_ids"),
            report_vocab=extras.get("report_vocab"),
        )
        missing, unexpected = model.load_state_dict(extras, strict=False)
        wrong = [k for k in missing if not k.startswith("decoder.")] + list(unexpected)
        if wrong:
            raise MammorgError(
                f"{folder / 'extras.safetensors'}: weights do not match the generator ({', '.join(wrong[:3])})"
            )
        return model.to(dtype).eval(), tok
