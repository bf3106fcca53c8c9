"""Atomic lexicon terms in Hugging Face tokenizers: extension, embedding init, BPE training."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from terminology.lexicon import Lexicon
from terminology.normalize import Normalizer

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _atomic(term: str) -> AddedToken:
    return AddedToken(term, single_word=True, lstrip=False, rstrip=False, normalized=False, special=False)


def word_pieces(tokenizer: PreTrainedTokenizerBase, words: str) -> list[int]:
    """The piece ids of ``words`` as tokenised (a leading space: as written mid-sentence),
    bare-space pieces left out unless nothing else is left."""
    token_ids = list(tokenizer(words, add_special_tokens=False)["input_ids"])
    return [i for i in token_ids if str(tokenizer.decode([i])).strip()] or token_ids


def extend_tokenizer(
    tokenizer: PreTrainedTokenizerBase, lexicon: Lexicon, only_multi_piece: bool = True
) -> dict[str, list[int]]:
    """Add lexicon terms as atomic tokens to a pretrained tokenizer; return each added token's
    original piece ids (for its embedding's initialisation).

    Each term is added twice: ``" term"`` (with its leading space, as it appears mid-sentence, so
    that the space is part of the token like the word-boundary marker of the tokenizer's own
    pieces, and no lone space piece precedes it) and ``"term"`` (at the start of a line)."""
    pieces = {}
    vocab = tokenizer.get_vocab()
    for term in lexicon.atomic_terms():
        for token in (" " + term, term):
            token_ids = tokenizer(token, add_special_tokens=False)["input_ids"]
            if token in vocab or (only_multi_piece and len(token_ids) == 1):
                continue
            pieces[token] = word_pieces(tokenizer, token)
    tokenizer.add_tokens([_word_boundary(t) if t.startswith(" ") else _atomic(t) for t in pieces])
    return pieces


def _word_boundary(token: str) -> AddedToken:
    """A term with its leading space: matched in the raw text (before the tokenizer's own
    normalisation), decoded as written."""
    return AddedToken(token, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)


@torch.no_grad()
def init_term_embeddings(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pieces: dict[str, list[int]]
) -> None:
    """Resize embeddings and set each new term row to the mean of its sub-word pieces."""
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table: Any = model.get_input_embeddings()
    matrices: list[torch.Tensor] = [table.weight]
    out: Any = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(out.weight)
    for term, ids in pieces.items():
        new_id = tokenizer.convert_tokens_to_ids(term)
        for weight in matrices:
            weight[new_id] = weight[ids].mean(dim=0)


def train_bpe_tokenizer(
    texts: Iterable[str],
    lexicon: Lexicon,
    out_dir: str | Path,
    vocab_size: int = 2000,
    normalizer: Normalizer | None = None,
    atomic_terms: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on normalised reports; lexicon terms are atomic added tokens
    (unless ``atomic_terms`` is false: the ablation without terminology tokens)."""
    normalizer = normalizer or Normalizer.for_reports(lexicon)
    corpus = [normalizer(t) for t in texts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    if atomic_terms:
        fast.add_tokens([_atomic(t) for t in lexicon.atomic_terms()])
    fast.save_pretrained(str(out_dir))
    return fast


def term_token_ids(tokenizer: PreTrainedTokenizerBase, lexicon: Lexicon) -> list[int]:
    """Ids of lexicon terms that are single tokens in ``tokenizer`` (with and without their
    leading space)."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for term in lexicon.atomic_terms() for t in (term, " " + term) if t in vocab)


def term_loss_weights(vocab_size: int, term_ids: Sequence[int], weight: float) -> torch.Tensor:
    """Per-class weights for cross-entropy: ``weight`` on term tokens, 1 elsewhere."""
    w = torch.ones(vocab_size)
    if term_ids:
        w[torch.as_tensor(list(term_ids))] = weight
    return w


def frequency_balanced_weights(
    weights: torch.Tensor, token_ids: Sequence[int], counts: Mapping[int, int], power: float
) -> torch.Tensor:
    """Scale the loss weight of each of ``token_ids`` by ``(mean count / its count) ** power``;
    tokens absent from ``counts`` keep their weight."""
    seen = [i for i in token_ids if counts.get(i, 0) > 0]
    if not seen:
        return weights
    mean = sum(counts[i] for i in seen) / len(seen)
    out = weights.clone()
    for i in seen:
        out[i] *= (mean / counts[i]) ** power
    return out


def coverage_report(
    tokenizer: PreTrainedTokenizerBase,
    base_tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    lexicon: Lexicon,
    normalizer: Normalizer,
) -> dict:
    """Tokens per report with/without terms and the share of term occurrences kept atomic."""
    norm = [normalizer(t) for t in texts]
    with_terms = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in norm]
    without = [len(base_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in norm]
    vocab = tokenizer.get_vocab()
    occurrences = atomic = 0
    for text in norm:
        for term in lexicon.atomic_terms():
            n = text.count(term)
            occurrences += n
            atomic += n if term in vocab else 0
    return {
        "reports": len(texts),
        "mean_tokens_with_terms": sum(with_terms) / max(len(texts), 1),
        "mean_tokens_without_terms": sum(without) / max(len(texts), 1),
        "term_occurrences": occurrences,
        "atomic_share": atomic / occurrences if occurrences else None,
    }
