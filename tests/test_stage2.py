"""Stage 2 end to end on tiny configs: knowledge modes, resume, placeholders, LoRA, DeepSpeed."""

from __future__ import annotations

import functools
import json
import operator
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_STAGE2 as TINY
from conftest import assert_complete_lora_run, launch_stage2
from conftest import stage2_overrides as _overrides
from safetensors.torch import load_file
from transformers import LogitsProcessorList

from mammorg.app.cli import main as cli
from mammorg.config import load_config as load_typed
from mammorg.config import replace
from mammorg.io import read_jsonl
from stage2_sft.assembly import make_builder
from stage2_sft.config import Stage2Config
from stage2_sft.data import ReportDataset, collate
from stage2_sft.knowledge import KnowledgeState, KnowledgeVocabulary
from stage2_sft.model import PlaceholderMismatch, fill_placeholders
from stage2_sft.reporter import Reporter, generation_kwargs, load_run
from stage2_sft.train import train as run

plan_tokens = KnowledgeVocabulary.plan


def load_config(ref, overrides=()):
    return load_typed(ref, Stage2Config, overrides)


def generate_reports(model, tok, ds, cfg, batch_size, num_beams=None, assessment=None):
    """Reports of a trained run's generator for ``ds``, as their JSON lines."""
    reporter = Reporter.from_config(cfg, model, tok)
    return [r.to_json() for r in reporter.generate(ds, batch_size, num_beams, assessment)]


def _all_train(root: Path) -> None:
    rows = read_jsonl(root / "m.jsonl")
    (root / "m_all.jsonl").write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))


@pytest.mark.parametrize("mode", ["none", "discrete", "soft", "both"])
def test_knowledge_modes_train_and_generate(stage1_outputs, tmp_path, mode):
    root = stage1_outputs
    checkpointing = f"decoder.gradient_checkpointing={mode == 'both'}"  # exercised once
    cfg = load_config(
        TINY,
        _overrides(
            root,
            tmp_path / mode,
            f"knowledge.mode={mode}",
            *(["generate.assessment=plan", "generate.findings=free"] if mode == "none" else []),  # no knowledge
            "train.epochs=1",
            checkpointing,
            "generate.max_new_tokens=6",
        ),
    )
    result = run(cfg)
    assert (tmp_path / mode / "checkpoints" / "best" / "extras.safetensors").exists()
    assert result["best_val_loss"] is None or result["best_val_loss"] > 0
    rcfg, model, tok = load_run(tmp_path / mode)
    ds = ReportDataset(root / "m.jsonl", root / "s1/pred.jsonl", make_builder(rcfg, tok), with_reports=False)
    rows = generate_reports(model, tok, ds, rcfg, 4, num_beams=2)
    assert len(rows) == len(ds) == 8 and all("structured" in r for r in rows)
    for sample, n_views in ((ds[0], 3), (ds[1], 4)):  # exam 0 lacks R_MLO: 3 views' tokens
        n_image = sample.prompt.count(tok.convert_tokens_to_ids("<image>"))
        assert sample.visual.shape[0] == n_views
        assert n_image == sample.visual.shape[0] * sample.visual.shape[1]
    assert tok.convert_tokens_to_ids("<missing_view>") in ds[0].prompt
    sample = ds[0]
    has_soft = tok.convert_tokens_to_ids("<knowledge>") in sample.prompt
    has_discrete = any(tok.convert_ids_to_tokens(i).startswith("<density=") for i in sample.prompt)
    assert has_soft == (mode in ("soft", "both")) and has_discrete == (mode in ("discrete", "both"))


