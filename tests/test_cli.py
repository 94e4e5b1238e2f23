"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

import json

import pytest
from typer.testing import CliRunner

from quantdiag.cli import app
from quantdiag.config import RunConfig


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
    monkeypatch.setattr("quantdiag.config.os.access", lambda path, mode: False)
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
