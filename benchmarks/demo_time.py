"""How long a first diagnosis takes: the demo's configuration (``make demo``), the quick preset or
the full preset, from an empty cache (a temporary ``QUANTDIAG_CACHE``: GGUF conversion, calibration
text and quantization included), profiled with ``--profile``.

Prints each stage kind's wall time (computed and read from caches), then the goal, and as its last
line ``total: <seconds> s``: the wall time of the whole command, start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantdiag.report.profile import stage_totals

ROOT = Path(__file__).resolve().parents[1]
#: Wall-time goals in seconds on 2 CPU cores (issue 16).
GOALS = {"demo": 15 * 60, "quick": 3 * 60, "full": 30 * 60}
QUANTDIAG = [sys.executable, "-m", "quantdiag", "run", "--model", "smollm2", "--profile"]


def command(preset: str, out: Path) -> list[str]:
    """The command of ``preset``: ``make demo`` itself (its options are the Makefile's), or ``quantdiag run``."""
    if preset == "demo":
        return ["make", "-C", str(ROOT), "demo", f"DEMO_OUT={out}", "DEMO_FLAGS=--profile"]
    streams = ["--streams", "resid,mlp,attn"] if preset == "full" else []
    return [*QUANTDIAG, "--preset", preset, *streams, "--out", str(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("preset", nargs="?", choices=sorted(GOALS), default="demo")
    parser.add_argument("--out", type=Path, help="keep the run folder here (default: removed with the cache)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="quantdiag-demo-time-") as tmp:
        out = (args.out or Path(tmp) / "run").resolve()
        env = os.environ | {"QUANTDIAG_CACHE": str(Path(tmp) / "cache"), "GPTQMODEL_CPU_WORKERS": "2"}
        start = time.perf_counter()
        subprocess.run(command(args.preset, out), env=env, check=True, stdout=subprocess.DEVNULL)
        total = time.perf_counter() - start
        profile = json.loads((out / "results.json").read_text())["profile"]
    for stage, cost in stage_totals(profile).items():
        print(f"{stage:16s} {cost['computed']:8.1f} s computed {cost['cached']:6.1f} s cached")
    goal = GOALS[args.preset]
    print(f"goal: {goal} s; total / goal = {total / goal:.2f}")
    print(f"total: {total:.0f} s")


if __name__ == "__main__":
    main()
