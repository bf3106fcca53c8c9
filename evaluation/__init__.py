"""Report parser, clinical-efficacy and NLG metrics, hallucination checks, rendering."""
