"""The ``mammorg`` command line (DESIGN.md §6).

A thin dispatcher: each sub-command parses its arguments and calls one library function or
one recipe's ``main``. Recipes are imported lazily, only by the command that runs them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from mammorg.io import MammorgError


def _cmd_synth(args: argparse.Namespace) -> None:
    from mammorg.synth.writer import SynthSettings, synthesise

    styles = tuple(args.styles.split(",")) if args.styles else SynthSettings().styles
    settings = SynthSettings(exams=args.exams, seed=args.seed, height=args.size[0],
                             width=args.size[1], difficulty=args.difficulty,
                             label_noise=args.label_noise, test_fraction=args.test_fraction,
                             styles=styles)
    print(json.dumps(synthesise(args.out, settings)))


def _cmd_ingest(args: argparse.Namespace) -> None:
    from mammorg.data.ingest import ingest, problems_path

    result = ingest(args.format, args.root, args.out)
    for p in result.problems:
        print(f"problem: {p['source']}: {p['problem']}", file=sys.stderr)
    print(f"wrote {len(result.exams)} exams to {args.out}; {len(result.problems)} problem(s) "
          f"listed in {problems_path(args.out)}")


def _cmd_preprocess(args: argparse.Namespace) -> None:
    from mammorg.preprocess import PreprocessSpec, preprocess_manifest

    spec = PreprocessSpec(height=args.size[0], width=args.size[1])
    summary = preprocess_manifest(args.manifest, args.out, spec, workers=args.workers)
    for p in summary["problems"]:
        print(f"problem: {p['exam_id']} {p['view'] or ''}: {p['problem']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "problems"}
                     | {"problems": len(summary["problems"])}))


def _cmd_audit(args: argparse.Namespace) -> None:
    from mammorg.data.audit import audit_manifest, format_audit
    from mammorg.io import write_json_atomic

    summary = audit_manifest(args.manifest)
    print(format_audit(summary))
    out = Path(args.manifest).with_suffix(".audit.json")
    write_json_atomic(out, summary)
    print(f"audit JSON: {out}")


def _recipe(module: str, func: str = "main"):
    def run(args: argparse.Namespace) -> None:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(module.split(".")[0]):
                raise MammorgError(f"'{args.command_path}' is not built yet") from None
            raise
        getattr(mod, func)(args)
    return run


def _size(parser: argparse.ArgumentParser, default: tuple[int, int]) -> None:
    parser.add_argument("--size", nargs=2, type=int, default=list(default), metavar=("H", "W"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mammorg", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write synthetic four-view exams (VinDr layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--exams", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    _size(s, (512, 256))
    s.add_argument("--difficulty", type=float, default=0.5)
    s.add_argument("--label-noise", type=float, default=0.03)
    s.add_argument("--test-fraction", type=float, default=0.15, help="share of exams in the test split")
    s.add_argument("--styles", default="", help="comma-separated report styles (default: all)")
    s.set_defaults(func=_cmd_synth)

    data = sub.add_parser("data", help="ingest, preprocess and audit data").add_subparsers(
        dest="data_command", required=True)
    d = data.add_parser("ingest")
    d.add_argument("--format", required=True, choices=["vindr", "cbis-ddsm", "dmid", "folder"])
    d.add_argument("--root", required=True)
    d.add_argument("--out", required=True)
    d.set_defaults(func=_cmd_ingest)
    d = data.add_parser("preprocess")
    d.add_argument("--manifest", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--workers", type=int, default=0)
    _size(d, (512, 256))
    d.set_defaults(func=_cmd_preprocess)
    d = data.add_parser("audit")
    d.add_argument("--manifest", required=True)
    d.set_defaults(func=_cmd_audit)

    for stage, module in (("stage1", "stage1_classification"), ("stage2", "stage2_sft")):
        sp = sub.add_parser(stage).add_subparsers(dest=f"{stage}_command", required=True)
        t = sp.add_parser("train")
        t.add_argument("--config", required=True)
        t.add_argument("overrides", nargs="*", help="key=value")
        t.add_argument("--local_rank", "--local-rank", type=int, default=None,
                       help=argparse.SUPPRESS)
        t.set_defaults(func=_recipe(f"{module}.train"), command_path=f"{stage} train")
        if stage == "stage2":
            pre = sp.add_parser("pretrain", help="domain pre-training of the small decoder on reports")
            pre.add_argument("--config", required=True)
            pre.add_argument("overrides", nargs="*", help="key=value")
            pre.set_defaults(func=_recipe("stage2_sft.pretrain"), command_path="stage2 pretrain")
        g = sp.add_parser("predict" if stage == "stage1" else "generate")
        g.add_argument("--run", required=True)
        g.add_argument("--manifest", required=True)
        g.add_argument("--out", required=True)
        if stage == "stage1":
            g.add_argument("--features", default=None,
                           help="folder for visual feature tokens (default: OUT's folder/features)")
            g.add_argument("--oof", type=int, default=0, metavar="K",
                           help="predict the training split out-of-fold with K fold models")
            g.add_argument("--batch-size", type=int, default=8)
            g.set_defaults(func=_recipe(f"{module}.predict"), command_path="stage1 predict")
        else:
            g.add_argument("--batch-size", type=int, default=None)
            g.add_argument("--num-beams", type=int, default=None)
            g.add_argument("--predictions", default=None,
                           help="stage-1 predictions with features (default: the run's data.predictions)")
            g.add_argument("--split", default=None, help="only exams of this split")
            g.set_defaults(func=_recipe(f"{module}.generate"), command_path="stage2 generate")

    s = sub.add_parser("parse", help="structured extraction from free-text reports")
    s.add_argument("input")
    s.add_argument("-o", "--out", required=True)
    s.set_defaults(func=_recipe("evaluation.cli", "parse_main"), command_path="parse")
    s = sub.add_parser("evaluate", help="clinical-efficacy and NLG metrics")
    s.add_argument("--pred", required=True)
    s.add_argument("--ref", required=True)
    s.add_argument("--pred-b", default=None, help="second system for a paired significance test")
    s.add_argument("-o", "--out", required=True)
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java; slow)")
    s.set_defaults(func=_recipe("evaluation.cli", "evaluate_main"), command_path="evaluate")
    s = sub.add_parser("ablate")
    s.add_argument("--config", required=True)
    s.add_argument("overrides", nargs="*", help="key=value")
    s.set_defaults(func=_recipe("mammorg.ablate"), command_path="ablate")
    s = sub.add_parser("export")
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--merge-lora", action="store_true")
    s.add_argument("--stage1-run", default=None, help="default: data.stage1_run of the stage-2 config")
    s.add_argument("--metrics", default=None, help="metrics.json of an evaluation, for the model card")
    s.set_defaults(func=_recipe("mammorg.bundle", "export_main"), command_path="export")
    s = sub.add_parser("report")
    s.add_argument("--bundle", required=True)
    s.add_argument("inputs", nargs="+")
    s.add_argument("--json", action="store_true")
    s.add_argument("--out", default=None, help="batch mode (a manifest as INPUT): write JSONL here")
    s.add_argument("--trust-pickle", action="store_true", help="allow pickle files in the bundle")
    s.set_defaults(func=_recipe("mammorg.reporting", "report_main"), command_path="report")
    s = sub.add_parser("demo")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--config", default=None, help="pipeline YAML (default: configs/pipeline/demo.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value")
    s.set_defaults(func=_recipe("mammorg.pipeline", "demo_main"), command_path="demo")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MammorgError as exc:
        print(f"mammorg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mammorg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
