"""The verdict's validation checkpoints (tests/test_validation.py, docs/verdict.md) judged with a preset:
``quick`` is what the test runs; ``full`` (about 24 min on 2 cores) is the check the test leaves out.

Builds the five float checkpoints of known damage from the built-in SmolLM2 in FOLDER (kept for
reruns), runs ``quantdiag diagnose --preset PRESET`` on them, and prints each verdict beside the
expected one, the seconds the diagnosis took and its exit code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from quantdiag.model.load import builtin_gguf, converted_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test's checkpoints, not a copy
from test_validation import EXPECTED, FACTS, NOISE_SCALE, RELATIONS, _early_mlps, _rounded  # noqa: E402

from conftest import save_noisy  # noqa: E402


def checkpoints(folder: Path) -> None:
    """The test's five checkpoints, made once."""
    if (folder / "rtn2").exists():
        return
    source = converted_gguf(builtin_gguf())
    save_noisy(source, folder / "tiny", 1e-3, 1)
    save_noisy(source, folder / "noise", NOISE_SCALE, 1)
    save_noisy(source, folder / "mlp01", 1.0, 1, _early_mlps)
    _rounded(source, folder / "rtn8", 8)
    _rounded(source, folder / "rtn2", 2)
    tokenizer = AutoTokenizer.from_pretrained(source)
    for name in EXPECTED:
        tokenizer.save_pretrained(folder / name)  # save_noisy writes the unit tests' tiny tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("preset", choices=("quick", "full"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    checkpoints(args.folder)
    command = [sys.executable, "-m", "quantdiag", "diagnose", "--preset", args.preset, "--relations"]
    command += [",".join(RELATIONS), "--facts", str(FACTS), "--device", "cpu", "--json", "--profile"]
    command += ["--out", str(args.folder / f"run-{args.preset}")]
    for name in EXPECTED:
        command += ["--compare", str(args.folder / name)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    print(f"exit {result.returncode}, {time.perf_counter() - start:.0f} s")
    for model in json.loads(result.stdout)["models"]:
        name, verdict = model["label"].split(" ")[0], model["verdict"]
        print(
            f"{name}: expected {EXPECTED[name]}, got {verdict['verdict']} ({verdict['confidence']}), "
            f"first damaged block {verdict['first_damaged_block']} ({verdict['damage_evidence']})"
        )


if __name__ == "__main__":
    main()
