"""End to end on the built-in SmolLM2 with the quick preset: RTN and GPTQ at 4 and 2 bits.

Uses the user's quantdiag cache (content-keyed, so sharing it is safe): the first run on a fresh
machine converts the GGUF, generates calibration text and quantizes (a few minutes); reruns reuse it.
"""

from __future__ import annotations

import json
import time

import pytest

from quantdiag.config import RunConfig
from quantdiag.pipeline import run

pytestmark = pytest.mark.e2e
#: Relations SmolLM2-135M knows (reference accuracy 15-60%); on most others it says " the".
KNOWN_RELATIONS = ("P103", "P37", "P1412", "P178")


@pytest.fixture(autouse=True)
def isolated_cache():
    """Override the unit tests' per-test cache: quantized SmolLM2 settings are worth keeping."""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    config = RunConfig(
        out=str(tmp_path_factory.mktemp("e2e") / "run"),
        preset="quick",
        bits=(4, 2),
        relations=KNOWN_RELATIONS,
        facts_per_relation=30,
        device="cpu",
    )
    report = run(config)
    return config, report, json.loads((report.parent / "results.json").read_text())


def _setting(results: dict, label: str) -> dict:
    return next(s for s in results["settings"] if s["label"] == label)


def test_the_performance_cliff(quick_run):
    """4-bit is a rank drop (answers stay near the top); 2-bit is a collapse (ranks in the
    thousands, accuracy near zero). A 135M model loses more at 4-bit than an 8B one does."""
    _, _, results = quick_run
    reference = _setting(results, "Reference")["recall"]
    assert reference["accuracy"] > 0.15
    for method in ("RTN", "GPTQ"):
        four, two = _setting(results, f"{method} 4-bit")["recall"], _setting(results, f"{method} 2-bit")["recall"]
        assert four["accuracy"] >= 0.4 * reference["accuracy"], method
        assert four["median_rank"] <= 2 * reference["median_rank"], method
        assert two["accuracy"] <= 0.1 * reference["accuracy"], method
        assert two["median_rank"] > 100 * reference["median_rank"], method


def test_report_and_lens_per_subset(quick_run):
    config, report, results = quick_run
    html = report.read_text()
    assert "Performance cliff" in html and "Logit lens, GPTQ" in html and html.count("data:image/png;base64,") >= 5
    assert results["model"]["n_layers"] == 30 and results["model"]["family"] == "llama"
    assert any("group size 64" in note for note in results["notes"])
    for setting in results["settings"][1:]:
        robust = setting["lens"][f"{setting['method']}:robust"]
        assert robust is not None and len(robust["mean_prob"]) == 30
    for name in ("cliff", "ranks", "lens-rtn", "lens-gptq", "relations"):
        assert (report.parent / "figures" / f"{name}.svg").is_file()


def test_a_rerun_resumes_from_finished_stages(quick_run):
    config, report, results = quick_run
    stages = {p: p.stat().st_mtime_ns for p in (report.parent / "stages").iterdir()}
    start = time.perf_counter()
    run(config)
    assert time.perf_counter() - start < 120
    assert {p: p.stat().st_mtime_ns for p in (report.parent / "stages").iterdir()} == stages
    assert json.loads((report.parent / "results.json").read_text())["settings"] == results["settings"]
