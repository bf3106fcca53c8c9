"""Evaluation throughput: parser reports/s (one core) and seconds for 10,000 pairs without METEOR.

Prints one JSON object. Run: python benchmarks/evaluation_throughput.py [--pairs N]
(the file is not called evaluation.py: that name would shadow the package).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from evaluation.clinical import point_metrics
from evaluation.nlg import nlg_metrics
from evaluation.parser import parse_report
from mammorg.synth.findings import sample_exam
from mammorg.synth.reports import REPORT_STYLES, write_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=10_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    refs = [write_report(sample_exam(rng), REPORT_STYLES[i % 4], rng) for i in range(args.pairs)]
    preds = refs[1:] + refs[:1]
    parse_report(refs[0])  # build the rules once
    t = time.perf_counter()
    for text in refs[:2000]:
        parse_report(text)
    parser_rate = 2000 / (time.perf_counter() - t)
    t = time.perf_counter()
    point_metrics([parse_report(x) for x in preds], [parse_report(x) for x in refs])
    nlg_metrics(preds, refs, meteor=False)
    seconds = time.perf_counter() - t
    print(
        json.dumps(
            {
                "benchmark": "evaluation",
                "parser_reports_per_s": round(parser_rate, 1),
                "pairs": args.pairs,
                "seconds_without_meteor": round(seconds, 1),
                "targets": {"parser_reports_per_s": 500, "seconds_without_meteor": 60},
            }
        )
    )


if __name__ == "__main__":
    main()
