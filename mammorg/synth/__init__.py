"""Synthetic four-view exams with known ground truth (the embedded default data set)."""
