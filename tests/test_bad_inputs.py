"""Every bad input or environment failure: exit code 2, exactly one line on stderr starting
``quantdiag: error:``, no traceback, and no file of the output folder created or changed.

Each row of ``CASES`` is one bad input: the command line (``{name}`` is a file or folder made by
the ``world`` fixture, ``{out}`` the output folder), a fragment of the expected message, what the
output folder is before the command, and an optional environment fault."""

from __future__ import annotations

import copy
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import transformers
from gguf import GGMLQuantizationType, GGUFWriter
from safetensors import SafetensorError
from typer.testing import CliRunner

from quantdiag.cli import app
from quantdiag.config import RunConfig

from conftest import tiny_model, tiny_tokenizer

#: Small enough that every case that loads the reference takes about a second.
FEW = "--relations P19 --facts 2 --preset quick --device cpu"


@dataclass(frozen=True)
class Case:
    """One bad input. ``out``: the output folder beforehand (``missing``, ``file``, ``model``: a
    Hugging Face folder, ``stale``: a folder with a stranger's files, ``run``: an earlier run's,
    ``dot``: the current folder, inside a model's folder). ``fault``: an environment failure."""

    name: str
    command: str
    fragment: str
    out: str = "missing"
    fault: str | None = None


CASES = [
    # options that are out of range or unknown
    Case("bits-outside-2-8", "run --bits 4,9", "bits must be between 2 and 8, not 9"),
    Case("bits-not-numbers", "run --bits four", "--bits must be comma-separated integers, not 'four'"),
    Case("facts-not-a-number", "run --facts many", "--facts must be a positive number or 'all', not 'many'"),
    Case("alphas-not-numbers", "run --alphas 1,x", "--alphas must be comma-separated numbers"),
    Case(
        "batch-size-not-a-number",
        "run --batch-size lots",
        "Invalid value for '--batch-size': Input should be a valid integer",
    ),
    Case("unknown-option", "run --bitz 4", "No such option: --bitz"),
    Case("unknown-preset", "run --preset huge", "unknown preset 'huge'"),
    Case("unknown-analysis", "run --analyses patching,vibes", "unknown analysis vibes"),
    Case("unknown-stream", "run --streams resid,kv", "unknown stream kv"),
    Case("unknown-relation", "run --relations P19,P9999", "unknown relation id P9999"),
    Case("unknown-method", "run --methods rtn,awq9", "unknown method awq9"),
    Case("subset-bits-missing", "run --bits 8,2", "add 4 to --bits"),
    Case("causal-bits-not-in-bits", "run --bits 4,2 --causal-bits 3", "--causal-bits 3 not among --bits"),
    Case(
        "unknown-device",
        f"run --model {{ref}} --methods rtn --bits 4 {FEW} --device tpu",
        "device must be cpu, cuda or auto",
    ),
    Case("unknown-dtype", f"run --model {{ref}} --methods rtn --bits 4 {FEW} --dtype float8", "dtype must be auto"),
    # facts files
    Case(
        "facts-file-malformed",
        "run --facts-file {broken_facts}",
        "need JSON: an object with subject, object and template",
    ),
    Case("facts-file-empty", "run --facts-file {empty_facts}", "is empty"),
    Case("facts-file-missing", "run --facts-file {missing}", "facts file not found"),
    # the output folder
    Case("out-unwritable", "run", "is not writable", fault="no-access"),
    Case("out-is-a-file", "run", "exists and is not a folder", out="file"),
    Case("out-is-a-model-folder", "run", "holds config.json (not a quantdiag run's), model.safetensors", out="model"),
    Case(
        "out-is-dot-in-a-model-folder",
        "run --out .",
        "output folder . holds config.json (not a quantdiag run's)",
        out="dot",
    ),
    Case("out-holds-stale-files", "run", "holds notes.txt: not a quantdiag run", out="stale"),
    Case("bad-option-on-an-earlier-run", "run --bits 4,9", "between 2 and 8", out="run"),
    # the reference model
    Case("model-not-found", "run --model {missing}", "model not found"),
    Case("model-gguf-bad-magic", "run --model {fake_gguf} --methods rtn", "is not a GGUF file (bad magic bytes)"),
    Case(
        "model-gguf-unsupported",
        "run --model {gpt2_gguf} --methods rtn --bits 4",
        "architecture 'gpt2' is not supported",
    ),
    Case(
        "model-config-unsupported", "run --model {gpt2} --methods rtn --bits 4", "architecture 'gpt2' is not supported"
    ),
    Case("model-config-malformed", "run --model {bad_json} --methods rtn --bits 4", "config.json is not valid JSON"),
    Case("model-is-gptq", "run --model {gptq} --methods rtn --bits 4", "is a GPTQ checkpoint: the reference"),
    Case("reference-is-awq", "diagnose --reference {awq} --compare {ref}", "is a AWQ checkpoint"),
    # checkpoints to compare
    Case("diagnose-without-compare", "diagnose", "Missing option '--compare'"),
    Case("compare-not-found", "diagnose --reference {ref} --compare {missing}", "checkpoint not found"),
    Case("compare-text-file", "diagnose --reference {ref} --compare {notes}", "is a file but not .gguf"),
    Case(
        "compare-gguf-bad-magic",
        "diagnose --reference {ref} --compare {fake_gguf}",
        "is not a GGUF file (bad magic bytes)",
    ),
    Case(
        "compare-gguf-unsupported",
        "diagnose --reference {ref} --compare {gpt2_gguf}",
        "architecture 'gpt2' is not supported",
    ),
    Case(
        "compare-config-malformed", "diagnose --reference {ref} --compare {bad_json}", "config.json is not valid JSON"
    ),
    Case("compare-no-bits", "diagnose --reference {ref} --compare {no_bits}", "its quantization_config has no bits"),
    Case("compare-bits-9", "diagnose --reference {ref} --compare {gptq_9}", "gives 9 bits, not an integer 2..8"),
    Case(
        "compare-other-architecture",
        f"diagnose --reference {{ref}} --compare {{qwen2}} {FEW}",
        "model_type is qwen2, the reference's is llama",
    ),
    Case(
        "compare-other-shape",
        f"diagnose --reference {{ref}} --compare {{wider}} {FEW}",
        "has shape (96, 64), the reference's is (128, 64)",
    ),
    Case(
        "compare-other-tokenizer",
        f"diagnose --reference {{ref}} --compare {{retokenized}} {FEW}",
        "different tokenizer",
    ),
    # the environment
    Case(
        "disk-full",
        f"run --model {{ref}} --methods rtn --bits 4 {FEW} --analyses none",
        "config.json: No space left on device",
        fault="disk-full",
    ),
    Case(
        "disk-full-writing-weights",
        f"run --model {{ref}} --methods rtn --bits 4 {FEW} --analyses none",
        "No space left on device",
        fault="weights-disk-full",
    ),
    Case(
        "disk-full-on-an-earlier-run",
        f"run --model {{ref}} --methods rtn --bits 4 {FEW} --analyses none",
        "config.json: Disk quota exceeded",
        out="run",
        fault="quota",
    ),
]


