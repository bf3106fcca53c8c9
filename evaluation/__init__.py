"""Report parser, clinical-efficacy and NLG metrics, hallucination checks, rendering."""


def parse_report(text: str) -> dict:
    """Structured report (DESIGN.md §5) from free text; see ``evaluation.parser``."""
    from evaluation.parser import parse_report as _parse

    return _parse(text)
