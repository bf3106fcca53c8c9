"""The default stage-2 recipe's parts (issue #20): consistent management, visual drop-out,
descriptor knowledge, chat-template prompts; deterministic parallel synthesis."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from evaluation.hallucination import management_inconsistent
from evaluation.parser import parse_report
from mammorg.config import load_config
from mammorg.io import MammorgError
from stage2_sft.config import Stage2Config
from stage2_sft.constrained import MANAGEMENT, ConsistentManagement


def _tokenizer(local_decoder, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(local_decoder), local_files_only=True)
    from stage2_sft.model import prompt_tokens

    tok.add_tokens(prompt_tokens(), special_tokens=True)
    return tok


def test_defaults_state_stage1_categories_with_visual_tokens():
    cfg = load_config("stage2/tiny", Stage2Config)
    assert cfg.data.assessment_plan and cfg.generate.assessment == "stage1" and cfg.generate.management == "consistent"
    assert cfg.knowledge.gold_fraction == 1.0 and not cfg.knowledge.confidence and cfg.knowledge.locations
    assert cfg.visual.enabled and cfg.visual.drop_rate == 0.5


def test_management_follows_the_written_category(local_decoder, tmp_path):
    tok = _tokenizer(local_decoder, tmp_path)
    processor = ConsistentManagement(tok)
    assert processor.active
    vocab = tok.get_vocab()
    written = torch.tensor([[vocab["BI-RADS 5"], vocab["BI-RADS 1"]], [vocab["BI-RADS 1"], vocab["BI-RADS 2"]]])
    scores = torch.zeros(2, len(tok))
    out = processor(written, scores.clone())
    routine, biopsy = vocab["routine screening"], vocab["tissue diagnosis"]
    assert out[0, biopsy] == 0 and torch.isneginf(out[0, routine])  # the most severe category (5) decides
    assert out[1, routine] == 0 and out[1, biopsy] == float("-inf")  # a benign exam: no biopsy
    assert torch.isneginf(out[1, vocab["short-interval follow-up"]])
    assert torch.equal(processor(written[:, :0], scores.clone()), scores)  # nothing written yet: free
    assert set(MANAGEMENT) <= set(vocab)


def test_category_zero_names_its_imaging_only_in_its_own_sentence(local_decoder, tmp_path):
    tok = _tokenizer(local_decoder, tmp_path)
    processor = ConsistentManagement(tok)
    vocab = tok.get_vocab()
    imaging, biopsy = vocab["additional imaging evaluation"], vocab["tissue diagnosis"]
    dash, stop = tok(" -", add_special_tokens=False)["input_ids"], tok(".", add_special_tokens=False)["input_ids"]
    # traced: "Right breast BI-RADS 4B. Left breast BI-RADS 0. Recall for additional imaging ..."
    naming = [vocab["BI-RADS 4B"], *stop, vocab["BI-RADS 0"], *dash]  # "BI-RADS 0 - ..." names it
    after = [vocab["BI-RADS 4B"], *stop, vocab["BI-RADS 0"], *stop]  # the exam's recommendation
    named, recommended = (processor(torch.tensor([ids]), torch.zeros(1, len(tok)))[0] for ids in (naming, after))
    assert named[imaging] == 0 and named[biopsy] == 0
    assert torch.isneginf(recommended[imaging]) and recommended[biopsy] == 0


def test_management_check_of_evaluation():
    bad = "Overall: BI-RADS 5 - Highly suggestive of malignancy. Routine screening mammography is recommended."
    good = "Overall: BI-RADS 5 - Highly suggestive of malignancy. Tissue diagnosis is recommended."
    zero = (
        "Right breast: BI-RADS 4A.\nLeft breast: BI-RADS 0 - Incomplete - need additional imaging evaluation.\n"
        "Overall: BI-RADS 4A.\nTissue diagnosis is recommended."
    )
    assert management_inconsistent(parse_report(bad), bad)
    assert not management_inconsistent(parse_report(good), good)
    assert not management_inconsistent(parse_report(zero), zero)


def test_a_category_is_named_by_its_own_name(local_decoder, tmp_path):
    """Traced on the knowledge benchmark: a category held to stage 1's decision kept the name the
    decoder had begun for its own ("BI-RADS 4C - Low suspicion for malignancy"); after the
    category and its separator the category's ACR name is written, in the spelling the decoder
    prefers, and evaluation counts the wrong names."""
    from evaluation.hallucination import category_names_inconsistent
    from stage2_sft.constrained import CategoryNames, spell

    tok = _tokenizer(local_decoder, tmp_path)
    processor = CategoryNames(tok)
    vocab = tok.get_vocab()
    stop = tok(".", add_special_tokens=False)["input_ids"]

    def chosen(text_ids: list[int], favourite: int = stop[0]) -> int:
        scores = torch.zeros(1, len(tok))
        scores[0, favourite] = 5.0
        return int(processor(torch.tensor([text_ids]), scores)[0].argmax())

    dash = tok(" -", add_special_tokens=False)["input_ids"]
    category = tok("Overall: ", add_special_tokens=False)["input_ids"] + [vocab["BI-RADS 4C"]] + dash
    high = processor.spellings["4C"]
    assert chosen(category) in {sp[0] for sp in high}  # not the decoder's "."
    name = spell(tok, " High suspicion for malignancy")
    assert name in high and chosen(category + list(name[:2])) == name[2]  # token by token
    assert chosen(category + list(name)) == stop[0]  # the name written: free again
    assert chosen([vocab["BI-RADS 4C"], *stop]) == stop[0]  # no separator: no name follows
    bracket = tok(" (", add_special_tokens=False)["input_ids"]
    assert chosen([vocab["BI-RADS 2"], *bracket]) in {sp[0] for sp in processor.spellings["2"]}
    lower = spell(tok, "probably benign")  # the lexicon's spelling: the decoder's choice is kept
    assert chosen([vocab["BI-RADS 3"], *bracket], lower[0]) == lower[0]

    assert category_names_inconsistent("Overall: BI-RADS 4C - Low suspicion for malignancy.") == 1
    assert category_names_inconsistent("BI-RADS 5 - Highly suggestive of malignancy. BI-RADS 2 (Benign).") == 0
    assert category_names_inconsistent("BIRADS: 3 (probably benign). BI-RADS Category 2: Negative.") == 1
    assert category_names_inconsistent("BI-RADS 2. Routine screening mammography is recommended.") == 0


def test_visual_drop_out_only_in_training_and_reproducible(stage1_outputs):
    from stage2_sft.assembly import make_builder
    from stage2_sft.data import ReportDataset
    from stage2_sft.train import prepare_tokenizer

    root = stage1_outputs
    cfg = load_config(
        "stage2/tiny",
        Stage2Config,
        [f"data.manifest={root / 'm.jsonl'}", f"data.predictions={root / 's1/pred.jsonl'}", "visual.tokens_per_view=4"],
    )
    tok, _ = prepare_tokenizer(cfg, root / "drop_tok", 0)
    builder = make_builder(cfg, tok)

    def views(drop: float, epoch: int) -> list[int]:
        ds = ReportDataset(root / "m.jsonl", root / "s1/pred.jsonl", builder, None, visual_drop=drop)
        ds.epoch = epoch
        return [len(ds[i].views) for i in range(len(ds))]

    assert all(n > 0 for n in views(0.0, 0))
    dropped = views(0.5, 0)
    assert 0 in dropped and any(dropped) and dropped == views(0.5, 0) and dropped != views(0.5, 3)


def test_descriptor_knowledge_tokens():
    from mammorg.schema import Labels
    from stage2_sft.knowledge import KnowledgeState, KnowledgeVocabulary

    labels = Labels.make(
        "b",
        {"L": "5", "R": "1"},
        {"L": {"mass": "pos", "calcification": "pos"}, "R": {}},
        {"L": {"mass_margin": "spiculated", "calc_distribution": "segmental"}, "R": {}},
    )
    tokens = KnowledgeState.from_labels(labels, {"L_CC": "x", "R_CC": "y"}).tokens(confidence=False)
    mass = tokens.index("<L:mass>")
    assert tokens[mass + 1] == KnowledgeVocabulary.descriptor("L", "mass_margin", "spiculated")
    assert tokens[tokens.index("<L:calcification>") + 1] == "<L:calc_distribution=segmental>"
    assert set(tokens) <= set(KnowledgeVocabulary.all())


def test_chat_template_wraps_the_prompt(local_decoder, tmp_path):
    from stage2_sft.assembly import chat_wrapper

    tok = _tokenizer(local_decoder, tmp_path)
    tok.chat_template = "{% for m in messages %}<start>{{ m['content'] }}<end>{% endfor %}<model>"
    before, after = chat_wrapper(tok)
    assert tok.decode(before).strip().startswith("<") and "model" in tok.decode(after)


def test_parallel_synthesis_writes_the_same_files(tmp_path):
    from mammorg.synth.writer import SynthSettings, synthesise

    settings = SynthSettings(exams=4, seed=7, height=64, width=32)
    synthesise(tmp_path / "a", settings, progress=False)
    synthesise(tmp_path / "b", settings, progress=False, workers=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_management_openers_are_blocked_piece_by_piece(local_decoder, tmp_path):
    """A management sentence without a lexicon term ("Recall for ...", spelt in pieces) cannot be
    completed after a benign category."""
    tok = _tokenizer(local_decoder, tmp_path)
    processor = ConsistentManagement(tok)
    vocab = tok.get_vocab()
    rule = next(r for r in processor.rules if r.term == "additional imaging evaluation" and not r.at_start)
    written = torch.tensor([[vocab["BI-RADS 1"], *rule.prefix], [vocab["BI-RADS 0"], *rule.prefix]])
    out = processor(written, torch.zeros(2, len(tok)))
    assert torch.isneginf(out[0, rule.piece]) and out[1, rule.piece] == 0


def test_blocked_management_is_steered_to_what_the_category_calls_for(local_decoder, tmp_path):
    """Traced on the demo: stage 1 held the category to 2 where the decoder was heading for a
    recall; blocking "Rec|all" left it writing "Reccall" and looping. Now the decoder's blocked
    choice is replaced by the next piece of the recommendation the stated category calls for: the
    atomic term, "Recall for ..." for category 0, or the piece where the spellings part
    ("R|outine" for "R|ecall")."""
    from stage2_sft.constrained import recommendation_spellings

    tok = _tokenizer(local_decoder, tmp_path)
    if "<R:birads=2>" not in tok.get_vocab():
        tok.add_tokens(["<R:birads=2>"], special_tokens=True)
    processor = ConsistentManagement(tok)
    vocab = tok.get_vocab()
    stop = tok(".", add_special_tokens=False)["input_ids"]
    spellings = recommendation_spellings(tok)
    scores = torch.zeros(2, len(tok))
    scores[0, vocab["tissue diagnosis"]] = 5.0  # the decoder heads for a biopsy after BI-RADS 2
    scores[1, vocab["routine screening"]] = 5.0  # and for routine screening after BI-RADS 0
    out = processor(torch.tensor([[vocab["BI-RADS 2"], *stop], [vocab["BI-RADS 0"], *stop]]), scores)
    assert int(out[0].argmax()) == vocab["routine screening"]
    assert int(out[1].argmax()) in {s[0] for s in spellings["additional imaging evaluation"]}

    recall = tok("Recall for", add_special_tokens=False)["input_ids"]
    routine = tok("Routine screening", add_special_tokens=False)["input_ids"]
    if recall[0] != routine[0] or len(recall) < 3:
        pytest.skip("this tokenizer's spellings part at their first piece")
    assessed = [vocab["<R:birads=2>"], vocab["BI-RADS 2"], *stop]
    planned = [vocab["<R:birads=2>"], *stop, *stop]  # findings may open so ("Round ...")
    scores = torch.zeros(2, len(tok))
    scores[:, recall[0]] = 5.0  # the decoder heads for "R(ecall)" at a sentence start
    out = processor(torch.tensor([assessed, planned]), scores)
    assert int(out[0].argmax()) in {s[0] for s in spellings["routine screening"]} and out[1, recall[0]] == 5.0
    raw = ConsistentManagement(tok, normalized=False)  # a decoder that learnt "Routine screening ..."
    scores = torch.zeros(2, len(tok))
    scores[:, recall[1]] = 5.0  # "R" written, the decoder heads for "Re(call)"
    out = raw(torch.tensor([[*assessed, recall[0]], [*planned, recall[0]]]), scores)
    assert int(out[0].argmax()) == routine[1] and out[1, recall[1]] == 5.0


def test_management_spelt_in_pieces_is_blocked_by_the_text_guard(local_decoder, tmp_path):
    """A pretrained decoder can spell a management term in its own word pieces instead of the
    atomic lexicon token: the text guard blocks the piece that would write it after a category
    that does not call for it, and lets it through after one that does."""
    from stage2_sft.constrained import opens_phrase

    tok = _tokenizer(local_decoder, tmp_path)
    processor = ConsistentManagement(tok)
    vocab = tok.get_vocab()
    pieces = tok(" short-interval", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1 and vocab["short-interval follow-up"] not in pieces  # spelt in pieces
    candidate = pieces[-1]
    rows = [[vocab["BI-RADS 1"], *pieces[:-1]], [vocab["BI-RADS 3"], *pieces[:-1]]]
    scores = torch.zeros(2, len(tok))
    scores[:, candidate] = 10.0  # the decoder's favourite next piece
    out = processor(torch.tensor(rows), scores)
    assert torch.isneginf(out[0, candidate]) and out[1, candidate] == 10.0
    routine = tok(" routine", add_special_tokens=False)["input_ids"]
    benign = torch.zeros(1, len(tok))
    benign[0, routine[0]] = 10.0
    assert processor(torch.tensor([[vocab["BI-RADS 1"]]]), benign)[0, routine[0]] == 10.0
    phrases = ["6 months", "short-interval follow-up"]
    assert opens_phrase("follow-up in 6 months", "follow-up in 6 month", phrases)
    assert not opens_phrase("follow-up in 16 months", "follow-up in 16 month", phrases)
    assert not opens_phrase("the breast. short", "the breast. shor", phrases)


def test_management_follows_the_report_not_a_plan_it_contradicts(local_decoder, tmp_path):
    """A malformed plan (here category 3 for the right breast) decides the management only until
    the report writes its own categories; then the report's categories decide."""
    tok = _tokenizer(local_decoder, tmp_path)
    vocab = tok.get_vocab()
    if "<R:birads=3>" not in vocab:
        tok.add_tokens(["<R:birads=3>"], special_tokens=True)
        vocab = tok.get_vocab()
    processor = ConsistentManagement(tok)
    follow_up, routine = vocab["short-interval follow-up"], vocab["routine screening"]
    plan_only = processor(torch.tensor([[vocab["<R:birads=3>"]]]), torch.zeros(1, len(tok)))
    assert plan_only[0, follow_up] == 0 and torch.isneginf(plan_only[0, routine])
    both = processor(torch.tensor([[vocab["<R:birads=3>"], vocab["BI-RADS 1"]]]), torch.zeros(1, len(tok)))
    assert torch.isneginf(both[0, follow_up]) and both[0, routine] == 0


