"""Stage 2: the terminology-aware report decoder with visual and knowledge tokens."""
