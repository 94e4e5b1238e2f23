"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

import json
import re
import subprocess
import sys
from dataclasses import fields

import pytest
from typer.testing import CliRunner

from quantdiag import pipeline
from quantdiag.analysis.patching import KIND_SITES
from quantdiag.cli import app
from quantdiag.config import KINDS, RunConfig
from quantdiag.data.facts import load_pararel
from quantdiag.errors import QuantdiagError
from quantdiag.resolve import check_writable

from conftest import save_model


def _run(args: list[str]):
    return CliRunner().invoke(app, ["run", *args])


def _assert_user_error(result, out_dir, fragment: str):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quantdiag: error:"), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--bits", "4,9"], "between 2 and 8"),
        (["--bits", "four"], "integers"),
        (["--facts", "many"], "'all'"),
        (["--facts", "0"], "facts-per-relation must be positive"),
        (["--group-size", "0"], "group size"),
        (["--methods", "rtn,awq9"], "unknown method"),
        (["--relations", "P19,P9999"], "P9999"),
        (["--preset", "huge"], "unknown preset"),
        (["--bits", "8,2"], "add 4 to --bits"),
        (["--model", "./no/such/model"], "model not found"),
        (["--device", "tpu"], "device"),
        (["--analyses", "patching,vibes"], "unknown analysis"),
        (["--streams", "resid,kv"], "unknown stream"),
        (["--bits", "4,2", "--causal-bits", "3"], "not among --bits"),
        (["--patch-prompts", "0"], "patch-prompts must be positive"),
        (["--window", "0"], "window must be positive"),
    ],
)
def test_bad_options(tmp_path, args, fragment):
    out = tmp_path / "run"
    _assert_user_error(_run([*args, "--out", str(out)]), out, fragment)


@pytest.mark.parametrize(("content", "fragment"), [("", "empty"), ("{broken\n", "need JSON")])
def test_bad_facts_file(tmp_path, content, fragment):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(content)
    out = tmp_path / "run"
    _assert_user_error(_run(["--facts-file", str(facts), "--out", str(out)]), out, fragment)


def test_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    out = tmp_path / "run"
    _assert_user_error(_run(["--model", str(fake), "--methods", "rtn", "--out", str(out)]), out, "not a GGUF file")


def test_unwritable_output_dir(tmp_path, monkeypatch):
    """Root may write anywhere, so the permission check itself is made to say no."""
    monkeypatch.setattr("quantdiag.resolve.os.access", lambda path, mode: False)
    out = tmp_path / "locked" / "run"
    _assert_user_error(_run(["--out", str(out)]), out, "not writable")


def test_output_path_that_is_a_file(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = _run(["--out", str(target)])
    assert result.exit_code == 2 and "not a folder" in result.stderr


def test_patch_needs_a_run_directory(tmp_path):
    result = CliRunner().invoke(app, ["patch", str(tmp_path)])
    assert result.exit_code == 2 and "not a quantdiag run directory" in result.stderr
    assert "Traceback" not in result.output


def test_a_saved_config_round_trips():
    config = RunConfig(bits=(4, 2), relations=("P19",), analyses=("ablation",), streams=("resid",))
    assert RunConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def _run_folder(out):
    """What a finished run leaves, plus a temporary file of a write a killed run left behind."""
    for folder in ("figures", "stages"):
        (out / folder).mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(RunConfig(out=str(out)).to_json()))
    for name in ("results.json", "report.html", "arrays.npz", "stages/eval-reference-0.npz", ".results.json.x1y2.tmp"):
        (out / name).write_text("{}")
    return out


def test_out_may_be_a_run_folder_and_nothing_else_unless_forced(tmp_path):
    out = _run_folder(tmp_path / "run")
    check_writable(out)
    (out / "notes.txt").write_text("mine")
    refusal = r"holds notes.txt: not a quantdiag run; choose another --out, or pass --force$"
    with pytest.raises(QuantdiagError, match=refusal):
        check_writable(out)
    check_writable(out, force=True)


@pytest.mark.parametrize(
    ("config", "shown"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "config.json (not a quantdiag run's)"),
        ("{broken", "config.json (not a quantdiag run's)"),
        ({**RunConfig().to_json(), "extra": 1}, "config.json (not a quantdiag run's)"),
        ({}, "config.json (not a quantdiag run's)"),
        ({"seed": 1}, "config.json (not a quantdiag run's)"),
    ],
    ids=["model-config", "not-json", "unknown-option", "empty", "one-field"],
)
def test_a_config_json_that_is_not_a_run_config_is_refused(tmp_path, config, shown):
    """Without a run's config.json nothing in the folder is a run's: its run-named files neither."""
    out = _run_folder(tmp_path / "run")
    (out / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(QuantdiagError, match=re.escape(f"holds arrays.npz, {shown}, figures/ and 3 more:")):
        check_writable(out)


def test_run_named_files_without_a_run_config_are_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / ".report.html.1@host.ab.tmp").write_text("")
    with pytest.raises(QuantdiagError, match=re.escape("holds results.json:")):
        check_writable(out)