def _gguf(path: Path, architecture: str) -> Path:
    """A GGUF file of ``architecture`` with one Q8_0-sized tensor (its bytes are not a model)."""
    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 34), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _save(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return folder


def _config_only(folder: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The files and folders the commands name: a tiny Llama reference and checkpoints that do
    not fit it, quantized configs, GGUF files, facts files."""
    root = tmp_path_factory.mktemp("world")
    reference = tiny_model("llama").model
    config = reference.config.to_dict()
    wider = transformers.LlamaConfig.from_dict({**config, "intermediate_size": 96})
    retokenizer = copy.deepcopy(tiny_tokenizer())  # the cached one is shared (and grown by other tests)
    retokenizer.add_tokens(["qqqq-bad-inputs"])
    (root / "notes.txt").write_text("hello")
    (root / "fake.gguf").write_bytes(b"NOPE" + bytes(100))
    (root / "broken.jsonl").write_text("{broken\n")
    (root / "empty.jsonl").write_text("")
    (root / "bad-json").mkdir()
    (root / "bad-json" / "config.json").write_text("{not json")
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    return {
        "ref": _save(reference, root / "ref"),
        "qwen2": _save(tiny_model("qwen2").model, root / "qwen2"),
        "wider": _save(transformers.AutoModelForCausalLM.from_config(wider), root / "wider"),
        "retokenized": _save(reference, root / "retokenized", retokenizer),
        "gptq": _config_only(root / "gptq", {**config, "quantization_config": gptq}),
        "gptq_9": _config_only(root / "gptq-9", {**config, "quantization_config": {**gptq, "bits": 9}}),
        "no_bits": _config_only(
            root / "no-bits", {**config, "quantization_config": {"quant_method": "gptq", "group_size": 32}}
        ),
        "awq": _config_only(root / "awq", {**config, "quantization_config": {"quant_method": "awq", "bits": 4}}),
        "gpt2": _config_only(root / "gpt2", transformers.GPT2Config(n_layer=2).to_dict()),
        "bad_json": root / "bad-json",
        "gpt2_gguf": _gguf(root / "gpt2.gguf", "gpt2"),
        "fake_gguf": root / "fake.gguf",
        "notes": root / "notes.txt",
        "broken_facts": root / "broken.jsonl",
        "empty_facts": root / "empty.jsonl",
        "missing": root / "no" / "such" / "thing",
    }


@pytest.fixture(autouse=True)
def quiet_loading():
    """transformers' weight-loading bar is progress on stderr, not a message: kept out of the count."""
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


def _prepare_out(kind: str, out: Path) -> None:
    """Make the output folder ``kind`` describes (see :class:`Case`)."""
    if kind == "file":
        out.write_text("not a folder")
    elif kind in ("model", "dot"):
        out.mkdir()
        (out / "config.json").write_text(json.dumps(transformers.LlamaConfig().to_dict()))
        (out / "model.safetensors").write_bytes(b"weights")
    elif kind == "stale":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif kind == "run":
        for folder in ("figures", "stages"):
            (out / folder).mkdir(parents=True)
        (out / "config.json").write_text(json.dumps(RunConfig(out=str(out)).to_json()))
        (out / "results.json").write_text("{}")
        (out / "stages" / "eval-reference-0.npz").write_bytes(b"arrays")


def _snapshot(out: Path) -> dict[str, tuple[int, bytes] | None]:
    """Every file under ``out`` (or ``out`` itself) with its mtime and bytes; folders by name."""
    paths = [out, *out.rglob("*")] if out.is_dir() else [out] if out.exists() else []
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else None for p in paths}


def _fault(kind: str, out: Path, monkeypatch) -> None:
    """``no-access``: the permission check says no (root may write anywhere); ``disk-full`` and
    ``quota``: every write of text under ``out`` fails as write() does, naming no file;
    ``weights-disk-full``: safetensors fails writing the quantized weights to the cache."""
    if kind == "no-access":
        monkeypatch.setattr("quantdiag.resolve.os.access", lambda path, mode: False)
        return
    if kind == "weights-disk-full":

        def full(*args):  # safetensors' own error, as its writer raises it
            raise SafetensorError("I/O error: No space left on device (os error 28)")

        monkeypatch.setattr("quantdiag.quant.bank.save_file", full)
        return
    code = errno.ENOSPC if kind == "disk-full" else errno.EDQUOT
    write_text = Path.write_text

    def failing(path: Path, *args, **kwargs):
        if path.resolve().is_relative_to(out.resolve()):
            raise OSError(code, os.strerror(code))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_input_is_one_line_and_exit_2_with_nothing_written(case, world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _prepare_out(case.out, out)
    if case.out == "dot":
        monkeypatch.chdir(out)
    if case.fault:
        _fault(case.fault, out, monkeypatch)
    args = case.command.format(**{name: str(path) for name, path in world.items()}).split()
    if "--out" not in args:
        args += ["--out", str(out)]
    before = _snapshot(out)
    result = CliRunner().invoke(app, args)

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("quantdiag: error:"), result.stderr
    assert case.fragment in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr
    assert _snapshot(out) == before
