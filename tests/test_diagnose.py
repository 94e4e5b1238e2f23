"""``quantdiag diagnose`` on tiny models: noisy float checkpoints get the verdicts their damage
calls for, GPTQ (written by GPTQModel) and AWQ checkpoints are dequantized exactly, and a
checkpoint that does not fit the reference is a one-line error."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from quantdiag.analysis.forward import score_prompts
from quantdiag.cli import app
from quantdiag.config import RunConfig
from quantdiag.data.facts import load_pararel, target_token, tokenize
from quantdiag.diagnose import diagnose
from quantdiag.errors import QuantdiagError
from quantdiag.model.load import load_reference
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.checkpoint import inspect_checkpoint
from quantdiag.quant.spec import PrecisionPlan

from conftest import answer_in_words, save_noisy, tiny_model, tiny_tokenizer

GROUP = 32


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny Llama that knows its facts: its head only writes words that start with a space,
    and the facts file's objects are its own answers (so it scores 100%)."""
    folder = tmp_path_factory.mktemp("diagnose")
    loaded = tiny_model("llama")
    tokenizer = loaded.tokenizer
    answer_in_words(loaded)
    facts = load_pararel(["P19", "P36", "P37", "P103", "P106"], 30, 0)
    prompts = [tokenize(tokenizer, fact, i) for i, fact in enumerate(facts)]
    rows = []
    for fact, prompt, answer in zip(facts, prompts, score_prompts(loaded, prompts, 16).predicted):
        word = tokenizer.decode([int(answer)]).strip()
        if word and target_token(tokenizer, fact.text, list(prompt.ids), word) == int(answer):
            rows.append({"subject": fact.subject, "object": word, "template": fact.template, "relation": fact.relation})
    (folder / "facts.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    loaded.model.save_pretrained(folder / "reference")
    tokenizer.save_pretrained(folder / "reference")
    return folder


def _noisy(reference, name: str, scale: float, chosen) -> str:
    """A float checkpoint: the reference plus Gaussian noise of ``scale`` times each chosen
    weight's standard deviation."""
    save_noisy(reference / "reference", reference / name, scale, 1, chosen)
    return str(reference / name)


def _config(reference, tmp_path, *compare: str) -> RunConfig:
    return RunConfig(
        out=str(tmp_path / "run"),
        model=str(reference / "reference"),
        methods=(),
        bits=(),
        compare=compare,
        preset="quick",
        facts_file=str(reference / "facts.jsonl"),
        device="cpu",
    )


def test_small_noise_everywhere_is_healthy(reference, tmp_path):
    """Noise of 2% of each block weight's spread keeps 97% of the answers (measured: 0.967, the
    line is 0.9) and no signal or mechanism signature near its line (CKA 0.9997, sign flips 1.0%,
    value cosine 0.999): the mechanism is intact, Healthy, exit code 0."""
    checkpoint = _noisy(reference, "small", 0.02, lambda name: "layers" in name)
    diagnosis = diagnose(_config(reference, tmp_path, checkpoint))
    verdict = diagnosis.models[0]["verdict"]
    assert verdict["verdict"] == "healthy", verdict
    votes = {row["name"]: row["vote"] for row in verdict["signatures"]}
    # The quick preset's one repair, early protection, recovers none of the few answers that noise in every
    # block flipped (measured 0%): it cannot, and it does not change Healthy.
    assert votes.pop("repairs") == "collapse"
    assert list(votes.values()) == ["intact"] * 9
    assert diagnosis.exit_code == 0
    assert 'class="card healthy"' in diagnosis.report.read_text()


def test_large_noise_in_the_first_mlps_is_collapse(reference, tmp_path):
    """Through the command line with --json: stdout is the JSON alone, the exit code 4."""
    checkpoint = _noisy(reference, "large", 10.0, lambda name: "mlp" in name and name.split(".")[2] in ("0", "1"))
    result = CliRunner().invoke(
        app,
        [
            "diagnose",
            "--reference",
            str(reference / "reference"),
            "--compare",
            checkpoint,
            "--preset",
            "quick",
            "--facts-file",
            str(reference / "facts.jsonl"),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 4, result.output
    verdict = json.loads(result.stdout)["models"][0]["verdict"]
    assert verdict["verdict"] == "collapse" and verdict["retention"] < 0.5
    votes = {row["name"]: row["vote"] for row in verdict["signatures"]}
    assert votes["cka_diagonal"] == votes["value_cosine"] == "collapse"
    assert "Computation Collapse" in (tmp_path / "run" / "report.html").read_text()


def _gptq(reference, bits: int):
    """The reference quantized to ``bits`` and saved by GPTQModel itself."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(
        str(reference / "reference"),
        QuantizeConfig(bits=bits, group_size=GROUP, desc_act=False, sym=True),
        device="cpu",
    )
    text = tiny_tokenizer()("The capital of France is Paris. " * 8)["input_ids"]
    with contextlib.chdir(reference):  # GPTQModel writes its quantization log to ./logs
        model.quantize([{"input_ids": text, "attention_mask": [1] * len(text)} for _ in range(8)], batch_size=1)
    model.save(str(reference / f"gptq{bits}"))
    return reference / f"gptq{bits}"


@pytest.fixture(scope="module")
def gptq_checkpoint(reference):
    return _gptq(reference, 4)


def test_a_gptqmodel_checkpoint_is_dequantized_onto_its_grid(reference, gptq_checkpoint):
    """Each group of 32 inputs of an output row takes at most 16 values, and the weights stay
    close to the reference's (a wrong unpacking is neither)."""
    loaded = load_reference(str(reference / "reference"), device="cpu")
    bank = WeightBank(loaded)
    spec = inspect_checkpoint(str(gptq_checkpoint))
    assert (spec.kind, spec.bits) == ("gptq", 4)
    original = {name: module.weight.clone() for name, module in bank.modules.items()}
    bank.ensure(spec)
    bank.apply(PrecisionPlan.uniform(spec))
    for name, module in bank.modules.items():
        weight = module.weight
        groups = weight.reshape(weight.shape[0], -1, GROUP)
        assert max(len(torch.unique(group)) for group in groups.reshape(-1, GROUP)) <= 16, name
        assert (weight - original[name]).abs().mean() < 0.25 * original[name].abs().mean(), name
        assert not torch.equal(weight, original[name])


def test_diagnose_reads_an_8_bit_gptq_checkpoint_as_healthy(reference, tmp_path):
    """8-bit GPTQ (256 levels a group of 32 weights) on a reference that knows every fact keeps
    them (measured: retention 1.0, the line is 0.9; CKA 0.99998, sign flips 0.3%, Jaccard 0.99):
    Healthy with every vote intact, exit code 0. (At 4 bits the tiny model keeps exactly 90%, the
    Healthy line itself, so that verdict is not determined.)"""
    diagnosis = diagnose(_config(reference, tmp_path, str(_gptq(reference, 8))))
    model = diagnosis.models[0]
    assert model["label"] == "gptq8 (GPTQ 8-bit)"
    assert model["verdict"]["verdict"] == "healthy", model["verdict"]
    assert [row["vote"] for row in model["verdict"]["signatures"]] == ["intact"] * 9
    assert diagnosis.exit_code == 0


def _awq_checkpoint(reference, folder, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """An AWQ folder of random 4-bit codes for every linear of ``shapes``, packed with
    GPTQModel's AWQ packer; returns the weights it stands for, (code - zero) x scale."""
    from gptqmodel.quantization.awq.utils.packing_utils import pack_awq

    generator = torch.Generator().manual_seed(0)
    tensors, expected = {}, {}
    for name, (out_features, in_features) in shapes.items():
        codes = torch.randint(0, 16, (in_features, out_features), generator=generator)
        zeros = torch.randint(0, 16, (in_features // GROUP, out_features), generator=generator)
        scales = (torch.rand(in_features // GROUP, out_features, generator=generator) / 100).half()
        qweight, qzeros = pack_awq(codes, zeros, 4)
        tensors |= {f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales}
        rows = torch.arange(in_features) // GROUP
        expected[name] = ((codes - zeros[rows]) * scales[rows].float()).T
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((reference / "reference" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": GROUP,
        "version": "gemm",
        "zero_point": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return expected


def test_an_awq_checkpoint_is_dequantized_exactly(reference, tmp_path):
    bank = WeightBank(load_reference(str(reference / "reference"), device="cpu"))
    expected = _awq_checkpoint(reference, tmp_path / "awq", bank.shapes)
    spec = inspect_checkpoint(str(tmp_path / "awq"))
    bank.ensure(spec)
    bank.apply(PrecisionPlan.uniform(spec))
    for name, module in bank.modules.items():
        torch.testing.assert_close(module.weight, expected[name], rtol=1e-3, atol=1e-5)


def _checkpoint_error(reference, folder) -> str:
    loaded = load_reference(str(reference / "reference"), device="cpu")
    with pytest.raises(QuantdiagError) as error:
        WeightBank(loaded).ensure(inspect_checkpoint(str(folder)))
    return str(error.value)


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(reference, tmp_path):
    shallower = tiny_model("llama", layers=3).model
    shallower.save_pretrained(tmp_path / "shallower")
    assert "num_hidden_layers is 3, the reference's is 4" in _checkpoint_error(reference, tmp_path / "shallower")

    config = json.loads((reference / "reference" / "config.json").read_text())
    wider = AutoModelForCausalLM.from_config(type(shallower.config).from_dict({**config, "intermediate_size": 96}))
    wider.save_pretrained(tmp_path / "wider")
    assert "has shape (96, 64), the reference's is (128, 64)" in _checkpoint_error(reference, tmp_path / "wider")

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["zzzz"])
    model = AutoModelForCausalLM.from_pretrained(reference / "reference")
    model.save_pretrained(tmp_path / "retokenized")
    tokenizer.save_pretrained(tmp_path / "retokenized")
    assert "different tokenizer" in _checkpoint_error(reference, tmp_path / "retokenized")

    bank = WeightBank(load_reference(str(reference / "reference"), device="cpu"))
    shapes = bank.shapes | {"model.layers.0.mlp.down_proj": (64, 96)}
    _awq_checkpoint(reference, tmp_path / "awq-wider", shapes)
    assert "down_proj has scales of shape (3, 64), the reference's layer needs (4, 64)" in _checkpoint_error(
        reference, tmp_path / "awq-wider"
    )


@pytest.mark.parametrize(
    ("compare", "fragment"),
    [("missing", "checkpoint not found"), ("notes.txt", "not .gguf"), ("empty", "no config.json")],
)
def test_bad_checkpoint_paths_exit_2_with_one_line(reference, tmp_path, compare, fragment):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    args = [
        "diagnose",
        "--reference",
        str(reference / "reference"),
        "--compare",
        str(tmp_path / compare),
        "--out",
        str(tmp_path / "run"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and fragment in result.output and len(result.output.strip().splitlines()) == 1, (
        result.output
    )


def test_a_checkpoint_rewritten_with_the_same_size_and_time_is_another_version(tmp_path):
    """``cp -p`` of another checkpoint keeps names, sizes and times: the version hashes contents."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    first = inspect_checkpoint.__wrapped__(str(folder)).version
    stat = weights.stat()
    weights.write_bytes(b"b" * 64)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert inspect_checkpoint.__wrapped__(str(folder)).version != first
