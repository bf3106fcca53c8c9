"""Handlers of ``mammorg parse`` and ``mammorg evaluate``."""
from __future__ import annotations

import argparse

from evaluation.evaluate import evaluate_files, load_texts, metrics_markdown
from evaluation.parser import parse_report
from mammorg.io import write_jsonl_atomic


def parse_main(args: argparse.Namespace) -> None:
    texts = load_texts(args.input)
    n = write_jsonl_atomic(args.out, ({"id": i, "structured": parse_report(t)}
                                      for i, t in texts.items()))
    print(f"parsed {n} reports into {args.out}")


def evaluate_main(args: argparse.Namespace) -> None:
    metrics = evaluate_files(args.pred, args.ref, args.out, args.pred_b, args.bootstrap,
                             meteor=not args.no_meteor)
    print(metrics_markdown(metrics))
    print(f"wrote {args.out}/metrics.json")