def test_resume_continues_the_same_loss_curve(stage1_outputs, tmp_path):
    root = stage1_outputs
    mixed = "knowledge.gold_fraction=0.5"  # the per-epoch knowledge draws must resume too
    run(load_config(TINY, _overrides(root, tmp_path / "a", "train.epochs=3", mixed)))
    run(load_config(TINY, _overrides(root, tmp_path / "b", "train.epochs=3", mixed, "train.stop_after_epochs=1")))
    run(load_config(TINY, _overrides(root, tmp_path / "b", "train.epochs=3", mixed)))
    curve = lambda d: [json.loads(x)["train_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert curve(tmp_path / "a") == pytest.approx(curve(tmp_path / "b"), rel=1e-5)
    assert len(curve(tmp_path / "a")) == 3


def test_gold_fraction_draws_label_knowledge_per_epoch(stage1_outputs):
    state_from_labels, state_from_prediction = KnowledgeState.from_labels, KnowledgeState.from_prediction
    root = stage1_outputs
    make = lambda **kw: ReportDataset(root / "m.jsonl", root / "s1/pred.jsonl", None, **kw)
    ds = make(gold_fraction=0.5, seed=3)
    draws = []
    for ds.epoch in range(4):
        draws.append([ds.uses_gold(i) for i in range(len(ds))])
    flat = functools.reduce(operator.iadd, draws, [])
    assert any(flat) and not all(flat) and draws[0] != draws[1]
    ds.epoch = 0
    assert [ds.uses_gold(i) for i in range(len(ds))] == draws[0]  # deterministic: resumable
    for i, gold in enumerate(draws[0]):
        row = ds.rows[i]
        gold_state = state_from_labels(row.labels, row.views, ds.report_locations(i))  # locations from the report
        expect = gold_state if gold else state_from_prediction(ds.preds[row.exam_id])
        assert ds.knowledge(i).to_json() == expect.to_json()
    located = [ds.report_locations(i) for i in range(len(ds))]
    assert any(located)  # the synthetic reports locate findings, so gold draws carry <loc:...> tokens
    assert not any(make().uses_gold(i) for i in range(len(ds)))
    assert all(make(source="gold").uses_gold(i) for i in range(len(ds)))
    with pytest.raises(Exception, match="gold_fraction=1.5: expected 0..1"):
        run(load_config(TINY, _overrides(root, root / "never", "knowledge.gold_fraction=1.5")))


def test_gold_heads_give_labels_for_some_heads_only(stage1_outputs):
    state_from_labels, state_from_prediction = KnowledgeState.from_labels, KnowledgeState.from_prediction
    root = stage1_outputs
    ds = ReportDataset(root / "m.jsonl", root / "s1/pred.jsonl", None, source="gold", gold_heads=("birads",))
    for i, row in enumerate(ds.rows):
        gold = state_from_labels(row.labels, row.views).to_json()
        predicted = state_from_prediction(ds.preds[row.exam_id]).to_json()
        state = ds.knowledge(i).to_json()
        assert state["birads_label"] == gold["birads_label"] and state["birads"] == gold["birads"]
        for key in ("density", "findings", "finding_on", "sides"):
            assert state[key] == predicted[key]
    assert any(
        ds.knowledge(i).to_json()["birads_label"]
        != state_from_prediction(ds.preds[r.exam_id]).to_json()["birads_label"]
        for i, r in enumerate(ds.rows)
    )  # the fixture's stage 1 is not perfect: labels replaced
    with pytest.raises(Exception, match=r"gold_heads=\['birads', 'margin'\]: expected a non-empty subset"):
        run(load_config(TINY, _overrides(root, root / "never", "knowledge.gold_heads=[birads,margin]")))


def test_verbaliser_config_trains_on_label_knowledge_with_a_plan(stage1_outputs, tmp_path):
    from stage2_sft.assembly import check_runtime

    cfg = load_config("stage2/verbaliser", _overrides(stage1_outputs, tmp_path))
    check_runtime(cfg)
    assert (cfg.knowledge.gold_fraction, cfg.data.assessment_plan, cfg.generate.assessment) == (
        1.0,
        True,
        "plan",
    )
    assert not cfg.visual.enabled and cfg.terminology.category_weight_power > 0


def test_placeholder_count_mismatch_is_a_clear_error():
    embeds = torch.zeros(1, 5, 4)
    ids = torch.tensor([[1, 7, 7, 7, 2]])
    filled = fill_placeholders(embeds, ids, 7, torch.ones(3, 4), "visual tokens")
    assert filled[0, 1:4].eq(1).all() and filled[0, 0].eq(0).all()
    with pytest.raises(PlaceholderMismatch, match="2 feature vectors for 3 placeholder tokens"):
        fill_placeholders(embeds, ids, 7, torch.ones(2, 4), "visual tokens")


def test_lora_on_local_pretrained_decoder(stage1_outputs, local_decoder, tmp_path):
    root = stage1_outputs
    local = local_decoder
    cfg = load_config(
        "stage2/lora", _overrides(root, tmp_path / "lora", f"decoder.name_or_path={local}", "train.epochs=1")
    )
    run(cfg)
    best = tmp_path / "lora" / "checkpoints" / "best"
    adapter = load_file(str(best / "decoder" / "adapter_model.safetensors"))
    assert adapter and any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    _, _model, tok = load_run(tmp_path / "lora")
    assert "architectural distortion" in tok.get_vocab()  # terminology added to the local tokenizer
    for merge in (False, True):  # adapter folder (+ base) or merged full weights
        out = tmp_path / f"bundle-{merge}"
        assert (
            cli(
                [
                    "export",
                    "--run",
                    str(tmp_path / "lora"),
                    "--out",
                    str(out),
                    "--stage1-run",
                    str(root / "s1"),
                ]
                + (["--merge-lora"] if merge else [])
            )
            == 0
        )
        assert (out / "decoder" / "adapter_config.json").exists() != merge
        assert (out / "base_decoder").exists() != merge
        from mammorg.app.bundle import load_bundle

        assert load_bundle(out).reporter.generator is not None


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_two_ranks_saves_complete_lora_adapters(stage1_outputs, local_decoder, tmp_path, zero):
    run_dir = tmp_path / f"z{zero}"
    proc = launch_stage2(stage1_outputs, run_dir, local_decoder, zero, nproc=2, cpu=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_complete_lora_run(run_dir)


def test_report_only_logits_give_the_full_lm_loss():
    """Logits kept only at report positions: same loss and gradients as the plain LM loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stage2_sft.model import ReportGenerator, SpecialIds

    torch.manual_seed(0)
    decoder = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    gen = ReportGenerator(decoder, SpecialIds(3, 4, 5), visual_dim=8, knowledge_mode="none")
    ids = torch.randint(10, 50, (2, 12))
    ids[:, 1:5] = 3
    labels = ids.clone()
    labels[0, :7], labels[1, :9], labels[1, 11:] = -100, -100, -100  # prompts and padding
    mask = torch.ones_like(ids)
    visual = torch.randn(2, 4, 8)
    loss = gen(ids, mask, labels, visual)
    loss.backward()
    grads = [p.grad.clone() for p in decoder.parameters()]
    decoder.zero_grad()
    ref = decoder(inputs_embeds=gen.embed(ids, visual), attention_mask=mask, labels=labels).loss
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, p in zip(grads, decoder.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("cc") is None,
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_decoder_trains_like_eager_and_saves_plain_keys(stage1_outputs, tmp_path):
    root = stage1_outputs
    for name, flag in (("eager", "false"), ("compiled", "true")):
        run(load_config(TINY, _overrides(root, tmp_path / name, "train.epochs=1", f"train.compile={flag}")))
    curve = lambda d: [json.loads(x)["train_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert curve(tmp_path / "compiled") == pytest.approx(curve(tmp_path / "eager"), rel=1e-3)
    saved = load_file(str(tmp_path / "compiled/checkpoints/last/trainable.safetensors"))
    assert saved and not any("_orig_mod" in k for k in saved)


def test_decoder_dtype_and_generation_cache_settings_are_checked():
    from stage2_sft.assembly import check_runtime

    with pytest.raises(Exception, match="decoder.dtype='float16': expected float32 or bfloat16"):
        load_config(TINY, ["decoder.dtype=float16"])
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="needs a GPU"):
            check_runtime(load_config(TINY, ["decoder.dtype=bfloat16"]))

    class Tok:
        eos_token_id, pad_token_id = 2, 0

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    auto = load_config(TINY).generate
    assert "cache_implementation" not in generation_kwargs(auto, Tok(), device=cpu)
    assert generation_kwargs(auto, Tok(), device=gpu)["cache_implementation"] == "static"
    static = load_config(TINY, ["generate.cache=static"]).generate
    assert generation_kwargs(static, Tok(), device=cpu)["cache_implementation"] == "static"
    with pytest.raises(Exception, match="generate.cache='paged'"):
        load_config(TINY, ["generate.cache=paged"])


def test_verbal_tie_adds_the_report_words_to_knowledge_tokens_only(stage1_outputs, tmp_path):
    run(load_config(TINY, _overrides(stage1_outputs, tmp_path, "train.epochs=1", "knowledge.verbal_tie=true")))
    _, model, tok = load_run(tmp_path)
    assert model.verbal_row is not None
    table = model.decoder.get_input_embeddings()
    knowledge, words = tok.convert_tokens_to_ids("<R:birads=4B>"), tok.convert_tokens_to_ids("BI-RADS 4B")
    plain = tok.convert_tokens_to_ids("<conf:high>")
    ids = torch.tensor([[knowledge, plain, words]])
    with torch.no_grad():
        out = model.embed(ids)
        expect = table(ids)
        expect[0, 0] += table.weight[words]
    torch.testing.assert_close(out, expect)


def test_stated_assessment_puts_stage1_categories_in_the_report(stage1_outputs, tmp_path):
    from stage2_sft.constrained import AssessmentTokens, StatedAssessment

    root = stage1_outputs
    run(load_config(TINY, _overrides(root, tmp_path, "train.epochs=1")))
    cfg, model, tok = load_run(tmp_path)
    # the processor alone: after "Right breast" only stage 1's right category keeps the best score
    labels = torch.tensor([[1, 7]])  # L: BI-RADS 1, R: BI-RADS 5 (class indices)
    proc = StatedAssessment(AssessmentTokens.of(tok), labels)
    cat = {c: tok.convert_tokens_to_ids(f"BI-RADS {c}") for c in ("1", "3", "5")}
    scores = torch.zeros(1, len(tok))
    scores[0, cat["3"]] = 5.0
    right = torch.tensor([tok("OPINION: Right breast", add_special_tokens=False)["input_ids"]])
    out = proc(right, scores.clone())
    assert out[0, cat["5"]] == 5.0 and torch.isinf(out[0, cat["3"]]) and torch.isinf(out[0, cat["1"]])
    ended = torch.tensor([tok("Right breast mass.", add_special_tokens=False)["input_ids"]])
    assert proc(ended, scores.clone())[0, cat["5"]] == 5.0  # no side named: the exam's (most severe)
    # a report cannot end before it states the exam's category (5); once stated, it can
    closing = torch.zeros(1, len(tok))
    closing[0, tok.eos_token_id] = 9.0
    assert torch.isinf(proc(ended, closing.clone())[0, tok.eos_token_id])
    stated = torch.cat([ended, torch.tensor([[cat["5"]]])], 1)
    assert proc(stated, closing.clone())[0, tok.eos_token_id] == 9.0
    assert proc(torch.cat([ended, torch.tensor([[cat["1"]]])], 1), closing.clone())[0, tok.eos_token_id] < 0
    # where it would end, it writes the category on a line of its own; so it does after its
    # management line, where it would write the management again (traced on the demo: "routine
    # screening is recommended." to the token limit)
    newline = int(AssessmentTokens.of(tok).line_breaks[0])
    assert int(proc(ended, closing.clone())[0].argmax()) in AssessmentTokens.of(tok).line_breaks.tolist()
    broken = torch.cat([ended, torch.tensor([[newline]])], 1)
    assert int(proc(broken, closing.clone())[0].argmax()) == cat["5"]
    line = "Right breast mass.\ntissue diagnosis is recommended.\n"
    managed = torch.tensor([tok(line, add_special_tokens=False)["input_ids"]])
    biopsy = tok.convert_tokens_to_ids("tissue diagnosis")
    assert biopsy in managed[0].tolist()
    again = torch.zeros(1, len(tok))
    again[0, biopsy] = 9.0  # the decoder would write its management again
    assert int(proc(managed, again.clone())[0].argmax()) == cat["5"]
    assert int(proc(broken, again.clone())[0].argmax()) == biopsy  # after no management line: free
    # the last rule: a report that has not stated it 16 tokens before the limit writes it there
    from stage2_sft.constrained import CategoryByDeadline

    late = CategoryByDeadline(proc, max_new_tokens=ended.shape[1] + 16)
    assert int(late(ended, again.clone())[0].argmax()) in AssessmentTokens.of(tok).line_breaks.tolist()
    assert int(late(broken, again.clone())[0].argmax()) == cat["5"]
    assert int(late(stated, again.clone())[0].argmax()) == biopsy  # stated already: free
    early = CategoryByDeadline(proc, max_new_tokens=ended.shape[1] + 17)
    assert int(early(ended, again.clone())[0].argmax()) == biopsy  # before the deadline: free
    # with the lexicon, the composition term is stage 1's density
    from stage2_sft.assembly import lexicon_of

    tokens = AssessmentTokens.of(tok, lexicon_of(cfg.terminology))
    dense = {d: tok.convert_tokens_to_ids(t) for d, t in (("c", "heterogeneously dense"), ("d", "extremely dense"))}
    scores[0, dense["d"]] = 7.0
    out = StatedAssessment(tokens, labels, torch.tensor([2]))(right, scores.clone())  # stage 1: density c
    assert out[0, dense["c"]] == 7.0 and torch.isinf(out[0, dense["d"]])
    # end to end: every category the reports state is one stage 1 decided for that exam
    ds = ReportDataset(root / "m.jsonl", root / "s1/pred.jsonl", make_builder(cfg, tok), with_reports=False)
    rows = generate_reports(model, tok, ds, cfg, 4, assessment="stage1")
    preds = {r["exam_id"]: r["pred"]["birads"] for r in read_jsonl(root / "s1/pred.jsonl")}
    densities = {r["exam_id"]: r["pred"]["density"] for r in read_jsonl(root / "s1/pred.jsonl")}
    for r in rows:
        stated = {v for v in r["structured"]["birads"].values() if v is not None}
        assert stated <= {preds[r["id"]]["L"], preds[r["id"]]["R"]}
        assert r["structured"]["density"] in (None, densities[r["id"]])
    with pytest.raises(Exception, match="generate.assessment='always'"):
        generate_reports(model, tok, ds, cfg, 4, assessment="always")


def test_plan_tokens_state_the_report_categories():
    assert plan_tokens({"L": "1", "R": "4B", "exam": "4B"}) == [
        "<plan>",
        "<L:birads=1>",
        "<R:birads=4B>",
        "</plan>",
    ]
    assert plan_tokens({"L": None, "R": None, "exam": "3"}) == ["<plan>", "<exam:birads=3>", "</plan>"]
    assert plan_tokens({"L": "4", "R": None, "exam": "4"}) == ["<plan>", "</plan>"]  # a bare 4: no class


class _Scripted:
    """Logits processor for tests: forces ``script`` at the first steps, then favours ``then``."""

    def __init__(self, script: list[int], then: int):
        self.script, self.then = script, then

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1]
        scores[:] = -1e4
        scores[:, self.script[step] if step < len(self.script) else self.then] = 0.0
        return scores


def test_assessment_plan_run_states_its_own_plan(stage1_outputs, tmp_path):
    from evaluation.parser import parse_report
    from stage2_sft.constrained import AssessmentTokens, PlannedAssessment, assessment_tokens

    root = stage1_outputs
    run(load_config(TINY, _overrides(root, tmp_path, "train.epochs=1", "data.assessment_plan=true")))
    cfg, model, tok = load_run(tmp_path)
    builder = make_builder(cfg, tok)
    report = "Right breast BI-RADS 4B. Left breast BI-RADS 1."
    ids = builder.report_ids(report)
    assert tok.convert_ids_to_tokens(ids[:4]) == ["<plan>", "<L:birads=1>", "<R:birads=4B>", "</plan>"]
    assert parse_report(tok.decode(ids, skip_special_tokens=True)).birads["R"] == "4B"  # plan dropped
    # the processor alone: after "Right breast" only the plan's right category keeps the best score
    proc = PlannedAssessment(AssessmentTokens.of(tok))
    cat = {c: tok.convert_tokens_to_ids(f"BI-RADS {c}") for c in ("1", "3", "4B")}
    written = torch.tensor([ids[:4] + tok("OPINION: Right breast", add_special_tokens=False)["input_ids"]])
    scores = torch.zeros(1, len(tok))
    scores[0, cat["3"]] = 5.0
    out = proc(written, scores.clone())
    assert out[0, cat["4B"]] == 5.0 and torch.isinf(out[0, cat["3"]]) and torch.isinf(out[0, cat["1"]])
    unplanned = torch.tensor([tok("OPINION: Right breast", add_special_tokens=False)["input_ids"]])
    assert proc(unplanned, scores.clone())[0, cat["3"]] == 5.0  # no plan yet: free
    # in generate (KV cache, inputs_embeds): a scripted start writes a plan and "Right breast", then
    # favours BI-RADS 3; the processor turns it into the plan's right category
    script = (
        tok.convert_tokens_to_ids(["<plan>", "<L:birads=1>", "<R:birads=5>", "</plan>"])
        + tok("OPINION: Right breast", add_special_tokens=False)["input_ids"]
    )
    ds = ReportDataset(root / "m.jsonl", root / "s1/pred.jsonl", builder, with_reports=False)
    batch = collate([ds[i] for i in range(len(ds))], tok.pad_token_id, for_generation=True)
    kwargs = {
        **generation_kwargs(cfg.generate, tok, torch.device("cpu")),
        "max_new_tokens": len(script) + 1,
        "logits_processor": LogitsProcessorList([_Scripted(script, cat["3"]), proc]),
    }
    outs = model.generate(batch.input_ids, batch.attention_mask, batch.visual, batch.knowledge, **kwargs)
    for out in outs:
        assert parse_report(tok.decode(out, skip_special_tokens=True)).birads["R"] == "5"
    rows = generate_reports(model, tok, ds, cfg, 4, assessment="plan")
    assert len(rows) == len(ds) and not any("<plan>" in r["text"] for r in rows)
    with pytest.raises(Exception, match="assessment_plan"):
        assessment_tokens("plan", tok, plan=False)
    # category_weight_power also balances the plan's category tokens (among themselves)
    from stage2_sft.assembly import category_weights

    reports = [
        builder.report_ids(r)
        for r in (
            report,
            "Right breast BI-RADS 1. Left breast BI-RADS 1.",
            "Right breast BI-RADS 1. Left breast BI-RADS 1.",
        )
    ]
    weighted = replace(cfg, ["terminology.category_weight_power=1.0"])
    w = category_weights(weighted, tok, reports, None)
    plan_w = lambda t: float(w[tok.convert_tokens_to_ids(t)])
    assert plan_w("<R:birads=4B>") == pytest.approx(2 * plan_w("<R:birads=1>"))  # seen once vs twice
    assert plan_w("<R:birads=5>") == 1.0 and plan_w("<plan>") == 1.0  # unseen, not a category
    unplanned_cfg = replace(weighted, ["data.assessment_plan=false", "generate.assessment=free"])
    assert float(category_weights(unplanned_cfg, tok, reports, None)[tok.convert_tokens_to_ids("<R:birads=4B>")]) == 1.0


def test_decoder_pretraining_resumes_on_the_same_curve(stage1_outputs, tmp_path):
    from mammorg.config import load_config as load_any
    from stage2_sft.config import PretrainConfig
    from stage2_sft.pretrain import pretrain

    base = [
        f"data.manifest={stage1_outputs / 'm.jsonl'}",
        "data.split=null",
        "train.epochs=3",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_hidden_layers=1",
        "vocab_size=300",
    ]
    pretrain(load_any("stage2/pretrain", PretrainConfig, [*base, f"out_dir={tmp_path / 'a'}"]))
    pretrain(
        load_any(
            "stage2/pretrain",
            PretrainConfig,
            [*base, f"out_dir={tmp_path / 'b'}", "train.stop_after_epochs=1"],
        )
    )
    result = pretrain(load_any("stage2/pretrain", PretrainConfig, [*base, f"out_dir={tmp_path / 'b'}"]))
    curve = lambda d: json.loads((d / "pretrain_log.json").read_text())["epoch_losses"]
    assert len(curve(tmp_path / "a")) == 3 and curve(tmp_path / "a") == pytest.approx(curve(tmp_path / "b"), rel=1e-5)
    assert result["final_loss"] == pytest.approx(curve(tmp_path / "a")[-1])
    assert (tmp_path / "b" / "config.json").exists() and (tmp_path / "b" / "tokenizer.json").exists()
