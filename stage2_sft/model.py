"""Report generator: a causal LM with projected visual tokens and knowledge tokens.

Placeholders (``<image>`` per visual token, ``<knowledge>`` per soft slot) are expanded at
tokenisation and filled here with ``masked_scatter``, after checking that the number of
features equals the number of placeholders (the LLaVA port's pattern).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mammorg.labels import VIEWS
from stage2_sft.knowledge import SoftKnowledge, discrete_vocabulary, plan_vocabulary

IMAGE, KNOWLEDGE, REPORT, MISSING = "<image>", "<knowledge>", "<report>", "<missing_view>"
IGNORE_INDEX = -100
VIEW_MARKERS = tuple(f"<view:{v}>" for v in VIEWS)


def prompt_tokens() -> list[str]:
    """Special tokens every stage-2 tokenizer carries (structure, discrete knowledge, plans)."""
    return [IMAGE, KNOWLEDGE, REPORT, MISSING, *VIEW_MARKERS, *discrete_vocabulary(), *plan_vocabulary()]


class PlaceholderMismatch(ValueError):
    """The number of features differs from the number of placeholder tokens."""


@dataclass(frozen=True)
class SpecialIds:
    image: int
    knowledge: int
    report: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "SpecialIds":
        ids = [tokenizer.convert_tokens_to_ids(t) for t in (IMAGE, KNOWLEDGE, REPORT)]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError("tokenizer lacks the stage-2 special tokens (use build_tokenizer)")
        return cls(*ids)


class VisualProjector(nn.Module):
    """Two-layer MLP from stage-1 feature tokens to the decoder's hidden size."""

    def __init__(self, visual_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def fill_placeholders(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int,
                      features: torch.Tensor, name: str) -> torch.Tensor:
    """Replace the embeddings at ``token_id`` positions with ``features`` (row order kept)."""
    mask = input_ids == token_id
    n_slots, n_feats = int(mask.sum()), features.shape[0]
    if n_slots != n_feats:
        raise PlaceholderMismatch(f"{name}: {n_feats} feature vectors for {n_slots} placeholder tokens")
    if n_slots == 0:
        return embeds
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))


def report_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         weight: torch.Tensor | None) -> torch.Tensor:
    """Mean (optionally class-weighted) CE in fp32 over non-ignored targets; compiled, the fp32
    upcast fuses into the softmax instead of materialising a float copy of the logits."""
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       weight=weight, ignore_index=IGNORE_INDEX)


class ReportGenerator(nn.Module):
    """Decoder + projector + soft knowledge; ``forward`` gives the LM loss on report tokens."""

    def __init__(self, decoder: PreTrainedModel, ids: SpecialIds, visual_dim: int,
                 knowledge_mode: str = "discrete", term_weights: torch.Tensor | None = None,
                 verbal: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        hidden = decoder.get_input_embeddings().embedding_dim
        self.decoder, self.ids, self.knowledge_mode = decoder, ids, knowledge_mode
        self.projector = VisualProjector(visual_dim, hidden)
        self.soft = SoftKnowledge(hidden) if knowledge_mode in ("soft", "both") else None
        self.register_buffer("term_weights", term_weights, persistent=False)
        # verbal tie (see ``embed``): vocabulary id -> row of ``verbal_pieces`` (-1: none)
        row, pieces = verbal if verbal is not None else (None, None)
        self.register_buffer("verbal_row", row, persistent=False)
        self.register_buffer("verbal_pieces", pieces, persistent=False)
        base = decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(base).forward).parameters
        self.loss_fn = report_cross_entropy

    def compile_loss(self) -> None:
        """``torch.compile`` the report loss (dynamic: the number of report positions varies)."""
        self.loss_fn = torch.compile(report_cross_entropy, dynamic=True)

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor | None = None,
              knowledge: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Input embeddings with visual tokens (``visual [V, N, D]``, in prompt order) filled in."""
        table = self.decoder.get_input_embeddings()
        embeds = table(input_ids)
        if self.verbal_row is not None:
            embeds = embeds + self._verbal_embeddings(table, input_ids)
        hidden = embeds.shape[-1]
        feats = embeds.new_zeros(0, hidden) if visual is None else \
            self.projector(visual.to(embeds.dtype)).reshape(-1, hidden)
        embeds = fill_placeholders(embeds, input_ids, self.ids.image, feats, "visual tokens")
        soft = embeds.new_zeros(0, hidden)
        if self.soft is not None and knowledge is not None:
            soft = self.soft(**{k: knowledge[k].to(embeds.dtype) for k in
                                ("density", "birads", "findings", "sides")}).reshape(-1, hidden)
        return fill_placeholders(embeds, input_ids, self.ids.knowledge, soft, "soft knowledge")

    def _verbal_embeddings(self, table: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean embedding of the words each knowledge token stands for (zero for other tokens).

        A discrete token thus carries the embedding of its report wording (tied to the LM head),
        so writing ``BI-RADS 5`` from ``<R:birads=5>`` uses the same copy route as the frequent
        classes instead of a mapping learnt per token."""
        row = self.verbal_row[input_ids.clamp(max=self.verbal_row.numel() - 1)]
        pieces = self.verbal_pieces[row.clamp(min=0)]  # [B, T, P]
        present = (pieces >= 0) & (row >= 0).unsqueeze(-1)
        summed = (table(pieces.clamp(min=0)) * present.unsqueeze(-1)).sum(-2)
        return summed / present.sum(-1, keepdim=True).clamp(min=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                visual: torch.Tensor | None = None,
                knowledge: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean (term-weighted) next-token CE over report tokens.

        Logits are computed only at positions that predict a report token somewhere in the batch
        (``logits_to_keep``), so the prompt (visual and knowledge tokens) costs no LM-head work.
        """
        embeds = self.embed(input_ids, visual, knowledge)
        targets = labels[:, 1:]
        positions = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        if positions.numel() == 0:
            return embeds.sum() * 0.0  # nothing to learn here; keeps every parameter in the graph
        keep = {"logits_to_keep": positions} if self._keeps_logits else {}
        logits = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False,
                              **keep).logits
        if not keep:
            logits = logits[:, positions]
        return self.loss_fn(logits, targets[:, positions], self.term_weights)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 visual: torch.Tensor | None = None, knowledge: dict[str, torch.Tensor] | None = None,
                 **generation_kwargs) -> torch.Tensor:
        """New token ids for left-padded prompts (KV cache, greedy or beam search)."""
        embeds = self.embed(input_ids, visual, knowledge)
        return self.decoder.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                     **generation_kwargs)

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights outside the decoder (projector, soft knowledge)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("decoder.")}
