"""Stage 1: multi-view, multi-head mammography classifier (clinical priors)."""