def test_a_folder_named_like_a_run_file_is_refused(tmp_path):
    """figures/ and stages/ must be folders, the run's files files."""
    out = tmp_path / "run"
    (out / "report.html").mkdir(parents=True)
    (out / "stages").write_text("x")
    with pytest.raises(QuantdiagError, match=re.escape("holds report.html/, stages:")):
        check_writable(out)


def test_a_real_run_folder_is_accepted_again_and_force_writes_beside_a_strangers_files(tmp_path, llama):
    """The files a run writes are the ones its rerun accepts; --force keeps what was there."""
    save_model(llama, tmp_path / "ref")
    out = tmp_path / "run"
    args = ["--model", str(tmp_path / "ref"), "--methods", "rtn", "--bits", "4", "--relations", "P19", "--facts", "2"]
    args += ["--preset", "quick", "--analyses", "none", "--device", "cpu", "--out", str(out)]
    assert _run(args).exit_code == 0
    check_writable(out)
    (out / "notes.txt").write_text("mine")
    refused = _run(args)
    assert refused.exit_code == 2 and "holds notes.txt" in refused.stderr
    forced = _run([*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.html").is_file()


def _captured(monkeypatch, target: str, args: list[str]) -> tuple:
    """The arguments ``quantdiag ARGS`` hands to the library call ``target`` (stopped there)."""
    calls = []

    def stop(*given, **keywords):
        calls.append((given, keywords))
        raise QuantdiagError("stopped")

    monkeypatch.setattr(target, stop)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "stopped" in result.stderr, result.output
    (call,) = calls
    return call


def test_run_without_options_is_the_default_run_config(monkeypatch):
    """The command line's defaults are RunConfig's, field for field."""
    (config,), _ = _captured(monkeypatch, "quantdiag.pipeline.run", ["run"])
    assert config == RunConfig()


def test_diagnose_without_options_is_the_default_run_config_of_its_checkpoints(monkeypatch):
    (config,), _ = _captured(monkeypatch, "quantdiag.diagnose.run", ["diagnose", "--compare", "a", "--compare", "b"])
    assert config == RunConfig(out="runs/diagnose", methods=(), bits=(), compare=("a", "b"))


def test_options_fill_their_fields(monkeypatch):
    """Comma lists, 'all', 'none', the renamed options (--asym, --budget, --rank) and flags."""
    args = ["run", "--bits", "4, 2", "--alphas", "1,2.5", "--facts", "all", "--analyses", "none", "--asym"]
    args += ["--budget", "3", "--rank", "8", "--relations", "P19,P17", "--streams", "mlp", "--trust-remote-code"]
    (config,), _ = _captured(monkeypatch, "quantdiag.pipeline.run", args)
    expected = RunConfig(
        bits=(4, 2),
        alphas=(1.0, 2.5),
        all_facts=True,
        analyses=(),
        sym=False,
        kurtosis_budget=3.0,
        eora_rank=8,
        relations=("P19", "P17"),
        streams=("mlp",),
        trust_remote_code=True,
    )
    assert config == expected
    (config,), _ = _captured(monkeypatch, "quantdiag.pipeline.run", ["run", "--facts", "7"])
    assert (config.facts_per_relation, config.all_facts) == (7, False)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["patch"],
            {
                "analyses": ("patching", "ablation"),
                "patch_prompts": None,
                "causal_bits": None,
                "streams": None,
                "window": None,
            },
        ),
        (
            ["patch", "--analyses", "ablation", "--streams", "attn,mlp", "--window", "3"],
            {
                "analyses": ("ablation",),
                "patch_prompts": None,
                "causal_bits": None,
                "streams": ("attn", "mlp"),
                "window": 3,
            },
        ),
        (
            ["sensitivity", "--sensitivity-bits", "2"],
            {"analyses": ("sensitivity",), "sensitivity_bits": (2,), "sweeps": "full"},  # maps every block
        ),
        (
            ["repair", "--budget", "3.5", "--alphas", "1,2", "--rank", "4"],
            {
                "analyses": ("repairs",),
                "repair_bits": None,
                "repairs": ("eora", "early", "kurtosis", "early+amplify", "early+eora"),  # every repair
                "protect_blocks": None,
                "kurtosis_budget": 3.5,
                "alphas": (1.0, 2.0),
                "eora_rank": 4,
            },
        ),
    ],
    ids=["patch-defaults", "patch", "sensitivity", "repair"],
)
def test_reruns_change_only_what_is_given(monkeypatch, tmp_path, args, expected):
    """``None``: keep the run's value."""
    given, keywords = _captured(monkeypatch, "quantdiag.pipeline.rerun", [args[0], str(tmp_path), *args[1:]])
    assert given == (tmp_path,) and keywords == expected


