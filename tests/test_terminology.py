"""Lexicon, normalisation and atomic-term tokenizers (trained BPE and extended stock)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mammorg.io import MammorgError
from mammorg.synth.findings import sample_exam
from mammorg.synth.reports import REPORT_STYLES, write_report
from terminology.lexicon import load_lexicon, validate
from terminology.normalize import Normalizer, sentence_case
from terminology.tokenizer import (
    coverage_report,
    extend_tokenizer,
    init_term_embeddings,
    term_loss_weights,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def reports():
    rng = np.random.default_rng(0)
    return [write_report(sample_exam(rng), REPORT_STYLES[i % 4], rng) for i in range(300)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, reports):
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(reports, load_lexicon(), out, vocab_size=800)
    return AutoTokenizer.from_pretrained(str(out), local_files_only=True)


def _stock_tokenizer(texts):
    """A plain byte-level BPE built here, standing in for a downloaded model's tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", clean_up_tokenization_spaces=False)


def test_lexicon_validation_rejects_duplicates(tmp_path):
    raw = {
        "categories": ["a"],
        "terms": [
            {"term": "x", "category": "a", "variants": ["y"]},
            {"term": "z", "category": "a", "variants": ["Y"]},
        ],
    }
    with pytest.raises(MammorgError, match="variant of both"):
        validate(raw, tmp_path / "l.yaml")
    raw["terms"][1] = {"term": "z", "category": "a", "forms": ["X"]}
    with pytest.raises(MammorgError, match="variant of both"):
        validate(raw, tmp_path / "l.yaml")
    with pytest.raises(MammorgError, match="unknown category"):
        validate({"categories": ["a"], "terms": [{"term": "x", "category": "b"}]}, tmp_path)
    assert len(load_lexicon().terms) > 60


def test_normaliser_maps_variants():
    n = Normalizer.default()
    assert n("Bi-Rads 4 b; ACR BI-RADS Assessment Category IV") == "BI-RADS 4B; BI-RADS 4"
    assert n("Ill-defined soft opacity with microcalcifications") == "indistinct mass with calcifications"


def test_report_text_keeps_a_terms_number():
    """The text a decoder learns keeps "masses" plural (the normaliser once wrote "which may
    obscure small mass"); the parser's normaliser reads every form as its term."""
    text = "Dense breasts may obscure small masses. No suspicious calcification. Axillary lymph nodes."
    kept = Normalizer.for_reports(load_lexicon())(text)
    assert kept == "Dense breasts may obscure small masses. No suspicious calcification. axillary lymph nodes."
    assert Normalizer.default()(text) == (
        "Dense breasts may obscure small mass. No suspicious calcifications. axillary lymph node."
    )
    assert Normalizer.for_reports(load_lexicon())("soft opacity, microcalcifications") == "mass, calcifications"
    forms = [f for t in load_lexicon().terms for f in t.forms]
    assert "masses" in forms and set(forms) <= set(load_lexicon().atomic_terms())


def test_generated_sentences_open_with_a_capital():
    """Normalised text opens a sentence with a lower-case term; the written report does not, and
    nothing else changes: numbers with a point, references, and what the parser reads."""
    from evaluation.parser import parse_report

    generated = (
        "FINDINGS:\nfine pleomorphic calcifications are seen at 2 o'clock, 7.8 cm from the nipple. "
        "axillary lymph nodes.\nIMPRESSION:\nRight breast: BI-RADS 4C: high suspicion for malignancy.\n"
        "tissue diagnosis is recommended."
    )
    written = sentence_case(generated)
    assert written == (
        "FINDINGS:\nFine pleomorphic calcifications are seen at 2 o'clock, 7.8 cm from the nipple. "
        "Axillary lymph nodes.\nIMPRESSION:\nRight breast: BI-RADS 4C: High suspicion for malignancy.\n"
        "Tissue diagnosis is recommended."
    )
    assert parse_report(written) == parse_report(generated)
    rng = np.random.default_rng(3)
    for _ in range(20):
        for style in REPORT_STYLES:
            reference = write_report(sample_exam(rng), style, rng)
            if reference != reference.lower():  # one style imitates reports typed all in lower case
                assert sentence_case(reference) == reference


def test_every_term_is_one_token_in_trained_bpe(bpe):
    for term in load_lexicon().atomic_terms():
        ids = bpe(term, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and bpe.decode(ids) == term, term


def test_reports_round_trip_after_normalisation(bpe, reports):
    n = Normalizer.default()
    for text in reports:
        norm = n(text)
        assert bpe.decode(bpe(norm, add_special_tokens=False)["input_ids"]) == norm


def test_extended_stock_tokenizer_and_embedding_init(reports):
    lexicon = load_lexicon()
    tok = _stock_tokenizer(reports[:100])
    base_len = len(tok)
    pieces = extend_tokenizer(tok, lexicon)
    assert len(tok) > base_len and pieces
    for term in pieces:
        ids = tok(term, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == term
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=base_len,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=False,
        )
    )
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    init_term_embeddings(model, tok, pieces)
    after_in = model.get_input_embeddings().weight
    assert after_in.shape[0] == len(tok)
    for term, ids in pieces.items():
        new = tok.convert_tokens_to_ids(term)
        assert torch.allclose(after_in[new], before_in[ids].mean(0))
        assert torch.allclose(model.get_output_embeddings().weight[new], before_out[ids].mean(0))
    cov = coverage_report(tok, _stock_tokenizer(reports[:100]), reports[:50], lexicon, Normalizer(lexicon))
    assert cov["mean_tokens_with_terms"] < cov["mean_tokens_without_terms"]
    assert cov["atomic_share"] > 0.9


def test_term_loss_weights():
    w = term_loss_weights(10, [2, 5], 3.0)
    assert w.tolist() == [1, 1, 3, 1, 1, 3, 1, 1, 1, 1]


def test_frequency_balanced_weights_lift_rare_category_tokens():
    from terminology.tokenizer import frequency_balanced_weights

    base = torch.ones(6)
    out = frequency_balanced_weights(base, [1, 2, 3], {1: 90, 2: 10, 5: 7}, power=0.5)
    assert out[1] == pytest.approx((50 / 90) ** 0.5) and out[2] == pytest.approx((50 / 10) ** 0.5)
    assert out[3] == 1 and out[5] == 1 and base.eq(1).all()  # unseen and other tokens untouched
