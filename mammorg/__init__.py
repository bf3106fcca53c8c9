"""mammorg: two-stage clinical-reasoning mammography report generation."""

__version__ = "0.3.0"