def _help(command: str) -> str:
    """``quantdiag COMMAND --help`` as one line: rich's box and wrapping removed."""
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


OFFERED = {
    "diagnose": [
        "compare",
        "reference",
        "facts",
        "facts_file",
        "relations",
        "calib",
        "calib_samples",
        "calib_length",
        "out",
        "device",
        "dtype",
        "preset",
        "batch_size",
        "seed",
        "trust_remote_code",
        "analyses",
        "force",
        "profile",
    ],
    "patch": ["analyses", "patch_prompts", "causal_bits", "streams", "window"],
    "sensitivity": ["sensitivity_bits", "sweeps"],
    "repair": ["repair_bits", "repairs", "protect_blocks", "budget", "alphas", "rank"],
}


def test_run_help_lists_every_declared_option_with_its_help():
    """Every RunConfig field with a help text is an option of ``run`` (but --compare, diagnose's)."""
    declared = [f for f in fields(RunConfig) if "help" in f.metadata and f.name != "compare"]
    shown = _help("run")
    for field in declared:
        flag = _flag(field.metadata["name"] or field.name)
        assert f"{flag} " in shown and field.metadata["help"] in shown, flag
    assert len(set(re.findall(r"(--[a-z-]+) <", shown))) == len(declared) + 1  # and --help


@pytest.mark.parametrize("command", list(OFFERED))
def test_help_lists_every_option_of_the_command(command):
    shown = _help(command)
    assert sorted(set(re.findall(r"(--[a-z-]+) <", shown))) == sorted(
        [*map(_flag, OFFERED[command]), "--help", *(["--json"] if command == "diagnose" else [])]
    )


def test_the_streams_are_those_patching_writes():
    assert KINDS == tuple(KIND_SITES)


def test_the_command_line_and_the_config_load_no_torch():
    """``quantdiag --help`` stays fast: neither the command line nor the config imports torch."""
    code = "import sys, quantdiag.cli, quantdiag.config; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_run_reads_its_facts_once(monkeypatch, tmp_path):
    """The facts the resolving step loaded are the ones the prompts are built from."""
    reads, built = [], []
    monkeypatch.setattr("quantdiag.resolve.load_pararel", lambda *given: reads.append(given) or load_pararel(*given))
    monkeypatch.setattr("quantdiag.pipeline.load_reference", lambda *given: None)

    def build_prompts(loaded, facts, config, probe):
        built.append(facts)
        raise QuantdiagError("stopped")

    monkeypatch.setattr("quantdiag.pipeline.build_prompts", build_prompts)
    with pytest.raises(QuantdiagError, match="stopped"):
        pipeline.run(RunConfig(methods=("rtn",), relations=("P19",), facts_per_relation=3, out=str(tmp_path / "run")))
    assert reads == [(["P19"], 3, 0)]
    assert [fact.relation for fact in built[0]] == ["P19"] * 3


def test_a_failed_run_removes_its_folder_and_only_the_empty_parents_made_for_it(tmp_path, monkeypatch):
    """A neighbour written meanwhile into a parent made for ``--out`` stays."""
    from quantdiag import cli

    out, neighbour = tmp_path / "runs" / "mine", tmp_path / "runs" / "theirs"

    def failing_run():
        out.mkdir(parents=True)
        neighbour.mkdir()
        raise QuantdiagError("late")

    with pytest.raises(cli.typer.Exit):
        cli._guard(failing_run, out)
    assert not out.exists() and neighbour.is_dir()


def test_a_bug_leaves_the_run_folder_as_it_is(tmp_path):
    """An error that is not the user's stays a traceback, and what the run wrote stays to look at."""
    from quantdiag import cli

    out = tmp_path / "run"

    def buggy_run():
        out.mkdir()
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        cli._guard(buggy_run, out)
    assert out.is_dir()