def test_assessment_plan_keeps_its_trained_form(local_decoder, tmp_path):
    """Inside an open plan: at most one category per breast, left before right, then </plan>
    (a Gemma run wrote <R:birads=3> <R:birads=1> and no left category)."""
    from stage2_sft.constrained import AssessmentTokens, PlannedAssessment
    from stage2_sft.knowledge import KnowledgeVocabulary as K

    tok = _tokenizer(local_decoder, tmp_path)
    missing = [t for t in K.all() if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    vocab = tok.get_vocab()
    processor = PlannedAssessment(AssessmentTokens.of(tok))
    opening, closing = vocab[K.PLAN], vocab[K.PLAN_END]
    left1, right3, right1 = vocab["<L:birads=1>"], vocab["<R:birads=3>"], vocab["<R:birads=1>"]

    def allowed(ids: list[int]) -> set[int]:
        out = processor(torch.tensor([ids]), torch.zeros(1, len(tok)))
        return set((~torch.isneginf(out[0])).nonzero().squeeze(1).tolist())

    findings = [vocab[t] for t in K.plan_findings()]
    assert allowed([opening, right3]) == {closing, *findings}  # no second right category, no left after right
    after_left = allowed([opening, left1])
    assert right1 in after_left and closing in after_left and left1 not in after_left
    l_mass, r_calc = vocab["<L:mass>"], vocab["<R:calcification>"]
    after_finding = allowed([opening, right3, r_calc])  # findings in the plan's order, each once
    assert closing in after_finding and r_calc not in after_finding and l_mass not in after_finding
    assert left1 in allowed([opening]) and closing not in allowed([opening])
    word = tok(" breast", add_special_tokens=False)["input_ids"][0]
    assert word in allowed([opening, left1, right1, closing]) and word not in allowed([opening, left1])


def test_findings_plan_is_trained_from_the_report_and_written_from_stage1(local_decoder, tmp_path):
    """With data.findings_plan the target's plan names the findings the report states (L, then R,
    in FINDINGS order), and at generation the plan names exactly stage 1's decided findings once
    the decoder is done with the categories, then closes."""
    from mammorg.labels import FINDINGS
    from stage2_sft.data import PromptBuilder
    from stage2_sft.knowledge import KnowledgeVocabulary as K
    from stage2_sft.stated_findings import PlannedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    missing = [t for t in K.all() if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    vocab = tok.get_vocab()
    text = (
        "Right Breast: There is a 12 mm oval mass with circumscribed margins.\n"
        "Left Breast: Amorphous calcifications in a segmental distribution.\n"
        "OPINION: Right breast BI-RADS 4A. Left breast BI-RADS 4B. Tissue diagnosis is recommended."
    )
    plan = PromptBuilder(tok, 1, plan=True, findings_plan=True).report_ids(text)
    closing = plan.index(vocab[K.PLAN_END])
    assert tok.convert_ids_to_tokens(plan[1:closing]) == [
        "<L:birads=4B>",
        "<R:birads=4A>",
        "<L:calcification>",
        "<R:mass>",
    ]
    assert vocab["<R:mass>"] not in PromptBuilder(tok, 1, plan=True).report_ids(text)

    decided = torch.zeros(1, 2, len(FINDINGS))
    decided[0, 0, FINDINGS.index("asymmetry")] = decided[0, 1, FINDINGS.index("mass")] = 1  # L, R
    ids = [vocab[t] for t in K.plan_findings()]
    processor = PlannedFindings(ids, (vocab[K.PLAN], vocab[K.PLAN_END]), decided)

    def step(written: list[str], favourite: str) -> str:
        scores = torch.zeros(1, len(tok))
        scores[0, vocab[favourite]] = 5.0
        out = processor(torch.tensor([[vocab[t] for t in written]]), scores)
        return tok.convert_ids_to_tokens(int(out[0].argmax()))

    start = [K.PLAN, "<L:birads=2>", "<R:birads=4A>"]
    assert step(start[:2], "<R:birads=4A>") == "<R:birads=4A>"  # the categories are the decoder's
    assert step(start, K.PLAN_END) == "<L:asymmetry>"  # it would close: stage 1's findings first
    assert step([*start, "<L:asymmetry>"], "<L:mass>") == "<R:mass>"
    assert step([*start, "<L:asymmetry>", "<R:mass>"], "<R:calcification>") == K.PLAN_END
    # the forced token takes the score of the decoder's own choice and nothing else keeps one: a
    # beam cannot wander off the plan (with --num-beams 3 the plan once repeated its categories)
    scores = torch.zeros(1, len(tok))
    scores[0, vocab["<L:mass>"]] = 5.0
    out = processor(torch.tensor([[vocab[t] for t in start]]), scores)
    assert out[0, vocab["<L:asymmetry>"]] == 5.0 and int(torch.isfinite(out).sum()) == 1
    after = [*start, "<L:asymmetry>", "<R:mass>", K.PLAN_END]
    assert step(after, "<L:mass>") == "<L:mass>"  # after the plan: untouched


def test_stated_findings_blocks_undecided_findings_and_sides_outside_negations(local_decoder, tmp_path):
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    vocab = tok.get_vocab()
    mass, calc = vocab["mass"], vocab["calcifications"]
    left, right = vocab["Left"], vocab["Right"]
    decided = torch.zeros(2, 2, 7, dtype=torch.bool)
    decided[0, 1, 0] = True  # exam 0: stage 1 decided a mass in the right breast; exam 1: nothing
    processor = StatedFindings(tokens, decided)

    def step(text: str, rows: int = 2) -> torch.Tensor:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return processor(torch.tensor([ids] * rows), torch.zeros(rows, len(tok)))

    out = step("There is a")
    assert out[0, mass] == 0 and torch.isneginf(out[0, calc])  # only the decided finding
    assert torch.isneginf(out[1, mass]) and torch.isneginf(out[1, calc])
    assert (step("No")[:, [mass, calc]] == 0).all()  # "No mass, calcifications ...": free
    assert torch.isneginf(step("No mass. There is a")[1, mass])  # the negation ended with its sentence
    assert torch.isneginf(step("Left Breast: There is a")[0, mass])  # a line about the left breast
    assert step("Right Breast: There is a")[0, mass] == 0
    out = step("There is a mass in the")  # after the term: only the breast it was decided for
    assert torch.isneginf(out[0, left]) and out[0, right] == 0
    assert out[1, left] == 0 and out[1, right] == 0  # nothing decided: the side stays free
    beams = step("There is a", rows=4)  # 2 beams per exam
    assert beams[1, mass] == 0 and torch.isneginf(beams[2, mass])
    # heading for an undecided finding, the decoder names the decided one instead (traced: a
    # blocked "focal asymmetry" let "A routine screening is recommended." through)
    ids = tok("There is a", add_special_tokens=False)["input_ids"]
    scores = torch.zeros(2, len(tok))
    scores[:, calc] = 5.0
    out = processor(torch.tensor([ids] * 2), scores)
    steered = int(out[0].argmax())  # a spelling of "mass" (the term or the tokenizer's own piece)
    assert tokens.finding_of[steered] == 0 and torch.isneginf(out[1, mass]) and int(out[1].argmax()) != calc
    assert out[0, steered] == 5.0  # with the score of the blocked choice, no more (beam search sums them)
    # words that describe a finding follow the finding's rule (traced on the demo: "A 17 mm oval
    # equal density calcifications with circumscribed margins", "There is associated mass")
    oval, amorphous = vocab["oval"], vocab["amorphous"]
    out = step("There is a 12 mm")
    assert out[0, oval] == 0 and torch.isneginf(out[1, oval])  # a mass shape: exam 0 has a mass
    assert torch.isneginf(out[:, amorphous]).all()  # a calcification morphology: neither has one
    assert (step("No")[:, [oval, amorphous]] == 0).all()  # negated: free
    associated = tokens.associated_opener[-1]
    if tokens.describes[associated].any():  # the tokenizer has the word whole
        assert torch.isneginf(step("There is")[:, associated]).all()  # no associated feature decided

    # the line of a breast stage 1 decided nothing for opens with a negation, not with a lesion
    # whose term would then be blocked (traced: "Left Breast: There is a 21 mm round high density  in")
    there = tok("There", add_special_tokens=False)["input_ids"][0]
    the = tok.decode([there]).strip()
    category = vocab["BI-RADS 1"]

    def opening(text: str, favourite: int, space: bool = False) -> list[str]:
        ids = tok(text, add_special_tokens=False)["input_ids"] + ([vocab["Ġ"]] if space else [])
        scores = torch.zeros(2, len(tok))
        scores[:, favourite] = 5.0
        return [tok.decode([int(i)]).strip() for i in processor(torch.tensor([ids] * 2), scores).argmax(1)]

    assert opening("Right Breast:", there) == [the, "No"]  # exam 0 decided a right mass
    assert opening("Left Breast:", there) == ["No", "No"]
    assert opening("Left Breast:", there, space=True) == ["No", "No"]  # after the lone word boundary
    assert opening("Left breast:", category, space=True) == ["BI-RADS 1"] * 2  # an impression line
    assert opening("There is no mass in the left breast.", there) == [the, the]  # no heading
    # a colon after a category names the category (traced: "Right breast: BI-RADS 2: Negative")
    benign = tok("Benign", add_special_tokens=False)["input_ids"][0]
    named = [tok.decode([benign]).strip()] * 2
    assert opening("Left breast: BI-RADS 1:", benign) == named
    assert opening("Left breast: BI-RADS 1:", benign, space=True) == named


def test_a_breast_line_goes_on_until_it_names_stage1_findings(local_decoder, tmp_path):
    """Traced on the knowledge benchmark: the decoder names about one finding per breast line
    (breasts with two or more decided findings: 116 of their 300 findings named). Where it would
    end such a line, the next sentence opens with the likeliest finding left (not a mass); a mass
    left last opens with "There is a"; lines about a breast whose findings are all named, or
    negated lines, end as the decoder likes."""
    from mammorg.labels import FINDINGS
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    tok.add_tokens(["FINDINGS", "IMPRESSION"])  # as a tokenizer trained on more reports has them
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    vocab = tok.get_vocab()
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
    decided = torch.zeros(1, 2, 7, dtype=torch.bool)
    for f in ("mass", "calcification", "architectural_distortion"):
        decided[0, 1, FINDINGS.index(f)] = True  # all in the right breast
    processor = StatedFindings(tokens, decided)

    def next_token(text: str, favourite: int, ids: list[int] = ()) -> int:
        written = tok(text, add_special_tokens=False)["input_ids"] + list(ids)
        scores = torch.zeros(1, len(tok))
        scores[0, favourite] = 5.0
        out = processor(torch.tensor([written]), scores)
        return int(out[0].argmax())

    line = "Right Breast: There is a 12 mm oval mass with circumscribed margins."
    assert next_token(line, newline) == vocab["Ġ"]  # not the end of the line yet
    left_over = {FINDINGS.index("architectural_distortion"), FINDINGS.index("calcification")}
    assert int(tokens.opener_of[next_token(line, newline, [vocab["Ġ"]])]) in left_over
    # calcifications open with a morphology term, as reports write them (traced on the demo: the
    # bare term at a sentence start ran into "calcifications or mass, segmental ...")
    fine = vocab["fine pleomorphic"]
    opened = next_token(line, fine, [vocab["Ġ"]])
    assert opened == fine and int(tokens.opener_of[fine]) == FINDINGS.index("calcification")
    assert int(tokens.opener_of[vocab["calcifications"]]) == -1
    named = "Right Breast: architectural distortion is seen. amorphous calcifications are seen."
    opener = tokens.mass_opener
    assert next_token(named, newline) == opener[0]  # the mass, left last: "There is a"
    assert next_token(named, newline, opener[:1]) == opener[1]
    assert next_token(named + " There is a 12 mm oval mass.", newline) == newline  # all named
    assert next_token("Left Breast: No mass or calcifications.", newline) == newline  # not its breast
    no = vocab["No"]
    assert next_token("Right Breast:", no) != no  # its heading does not deny what stage 1 decided
    assert next_token("Right Breast: No mass or calcifications.", newline) == vocab["Ġ"]  # the line goes on
    assert next_token("Right Breast: BI-RADS 4A (Low suspicion).", newline) == newline  # a category line
    # a breast's line is written once (traced on the demo: a second "Left Breast:" line looped)
    right = tok("Right", add_special_tokens=False)["input_ids"][0]
    assert next_token("Right Breast: No mass.\nLeft Breast: No mass.\n", right) != right
    assert next_token("Breast composition: The breasts are fatty.\n", right) == right
    # so is a heading (traced: "Overall: BI-RADS 0 (...)." five times over, "FINDINGS:" twice)
    findings = vocab["FINDINGS"]
    assert next_token("FINDINGS:\nNo mass in either breast.\n", findings) != findings
    assert next_token("Breast composition: The breasts are fatty.\n", findings) == findings

    # skin thickening, left last, opens with "There is associated" and its term (traced: the bare
    # term ended its sentence, "skin thickening.", 40 times in 5 seeds' default reports)
    decided[0, 1, FINDINGS.index("skin_thickening")] = True
    named_all = named + " There is a 12 mm oval mass."
    associated = tokens.associated_opener
    assert next_token(named_all, newline) == associated[0]
    assert next_token(named_all, newline, associated[:2]) == associated[2]
    skin = next_token(named_all, newline, [*associated, vocab["Ġ"]])
    assert int(tokens.finding_of[skin]) == FINDINGS.index("skin_thickening")
    assert next_token(named_all + " There is associated skin thickening.", newline) == newline
    decided[0, 1, FINDINGS.index("skin_thickening")] = False

    # a findings section (one line per finding) names the other breast's findings before its end,
    # and does not open by denying every finding
    decided[0, 0, FINDINGS.index("calcification")] = True
    impression = vocab["IMPRESSION"]
    section = "FINDINGS:\nThere is a 12 mm oval mass in the right breast.\n"
    assert int(tokens.opener_of[next_token(section, impression)]) in left_over
    assert next_token("FINDINGS:\n", no) != no
    # a report of one line per breast opens no impression before the line of each breast with a
    # decided finding (traced: "OPINION: ..." right after the right breast's line, the left one's
    # asymmetry never named)
    left = next_token("Right Breast: There is a 12 mm oval mass.\n", impression)
    assert tok.decode([left]).strip().lower() == "left"
    assert next_token("Right Breast: No mass.\nLeft Breast: No mass.\n", impression) == impression
    assert next_token("FINDINGS:\nThere is a mass in the right breast.\n", no) == no  # later: free
    assert (
        StatedFindings(tokens, decided, continued=False)(
            torch.tensor([tok(line, add_special_tokens=False)["input_ids"]]),
            torch.zeros(1, len(tok)).index_fill_(1, torch.tensor([newline]), 5.0),
        ).argmax()
        == newline
    )


def test_associated_features_follow_their_finding_on_their_own_line(local_decoder, tmp_path):
    """Every reference writes "There is associated skin thickening." on the line after its mass,
    without a side (the parser reads it on the mass's breast). Traced on the knowledge benchmark:
    the rules added it to the mass's line, then forced "of the right breast" onto Gemma's own
    next line, which went on to repeat the mass's sentence (3 reports)."""
    from mammorg.labels import FINDINGS
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    tok.add_tokens(["FINDINGS", "IMPRESSION", "associated"])  # as a tokenizer trained on more reports has them
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    assert len(tokens.associated) == 1
    vocab = tok.get_vocab()
    newline, period, impression = tok("\n", add_special_tokens=False)["input_ids"][-1], vocab["."], vocab["IMPRESSION"]
    decided = torch.zeros(1, 2, 7, dtype=torch.bool)
    decided[0, 1, FINDINGS.index("mass")] = decided[0, 1, FINDINGS.index("skin_thickening")] = True
    decided[0, 0, FINDINGS.index("calcification")] = True

    def next_token(text: str, favourite: int) -> int:
        scores = torch.zeros(1, len(tok))
        scores[0, favourite] = 5.0
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        return int(StatedFindings(tokens, decided)(ids, scores)[0].argmax())

    mass = "FINDINGS:\nThere is a 12 mm oval mass in the Right breast."  # the fixture spells "Right" whole
    assert next_token(mass, newline) == newline  # the line ends; skin thickening is not added to it
    # skin thickening on the next line, before the section ends or the other breast's line opens
    opener = tokens.associated_line_opener
    assert next_token(mass + "\n", impression) == opener[0]
    assert next_token(mass + "\n", vocab["fine pleomorphic"]) == opener[0]
    term = next_token(mass + "\n" + tok.decode(list(opener)), period)
    assert int(tokens.finding_of[term]) == FINDINGS.index("skin_thickening")
    skin = mass + "\nThere is associated skin thickening"
    assert next_token(skin, period) == period  # on the mass's breast without a side of its own
    # named: the left breast's calcification next, not skin thickening again
    opened = next_token(skin + ".\n", impression)
    assert int(tokens.opener_of[opened]) == FINDINGS.index("calcification")
    word = int(tokens.associated[0])  # traced: "There is associated nipple retraction." three times over
    assert next_token(skin + ".\n" + tok.decode(list(opener[:-1])), word) != word
    assert next_token(mass + "\n" + tok.decode(list(opener[:-1])), word) == word
    # after a line of the other breast, the sentence names its breast
    other = mass + "\nfine pleomorphic calcifications are seen in the Left breast.\nThere is associated skin thickening"
    assert next_token(other, period) == tokens.side_phrases[1][0]


def test_a_findings_section_names_each_breast_and_its_own_spellings(local_decoder, tmp_path):
    """Traced on the knowledge benchmark: in a findings section of one line per finding, a mass
    decided for both breasts was named once ("... of the right breast") and the section closed,
    and findings were placed in "the breast" (no side: the parser leaves them unsided; blocked,
    the decoder wrote "in the either breast": the side word of a breast that fits is written).
    Traced on Gemma 3: it writes its own piece for "mass" (not the bare term), which the rule
    never saw."""
    from mammorg.labels import FINDINGS
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    tok.add_tokens(["FINDINGS", "IMPRESSION"])
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    vocab = tok.get_vocab()
    mass = FINDINGS.index("mass")
    own = [i for t, i in vocab.items() if tok.convert_tokens_to_string([t]).strip() == "mass"]
    assert len(own) > 1 and all(int(tokens.finding_of[i]) == mass for i in own)
    decided = torch.zeros(1, 2, 7, dtype=torch.bool)
    decided[0, :, mass] = True  # a mass in each breast
    processor = StatedFindings(tokens, decided)

    def scored(text: str, favourite: int) -> torch.Tensor:
        scores = torch.zeros(1, len(tok))
        scores[0, favourite] = 5.0
        return processor(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]), scores)[0]

    impression = vocab["IMPRESSION"]
    section = "FINDINGS:\nThere is a 12 mm oval mass in the Right breast.\n"  # the fixture spells "Right" whole
    assert int(scored(section, impression).argmax()) == tokens.mass_line_opener[0]  # the left one's line
    left, right = tokens.sides
    breast = tok(" breast", add_special_tokens=False)["input_ids"]
    assert len(breast) == 1 and breast[0] in tokens.breast.tolist()
    out = scored(section + "There is a 9 mm round mass in the", int(right[0]))
    assert torch.isneginf(out[right]).all() and int(out.argmax()) in left.tolist()  # the breast whose mass is unnamed
    assert scored(section + "There is a 9 mm round mass in the Left breast.\n", impression).argmax() == impression
    # a heading opens a line (traced on the demo: "... diffuse in aIMPRESSION: ...")
    assert torch.isneginf(scored(section + "There is a 9 mm round mass in a", impression)[impression])
    # a line naming no breast does not end a sentence that named a finding before it names its
    # breast ("7.1" has a decimal point, not a sentence end): "in the left" (right) is written
    period = vocab["."]
    sideless = "OPINION: round mass in the lower outer quadrant at 8 o'clock, 7.1 cm from the nipple"
    phrase = tokens.side_phrases[0]  # the fixture spells " of the Left" with the side word whole
    assert phrase and int(scored(sideless, period).argmax()) == phrase[0]
    assert int(scored(sideless + tok.decode(list(phrase[:-1])), period).argmax()) in left.tolist()
    assert scored(sideless.replace("quadrant", "quadrant of the Left breast"), period).argmax() == period
    out = scored("FINDINGS:\nThere is a 12 mm oval mass in the", breast[0])
    sides = left.tolist() + right.tolist()
    assert torch.isneginf(out[breast[0]]) and int(out.argmax()) in sides  # a breast, not "the breast"
    assert scored("Right Breast: There is a mass in the", breast[0]).argmax() == breast[0]


