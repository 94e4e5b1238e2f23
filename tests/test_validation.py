"""The verdict on checkpoints of known damage (docs/verdict.md): float checkpoints made here from
the built-in SmolLM2-135M, each judged by ``quantdiag diagnose --preset quick`` in one run, with
one expected verdict each.

The damage, and why each verdict is the right one:

* ``tiny``: Gaussian noise of 0.1% of each block weight's spread (negligible): Healthy.
* ``rtn8``: every block linear rounded to 8 bits (RTN, groups of 64): Healthy.
* ``noise``: Gaussian noise of NOISE_SCALE of each block weight's spread in every block linear.
  Measured on the 200 facts of ``load_pararel(RELATIONS, 50, 0)``: 2% keeps 90% of the reference's
  accuracy, 4% keeps 66%, 6% keeps 48%; on this test's 160 facts 3% keeps 81% (39 of the 48 known
  facts; Failure subset 9). Every block is a little noisier, none is broken: Signal Degradation.
* ``mlp01``: noise of 100% of the weights' spread in the MLPs of blocks 0 and 1 only (keeps 0%;
  block 0's MLP alone, swapped into the reference, keeps 0 of the 48 known facts, so the domino
  test's half-damage block is 0): Computation Collapse, damage from block 0.
* ``rtn2``: every block linear rounded to 2 bits (RTN, groups of 64; keeps 0%): Computation Collapse.

Measured component signatures (quick preset, this test's facts; FFN over all layers, focus
divergence over blocks 0-2): sign flips / Jaccard / value cosine / focus divergence are
0.001 / 0.99 / 1.00 / 0.000 (tiny), 0.008 / 0.93 / 1.00 / 0.000 (rtn8), 0.036 / 0.73 / 0.98 / 0.000
(noise), 0.34 / 0.07 / 0.19 / 0.19 (mlp01), 0.38 / 0.05 / 0.06 / 0.18 (rtn2): the components'
score is +0.99, +0.97, +0.88, -0.32, -0.45. Debiased CKA diagonal / activation subspace / error
alignment: 1.000 / 1.00 / 0.10 (tiny), 1.000 / 1.00 / 0.11 (rtn8), 0.995 / 0.95 / 0.04 (noise, Failure subset).
On 2 shared, loaded CPU cores the recall of the six models took about 15 minutes, the component
pass 4 and the representation pass about 6 a checkpoint: this is the slow end of the suite.

Uses the user's quantdiag cache (content-keyed): the first run on a fresh machine converts the
GGUF file (a few minutes).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from quantdiag.cli import app
from quantdiag.model.load import builtin_gguf, converted_gguf
from quantdiag.quant.rtn import rtn_dequantized

from conftest import save_noisy

pytestmark = pytest.mark.e2e
#: Relations SmolLM2-135M knows (tests/test_e2e.py's); 40 facts each: 160 facts, about 45 known.
RELATIONS = ("P103", "P37", "P1412", "P178")
FACTS = 40
NOISE_SCALE = 0.03
#: The expected verdict of each checkpoint.
EXPECTED = {"tiny": "healthy", "rtn8": "healthy", "noise": "degradation", "mlp01": "collapse", "rtn2": "collapse"}


@pytest.fixture(autouse=True)
def isolated_cache():
    """Override the unit tests' per-test cache: the converted GGUF is worth keeping."""


def _early_mlps(name: str) -> bool:
    return ".mlp." in name and name.split(".")[2] in ("0", "1")


def _rounded(source, target, bits: int) -> None:
    """A float checkpoint: every block linear of ``source`` rounded to ``bits`` (RTN, groups of 64)."""
    model = AutoModelForCausalLM.from_pretrained(source)
    for name, weight in model.named_parameters():
        if weight.ndim == 2 and "layers" in name:
            weight.data = rtn_dequantized(weight.data, bits, 64)
    model.save_pretrained(target)


def make_checkpoints(folder) -> None:
    """The five checkpoints of ``EXPECTED`` in ``folder``, from the built-in model."""
    source = converted_gguf(builtin_gguf())
    save_noisy(source, folder / "tiny", 1e-3, 1)
    save_noisy(source, folder / "noise", NOISE_SCALE, 1)
    save_noisy(source, folder / "mlp01", 1.0, 1, _early_mlps)
    _rounded(source, folder / "rtn8", 8)
    _rounded(source, folder / "rtn2", 2)
    tokenizer = AutoTokenizer.from_pretrained(source)
    for name in EXPECTED:
        tokenizer.save_pretrained(folder / name)  # save_noisy writes the unit tests' tiny tokenizer


def diagnose_args(folder, preset: str, out) -> list[str]:
    """``quantdiag diagnose``'s arguments judging the checkpoints in ``folder`` with ``preset``, JSON out."""
    args = ["diagnose", "--preset", preset, "--relations", ",".join(RELATIONS), "--facts", str(FACTS)]
    args += ["--device", "cpu", "--out", str(out), "--json"]
    return args + [arg for name in EXPECTED for arg in ("--compare", str(folder / name))]


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    """One quick diagnosis of the five checkpoints; (verdict by name, seconds)."""
    folder = tmp_path_factory.mktemp("validation")
    make_checkpoints(folder)
    args = diagnose_args(folder, "quick", folder / "run")
    torch.manual_seed(0)
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    seconds = time.perf_counter() - start
    assert result.exit_code == 4, result.output  # the worst verdict: Collapse
    models = json.loads(result.stdout)["models"]
    return {model["label"].split(" ")[0]: model["verdict"] for model in models}, seconds


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_checkpoint_gets_the_verdict_its_damage_calls_for(diagnosed, name):
    verdicts, _ = diagnosed
    assert verdicts[name]["verdict"] == EXPECTED[name], verdicts[name]


def test_the_destroyed_early_mlps_are_found_where_they_are(diagnosed):
    verdicts, _ = diagnosed
    assert (verdicts["mlp01"]["first_damaged_block"], verdicts["mlp01"]["damage_evidence"]) == (0, "domino")


def test_every_question_is_answered_with_the_quick_preset(diagnosed):
    verdicts, _ = diagnosed
    for name, verdict in verdicts.items():
        assert all(row["answer"] != "not measured" for row in verdict["questions"]), name
