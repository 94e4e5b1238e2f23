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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test's checkpoints, not a copy
from test_validation import EXPECTED, diagnose_args, make_checkpoints  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("preset", choices=("quick", "full"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    if not (args.folder / "rtn2").exists():  # made once, kept for reruns
        make_checkpoints(args.folder)
    out = args.folder / f"run-{args.preset}"
    command = [sys.executable, "-m", "quantdiag", *diagnose_args(args.folder, args.preset, out), "--profile"]
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