def test_a_sentence_names_no_finding_its_breast_lacks(local_decoder, tmp_path):
    """In a line that names no breast yet, a sentence that named a finding stage 1 decided for
    one breast only names no finding of the other: where the decoder heads for one, the sentence
    names its breast instead. Traced on the knowledge benchmark: "calcifications in a 27 mm
    round equal density focal asymmetry ... of the left breast", the asymmetry decided for the
    right breast alone (a false positive on the left)."""
    from mammorg.labels import FINDINGS
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    calcification, asymmetry = FINDINGS.index("calcification"), FINDINGS.index("asymmetry")
    term = next(i for i in range(len(tok)) if int(tokens.finding_of[i]) == asymmetry)

    def scored(text: str, decided: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(1, len(tok))
        scores[0, term] = 5.0
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        return StatedFindings(tokens, decided)(ids, scores)[0]

    decided = torch.zeros(1, 2, 7, dtype=torch.bool)
    decided[0, 0, calcification] = decided[0, 1, asymmetry] = True  # L: calcifications, R: an asymmetry
    text = "OPINION: calcifications in a 27 mm round equal density"
    out = scored(text, decided)
    assert torch.isneginf(out[term])
    assert int(out.argmax()) == tokens.side_phrases[0][0]  # " of the Left": its breast
    node = FINDINGS.index("lymph_node")
    decided[0, 1, node] = True  # R: a lymph node as well
    node_term = next(i for i in range(len(tok)) if int(tokens.finding_of[i]) == node)
    after = scored("OPINION: A focal asymmetry and", decided)
    assert not torch.isneginf(after[node_term])  # the right breast's other finding
    assert torch.isneginf(after[term])  # each finding once a sentence (traced: "calcifications or calcifications")
    decided[0, 0, asymmetry] = True  # the left breast has one too
    assert int(scored(text, decided).argmax()) == term


def test_a_sentence_opens_as_its_findings_sentences_do(local_decoder, tmp_path):
    """Where the decoder heads for a blocked finding term at a sentence's opening, the finding
    stage 1 decided opens its sentence as the reports write it: a mass with its article and
    then its size ("A 7 mm ..."), a calcification with its morphology; a sentence opened as a
    mass's describes nothing else, and no sentence ends on its article. Traced on the knowledge
    benchmark: the bare term ran into lists ("Right Breast: mass, suspicious calcifications or
    o'clock, or o'clock, ...") and "A 7 mm diffuse in the right axilla."."""
    from mammorg.labels import FINDINGS
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    vocab = tok.get_vocab()
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    a = int(tokens.articles[0, 1])  # "A" on its own (after a lone word boundary)
    assert a == vocab["A"]
    mass, calcification = FINDINGS.index("mass"), FINDINGS.index("calcification")
    distortion = vocab["architectural distortion"]

    def best(text: str, favourite: int, findings: tuple[int, ...]) -> torch.Tensor:
        decided = torch.zeros(1, 2, 7, dtype=torch.bool)
        decided[0, 1, list(findings)] = True  # the right breast's
        ids = tok(text, add_special_tokens=False)["input_ids"] + [vocab["Ġ"]]
        scores = torch.zeros(1, len(tok))
        scores[0, favourite] = 5.0
        return StatedFindings(tokens, decided)(torch.tensor([ids]), scores)[0]

    assert int(best("Right Breast:", distortion, (mass,)).argmax()) == a
    number = int(best("Right Breast: A", distortion, (mass,)).argmax())
    assert number in tokens.numbers[1].tolist()  # its size, on its own after the boundary
    calc = int(best("Right Breast:", distortion, (calcification,)).argmax())
    assert int(tokens.opener_of[calc]) == calcification and int(tokens.finding_of[calc]) < 0  # a morphology term
    diffuse = vocab["diffuse"]  # a calcification's distribution: not in a mass's sentence
    assert torch.isneginf(best("Right Breast: A 7 mm", diffuse, (mass, calcification))[diffuse])
    assert not torch.isneginf(best("Right Breast: There is a", diffuse, (mass, calcification))[diffuse])
    period = vocab["."]
    ids = tok("Right Breast: A", add_special_tokens=False)["input_ids"]
    scores = torch.zeros(1, len(tok))
    scores[0, period] = 5.0
    decided = torch.zeros(1, 2, 7, dtype=torch.bool)
    decided[0, 1, mass] = True
    assert torch.isneginf(StatedFindings(tokens, decided)(torch.tensor([ids]), scores)[0, period])
    ids = tok("Breast composition: ACR A", add_special_tokens=False)["input_ids"]  # a letter, not an article
    nothing = torch.zeros(1, 2, 7, dtype=torch.bool)
    scores = torch.zeros(1, len(tok))  # the rules write into the scores they are given
    scores[0, period] = 5.0
    assert not torch.isneginf(StatedFindings(tokens, nothing)(torch.tensor([ids]), scores.clone())[0, period])
    ids = tok("Breast composition: A", add_special_tokens=False)["input_ids"]
    assert torch.isneginf(StatedFindings(tokens, nothing)(torch.tensor([ids]), scores.clone())[0, period])


def test_a_finding_sentence_states_where_stage1_located_it(local_decoder, tmp_path):
    """With ``where`` (generate.locations: stage1) the quadrant, the clock position after "at" and
    the depth of a finding's sentence are stage 1's; unknown locations, negated sentences and
    numbers elsewhere ("a 21 mm mass") stay the decoder's. Traced on the knowledge benchmark: the
    decoder wrote "upper outer quadrant at 12 o'clock, ..., middle depth" for most findings."""
    from mammorg.labels import FINDINGS
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    tok.add_tokens(["anterior", "middle", "posterior"])  # one token each, as in the benchmark's and Gemma's
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    vocab = tok.get_vocab()
    mass = FINDINGS.index("mass")
    decided = torch.zeros(2, 2, 7, dtype=torch.bool)
    decided[:, 1, mass] = True  # both exams: a mass in the right breast
    where = torch.full((2, 2, 7, 3), -1)
    where[0, 1, mass] = torch.tensor([3, 4, 2])  # exam 0: lower inner quadrant, 4 o'clock, posterior
    processor = StatedFindings(tokens, decided, where=where)

    def written(text: str, favourite: str, space: bool = False) -> list[str]:
        ids = tok(text, add_special_tokens=False)["input_ids"] + ([vocab["Ġ"]] if space else [])
        scores = torch.zeros(2, len(tok))
        (piece,) = [i for i in tok(favourite, add_special_tokens=False)["input_ids"] if i != vocab["Ġ"]]
        scores[:, piece] = 5.0
        return [tok.decode([int(i)]).strip() for i in processor(torch.tensor([ids] * 2), scores).argmax(1)]

    line = "Right Breast: There is a 21 mm round high density mass with circumscribed margins in the"
    # exam 0: stage 1's location; exam 1: stage 1 gave none, the decoder's stays
    assert written(line, "upper outer quadrant", space=True) == ["lower inner quadrant", "upper outer quadrant"]
    line += " lower inner quadrant at"
    assert written(line, " 2") == ["4", "2"]
    assert written(line, "2", space=True) == ["4", "2"]  # after a lone boundary (Gemma: " at", " ", "5")
    line += " 4"
    ids = tok(line, add_special_tokens=False)["input_ids"]
    out = processor(torch.tensor([ids] * 2), torch.zeros(2, len(tok)))
    assert torch.isneginf(out[0, tokens.digit_starts]).all()  # "4", not run on into "40"
    assert not torch.isneginf(out[1, tokens.digit_starts]).any()
    # and goes on with " o'clock" (traced: "at 10 mm o'clock", the decoder going on as after a size)
    oclock = [tok.decode([i]).strip() for i in tokens.oclock]
    assert written(line, " cm") == [oclock[0]] * 2
    line += " o'clock, 8.5 cm from the nipple,"
    assert written(line, "middle", space=True) == ["posterior", "middle"]
    assert written("Right Breast: There is a", " 2") == ["2", "2"]  # a size, not a clock position
    negated = "Right Breast: No mass in the"
    assert written(negated, "upper outer quadrant", space=True) == ["upper outer quadrant"] * 2
    # without ``where`` the decoder's own location
    free = StatedFindings(tokens, decided)
    ids = tok("Right Breast: A mass in the", add_special_tokens=False)["input_ids"] + [vocab["Ġ"]]
    scores = torch.zeros(2, len(tok))
    scores[:, vocab["upper outer quadrant"]] = 5.0
    assert (free(torch.tensor([ids] * 2), scores).argmax(1) == vocab["upper outer quadrant"]).all()


def test_a_clock_position_in_two_digits_is_written_whole(local_decoder, tmp_path):
    """A tokenizer that spells 11 as two digit tokens (Gemma and Qwen: "1", "1"; the test's BPE:
    " 1", "1") writes stage 1's 11 o'clock digit by digit, and a decoder's own 12 o'clock is not
    cut to "1 o'clock". Traced on the knowledge benchmark: Gemma 3 wrote no clock position above
    9 (68 times "1 o'clock" in 231 reports, against 15 in the references)."""
    from mammorg.labels import FINDINGS
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    eleven = tok(" 11", add_special_tokens=False)["input_ids"]
    assert len(eleven) == 2 and (tokens.clock_pairs[11] >= 0).all() and (tokens.clock_pairs[1:10] < 0).all()
    mass = FINDINGS.index("mass")
    decided = torch.zeros(2, 2, 7, dtype=torch.bool)
    decided[:, 1, mass] = True
    where = torch.full((2, 2, 7, 3), -1)
    where[0, 1, mass] = torch.tensor([1, 11, 0])  # exam 0: upper inner quadrant, 11 o'clock; exam 1: unknown
    processor = StatedFindings(tokens, decided, where=where)

    def written(text: str, favourite: str) -> list[str]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        scores = torch.zeros(2, len(tok))
        scores[:, tok(favourite, add_special_tokens=False)["input_ids"][0]] = 5.0
        return [tok.decode([int(i)]).strip() for i in processor(torch.tensor([ids] * 2), scores).argmax(1)]

    line = "Right Breast: There is a 21 mm round high density mass in the upper inner quadrant at"
    assert written(line, " 2") == ["1", "2"]  # the first digit of 11 where the decoder had " 2"
    assert written(line + " 1", " o'clock") == ["1", ""]  # then the second; exam 1 ends its 1 o'clock
    assert written(line + " 1", "2") == ["1", "2"]  # the decoder's own 12 is not cut short
    ids = tok(line + " 11", add_special_tokens=False)["input_ids"]
    out = processor(torch.tensor([ids] * 2), torch.zeros(2, len(tok)))
    assert torch.isneginf(out[0, tokens.digit_starts]).all()  # 11, not run on into 111
    assert written(line + " 11", " cm") == ["", ""]  # and on with " o'clock" (here " ", "o'clock")


def test_a_finding_left_over_follows_its_article(local_decoder, tmp_path):
    """After the article a finding left over opens with, its term follows, not a mass's size
    when the mass was named already; numbers are written in the digits 0-9. Traced on Gemma 3
    270M's reports of the knowledge benchmark: "A" opened for an asymmetry, the decoder went on
    with " 20 mm ..." and named the mass again until the token limit; "at  \u09e7 o'clock", stage
    1's 1 o'clock written with a Bengali one."""
    from mammorg.labels import FINDINGS
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    tok.add_tokens(["FINDINGS", "IMPRESSION"])  # as a tokenizer trained on more reports has them
    tok.add_tokens(["\u09e7", " \u09e7"])  # Bengali one: str.isdigit() and int() take it
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    vocab = tok.get_vocab()
    for piece in ("\u09e7", " \u09e7"):
        i = tok.convert_tokens_to_ids(piece)
        assert int(tokens.place_of[1][i]) == -1 and not tokens.digit_starts[i] and not tokens.digit_ends[i]
        assert i not in torch.cat(tokens.numbers).tolist()
    one = tok(" 1", add_special_tokens=False)["input_ids"]
    assert len(one) == 1 and int(tokens.place_of[1][one[0]]) == 1

    mass, asymmetry = FINDINGS.index("mass"), FINDINGS.index("asymmetry")
    decided = torch.zeros(1, 2, 7, dtype=torch.bool)
    decided[0, 1, [mass, asymmetry]] = True  # the right breast's
    number = tokens.numbers[0][:1].tolist()  # a size after a word boundary (" 2")
    assert number

    def next_token(text: str, extra: tuple[int, ...] = ()) -> int:
        ids = tok(text, add_special_tokens=False)["input_ids"] + list(extra)
        scores = torch.zeros(1, len(tok))
        scores[0, number[0]] = 5.0
        return int(StatedFindings(tokens, decided)(torch.tensor([ids]), scores)[0].argmax())

    # the atomic term after a lone word boundary (traced: "Afocal asymmetry" without it)
    boundary = vocab["Ġ"]
    named = "Right Breast: There is a 12 mm oval mass with circumscribed margins. A"
    assert next_token(named) == boundary
    assert int(tokens.finding_of[next_token(named, (boundary,))]) == asymmetry
    assert next_token("Right Breast: There is a 12 mm oval mass with circumscribed margins. There is a") == number[0]
    # the mass not named yet: "A 20 mm ..." may open it
    assert next_token("Right Breast: A focal asymmetry is seen. A") == number[0]
    # in a findings section of one line per finding too
    section = "FINDINGS:\nA 12 mm oval mass in the right breast.\nNo mass in the left breast.\nA"
    assert int(tokens.finding_of[next_token(section, (boundary,))]) == asymmetry
    # a sentence that opens with the article no finding left takes gets the other one (traced on
    # the tiny decoder: "A 8 mm oval ... mass" twice more where a lymph node was left)
    decided[0, 1, asymmetry] = False
    decided[0, 1, FINDINGS.index("lymph_node")] = True
    tok.add_tokens([" A", " An"])  # one token each, as in the benchmark's tokenizers (tiny and Gemma)
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    a, an = int(tokens.articles[0, 0]), int(tokens.articles[1, 0])  # " A", " An" right after a sentence's end
    assert min(a, an) >= 0
    ids = tok("Right Breast: There is a 12 mm oval mass.", add_special_tokens=False)["input_ids"]
    scores = torch.zeros(1, len(tok))
    scores[0, a] = 5.0
    assert int(StatedFindings(tokens, decided)(torch.tensor([ids]), scores.clone())[0].argmax()) == an
    ids = tok("Right Breast: There is an intramammary lymph node.", add_special_tokens=False)["input_ids"]
    assert int(StatedFindings(tokens, decided)(torch.tensor([ids]), scores.clone())[0].argmax()) == a  # mass left


def test_the_article_agrees_with_the_term_that_follows_it(local_decoder, tmp_path):
    """After an article at a sentence's opening, a finding left over is named with a term that
    takes it ("A focal asymmetry", "An asymmetry", "An intramammary lymph node", "A lymph node");
    the rules still open its sentence as the reports do ("A focal asymmetry"). Traced on Gemma 3
    270M's reports of the knowledge benchmark: "A asymmetry is recommended of the left breast."
    (19 times); the tiny decoder, after "An asymmetry", lost the report ("An asymmetryBREAST
    COMPOSITION: ...")."""
    from mammorg.labels import FINDINGS
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import ARTICLES, FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    tok.add_tokens([" A", " An"])
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    vocab = tok.get_vocab()
    expected = {
        "asymmetry": "An",
        "focal asymmetry": "A",
        "intramammary lymph node": "An",
        "axillary lymph node": "An",
        "lymph node": "A",
        "mass": "A",
        "masses": "A",
    }
    for term, article in expected.items():
        assert int(tokens.term_article[vocab[term]]) == ARTICLES.index(article), term
    assert int(tokens.term_article[vocab["asymmetries"]]) == -1  # a plural takes none
    boundary = vocab["Ġ"]

    def next_term(finding: str, text: str, heads_for: str) -> str:
        decided = torch.zeros(1, 2, 7, dtype=torch.bool)
        decided[0, 1, FINDINGS.index(finding)] = True
        ids = tok(text, add_special_tokens=False)["input_ids"] + [boundary]
        scores = torch.zeros(1, len(tok))
        scores[0, tok(text[-2:], add_special_tokens=False)["input_ids"][-1]] = 9.0  # the decoder heads elsewhere
        scores[0, vocab[heads_for]] = 5.0
        out = StatedFindings(tokens, decided)(torch.tensor([ids]), scores)
        return str(tok.convert_ids_to_tokens(int(out[0].argmax())))

    opened = "Right Breast: No mass is seen."
    took_a = ("focal asymmetry", "global asymmetry", "developing asymmetry")
    assert next_term("asymmetry", opened + " A", "asymmetry") in took_a
    assert next_term("asymmetry", opened + " An", "focal asymmetry") == "asymmetry"
    assert next_term("lymph_node", opened + " A", "intramammary lymph node") == "lymph node"
    assert next_term("lymph_node", opened + " An", "lymph node") in ("intramammary lymph node", "axillary lymph node")
    # heading for "An" with only an asymmetry left, the sentence opens as the reports open it
    a, an = int(tokens.articles[0, 0]), int(tokens.articles[1, 0])
    decided = torch.zeros(1, 2, 7, dtype=torch.bool)
    decided[0, 1, FINDINGS.index("asymmetry")] = True
    scores = torch.zeros(1, len(tok))
    scores[0, an] = 5.0
    ids = torch.tensor([tok(opened, add_special_tokens=False)["input_ids"]])
    assert int(StatedFindings(tokens, decided)(ids, scores)[0].argmax()) == a


def test_a_findings_section_names_the_breast_stage1_found_nothing_in(local_decoder, tmp_path):
    """A findings section that named one breast's findings does not end before a line denies
    findings in the other breast (every reference with findings in one breast has that line;
    Gemma 3 270M left it out in 28 of 108 reports), that line names the other breast, and once
    both breasts are named the impression follows."""
    from mammorg.labels import FINDINGS
    from stage2_sft.assembly import lexicon_of
    from stage2_sft.config import TerminologySettings
    from stage2_sft.stated_findings import FindingTokens, StatedFindings

    tok = _tokenizer(local_decoder, tmp_path)
    tok.add_tokens(
        ["FINDINGS", "IMPRESSION", "No", " left", " right"]
    )  # as tokenizers trained on more reports have them
    tokens = FindingTokens.of(tok, lexicon_of(TerminologySettings()))
    vocab = tok.get_vocab()
    assert tokens.line_denial == vocab["No"] and all(tokens.denial_side_phrases)
    decided = torch.zeros(1, 2, 7, dtype=torch.bool)
    decided[0, 1, FINDINGS.index("mass")] = True  # the right breast's mass, nothing on the left

    def next_token(text: str, heads_for: int, decided: torch.Tensor = decided) -> int:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        scores = torch.zeros(1, len(tok))
        scores[0, heads_for] = 5.0
        return int(StatedFindings(tokens, decided)(torch.tensor([ids]), scores)[0].argmax())

    section = "FINDINGS:\nA 12 mm oval mass in the upper outer quadrant of the right breast.\n"
    impression = vocab["IMPRESSION"]
    assert next_token(section, impression) == vocab["No"]
    a = tok("A", add_special_tokens=False)["input_ids"][0]
    assert next_token(section, a) == vocab["No"]  # not the mass's line again (Gemma's repeats)
    right, left = (
        tok(" right", add_special_tokens=False)["input_ids"],
        tok(" left", add_special_tokens=False)["input_ids"],
    )
    assert len(right) == len(left) == 1
    assert next_token(section + "No suspicious mass in the", right[0]) == left[0]
    period = tok(".", add_special_tokens=False)["input_ids"][0]
    denial = section + "No suspicious mass, calcifications or architectural distortion"
    assert next_token(denial, period) == tokens.denial_side_phrases[0][0]  # " in" the left breast
    # the left breast named, or a finding decided for it, or a line of the decoder's own: no rule
    assert next_token(section + "No suspicious mass in the left breast.\n", impression) == impression
    decided_both = decided.clone()
    decided_both[0, 0, FINDINGS.index("calcification")] = True
    assert next_token(section, impression, decided_both) != vocab["No"]
    assert next_token(section + "There is no mass in the", right[0]) == right[0]
    # both breasts named, every decided finding too: the impression follows (no reference's
    # findings section has another line; the demo's tiny decoder denied a mass it had named)
    decided_both[0, 0, FINDINGS.index("mass")] = True
    decided_both[0, 0, FINDINGS.index("calcification")] = False
    both_named = section + "A 9 mm oval mass in the upper outer quadrant of the left breast.\n"
    there = tok("There", add_special_tokens=False)["input_ids"][0]
    assert next_token(both_named, there, decided_both) == impression
    assert next_token(section + "No suspicious mass in the left breast.\n", there) == impression
    assert next_token(both_named[:-1] + " There", there, decided_both) == there  # not at a line start


def test_stated_findings_needs_knowledge_and_atomic_terms():
    with pytest.raises(MammorgError, match="generate.findings=stage1 states stage 1's decisions"):
        load_config("stage2/tiny", Stage2Config, ["knowledge.mode=none", "generate.assessment=plan"])
    with pytest.raises(MammorgError, match="generate.findings=stage1 needs finding terms as atomic"):
        load_config("stage2/tiny", Stage2Config, ["terminology.atomic_terms=false"])


def test_section_headings_split_into_pieces_are_still_found():
    """Gemma spells "IMPRESSION" as "IM PRESS ION": its first piece, upper case, still marks the
    heading (the section rules were silently off for Gemma); a piece of one letter, or not upper
    case, cannot tell a heading from other words."""
    from stage2_sft.stated_findings import _first_pieces

    spelling = {"IMPRESSION": [10, 11, 12], "OPINION": [20, 21], "FINDINGS": [30, 31]}
    texts = {10: "IM", 20: "Op", 30: "F"}

    class Pieces:
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": spelling[text]}

        def decode(self, ids: list[int]) -> str:
            return texts[ids[0]]

    assert _first_pieces(Pieces(), ("IMPRESSION", "OPINION")).tolist() == [10]
    assert _first_pieces(Pieces(), ("FINDINGS",)).tolist() == []
