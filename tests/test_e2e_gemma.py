"""End to end on the second built-in model, Gemma 3 270M (base): another family (gemma3_text: sliding-window
layers, QK-norm, post-norms, scaled embeddings), tokenizer (262k vocabulary) and size (18 layers, hidden 640)
than SmolLM2. The quick preset (recall, lens, components, representations) with RTN at 4 and 2 bits.

Uses the user's quantdiag cache (content-keyed, so sharing it is safe): the first run on a fresh machine
assembles the GGUF from its package and converts it (about a minute); reruns reuse it.
"""

from __future__ import annotations

import json

import pytest

from quantdiag.config import RunConfig
from quantdiag.pipeline import run

pytestmark = pytest.mark.e2e
#: The relations Gemma 3 270M knows best (reference accuracy 50-70% on 20 facts each; Makefile, DEMO_RELATIONS).
KNOWN_RELATIONS = ("P176", "P103", "P37", "P178")


@pytest.fixture(autouse=True)
def isolated_cache():
    """Override the unit tests' per-test cache: the converted Gemma 3 and its settings are worth keeping."""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    config = RunConfig(
        out=str(tmp_path_factory.mktemp("e2e-gemma") / "run"),
        model="gemma3-270m",
        preset="quick",
        methods=("rtn",),
        bits=(4, 2),
        relations=KNOWN_RELATIONS,
        facts_per_relation=20,
        device="cpu",
    )
    report = run(config).report
    return json.loads((report.parent / "results.json").read_text())


def _recall(results: dict, label: str) -> dict:
    return next(s for s in results["settings"] if s["label"] == label)["recall"]


def test_gemma3_is_read_as_its_own_family(quick_run):
    model = quick_run["model"]
    assert (model["family"], model["n_layers"], model["hidden_size"], model["vocab_size"]) == (
        "gemma3_text",
        18,
        640,
        262144,
    )


def test_the_performance_cliff(quick_run):
    """4-bit is a rank drop (the answer stays near the top), 2-bit a collapse (ranks in the tens of thousands).
    Measured (1e2dceb, 80 facts): reference 62.5%, median answer rank 1; RTN 4-bit 16.3% (26% of the
    reference's), rank 4; RTN 2-bit 0%, rank 59,296 of 262,144."""
    reference, four, two = (_recall(quick_run, label) for label in ("Reference", "RTN 4-bit", "RTN 2-bit"))
    assert reference["accuracy"] > 0.5 and reference["median_rank"] == 1
    assert 0.15 * reference["accuracy"] <= four["accuracy"] <= 0.5 * reference["accuracy"]
    assert four["median_rank"] <= 10
    assert two["accuracy"] <= 0.05 * reference["accuracy"]
    assert two["median_rank"] > 10_000
