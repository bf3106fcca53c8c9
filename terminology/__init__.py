"""BI-RADS lexicon, term-aware normalisation and tokenizer extension."""

from terminology.lexicon import Lexicon, Term, load_lexicon
from terminology.normalize import Normalizer

__all__ = ["Lexicon", "Normalizer", "Term", "load_lexicon"]
