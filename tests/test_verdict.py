"""The verdict (METHODS 8) on synthetic evidence: the paper's three questions, each answered
once; the mechanism question decides, accuracy decides Healthy, agreement across the questions
sets the confidence; intervals and the noise floor decide which signatures vote; too few prompts
is Inconclusive; evidence is read correctly off results.json; where the damage starts and the
recommendation follow the run's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantdiag.analysis.positions import GROUPS
from quantdiag.verdict import verdict_of
from quantdiag.verdict.evidence import Measured, measure
from quantdiag.verdict.recommend import _more_bits, injection_blocks
from quantdiag.verdict.rules import (
    BROKEN,
    COLLAPSE,
    DEGRADATION,
    HEALTHY,
    INCONCLUSIVE,
    INTACT,
    NOT_MEASURED,
    decide,
    decisive,
    first_damaged_block,
    question_rows,
)
from quantdiag.verdict.thresholds import (
    BY_NAME,
    HEALTHY_RETENTION,
    LOW_RETENTION,
    MIN_SUBSET,
    REPAIR_GAIN,
    SIGNATURES,
)

NAMES = [signature.name for signature in SIGNATURES]
MECHANISM = [s.name for s in SIGNATURES if s.question == "mechanism"]
LAYERS = 8


def _value(name: str, collapse: bool) -> float:
    """A value clearly on one side of the signature's threshold."""
    signature = BY_NAME[name]
    above = collapse == (signature.collapse_when == "above")
    return signature.threshold * (1.5 if above else 0.5)


def _evidence(collapsing: set[str], names: list[str] = NAMES) -> list[Measured]:
    return [Measured(name, _value(name, name in collapsing), None) for name in names]


@pytest.mark.parametrize("signature", SIGNATURES, ids=NAMES)
def test_a_vote_changes_side_at_the_threshold(signature):
    nudge = 1.01 if signature.collapse_when == "above" else 0.99
    assert Measured(signature.name, signature.threshold * nudge, None).vote == COLLAPSE
    assert Measured(signature.name, signature.threshold, None).vote == INTACT


def test_a_signature_whose_interval_straddles_its_line_does_not_vote():
    assert Measured("cka_diagonal", 0.55, 1.0, (0.5, 0.58)).vote == COLLAPSE
    assert Measured("cka_diagonal", 0.55, 1.0, (0.5, 0.62)).vote is None
    only = [Measured("cka_diagonal", 0.55, 1.0, (0.5, 0.62))]
    assert question_rows(only)[1]["answer"] == "unclear"
    assert decide(0.5, only, 40).reason == "mechanism unclear"


def test_the_noise_floor_moves_the_line_by_its_distance_from_the_ideal():
    """CKA's line 0.6, ideal 1: a floor of 0.9 moves it to 0.5; a floor of 0.2 is damage, not
    noise, and moves it at most half the way to 0 (0.4). Sign flips: ideal 0, a floor of 0.05
    moves the line from 0.25 to 0.3."""
    assert Measured("cka_diagonal", 0.52, 1.0).vote == COLLAPSE
    assert Measured("cka_diagonal", 0.52, 1.0, None, 0.9).threshold == pytest.approx(0.5)
    assert Measured("cka_diagonal", 0.52, 1.0, None, 0.9).vote == INTACT
    assert Measured("cka_diagonal", 0.52, 1.0, None, 0.2).threshold == pytest.approx(0.4)
    assert Measured("sign_flip", 0.28, 0.0, None, 0.05).threshold == pytest.approx(0.3)
    assert Measured("lens_rank", 0.03, None, None, 0.5).threshold == BY_NAME["lens_rank"].threshold  # no ideal


def test_the_mechanism_question_decides_and_accuracy_decides_healthy():
    intact, broken = _evidence(set()), _evidence({*MECHANISM, "repairs"})
    assert decide(0.5, intact, 40).label == DEGRADATION
    assert decide(0.95, intact, 40).label == HEALTHY
    assert decide(0.5, broken, 40).label == COLLAPSE
    assert decide(0.95, broken, 40).label == COLLAPSE  # accuracy does not outvote a broken mechanism
    no_mechanism = [m for m in intact if m.name not in MECHANISM]
    assert decide(0.95, no_mechanism, 40).label == HEALTHY
    assert decide(0.5, no_mechanism, 40).reason == "mechanism not measured"
    rows = {row["question"]: row for row in question_rows(no_mechanism)}
    assert rows["mechanism"]["answer"] == NOT_MEASURED
    assert rows["mechanism"]["command"] == "quantdiag patch RUN --analyses components,representations"


def test_broken_components_are_not_outvoted_by_intact_representations():
    """The mechanism is the lower of its two parts. FFN and attention broken: margins -1/6, -1/2,
    -1/2, -1/18 (sign flips 0.375 of the way from 0.25 to 1 ...), mean -0.306; CKA, subspace and
    error alignment intact: +3/4, +1/3, +1/2, mean +0.528. Broken, although the mean of all seven
    (+0.05) reads intact."""
    components = {"sign_flip", "jaccard", "value_cosine", "focus_divergence"}
    measured = _evidence(components | {"repairs"})
    rows = {row["question"]: row for row in question_rows(measured)}
    assert rows["mechanism"]["answer"] == BROKEN and rows["mechanism"]["score"] == pytest.approx(-11 / 36, abs=1e-6)
    assert decide(0.0, measured, 40).label == COLLAPSE


def test_a_working_repair_rules_out_collapse():
    """Mechanism broken, yet the best repair brings back half the Failure subset: Inconclusive."""
    broken = [m if m.name != "repairs" else Measured("repairs", 0.5, 1.0) for m in _evidence(set(MECHANISM))]
    assert decide(0.3, broken, 40).label == INCONCLUSIVE
    assert decide(0.3, broken, 40).reason == "repair works"


def test_confidence_is_agreement_across_the_three_questions_not_a_count_of_votes():
    """All three questions agree: 1. One mechanism signature or seven: the same confidence
    (correlated votes are one answer). Signal disagreeing: 2 of 3. Only the mechanism measured:
    (1 + 2 x 1/3) / 3."""
    assert decide(0.5, _evidence(set()), 40).confidence == 1.0
    one, seven = ["cka_diagonal", "lens_rank", "early_damage"], NAMES
    assert decide(0.5, _evidence(set(), one), 40).confidence == decide(0.5, _evidence(set(), seven), 40).confidence
    assert decide(0.5, _evidence({"lens_rank", "patching"}), 40).confidence == pytest.approx(0.667)
    assert decide(0.5, _evidence(set(), MECHANISM), 40).confidence == pytest.approx(0.556)


def test_little_accuracy_and_no_working_repair_is_never_high_confidence_degradation():
    """Every question reads intact, but the model keeps almost nothing and the repairs fail:
    low confidence. With a repair that works, the same evidence is high confidence."""
    failing = [m if m.name != "repairs" else Measured("repairs", 0.02, 1.0) for m in _evidence(set())]
    untried = [m for m in _evidence(set()) if m.name != "repairs"]
    assert decide(LOW_RETENTION / 2, untried, 40) == decide(LOW_RETENTION / 2, failing, 40)
    assert (decide(LOW_RETENTION / 2, failing, 40).label, decide(LOW_RETENTION / 2, failing, 40).confidence) == (
        DEGRADATION,
        0.59,
    )
    assert decide(LOW_RETENTION / 2, _evidence(set()), 40).confidence == 1.0  # its repair reaches 0.15


def test_too_few_prompts_is_inconclusive_and_names_the_fix():
    results, setting = _deep_results(failures=MIN_SUBSET - 1, robust=MIN_SUBSET - 1)
    verdict = verdict_of(results, setting)
    assert (verdict["verdict"], verdict["reason"]) == (INCONCLUSIVE, "too few prompts")
    assert verdict["subset"] == {"name": None, "prompts": None, "robust": 7, "failure": 7}
    assert "--facts" in verdict["recommendation"]["text"]


def test_the_deciding_signatures_are_the_clearest_agreeing_ones():
    measured = [Measured("cka_diagonal", 0.05, 1.0), Measured("jaccard", 0.14, 1.0), Measured("sign_flip", 0.05, 0.0)]
    assert decisive(COLLAPSE, measured) == ["cka_diagonal", "jaccard"]
    assert decisive(DEGRADATION, measured) == ["sign_flip"]
    ranks = [Measured("lens_rank", 0.5, None), Measured("jaccard", 0.14, 1.0)]
    assert decisive(COLLAPSE, ranks) == ["lens_rank", "jaccard"]  # 1.4 decades past 0.02: further than 0.01 of 0.15


def _setting(
    key: str, bits: int, *, cka: float, flips: float, half: int | None = None, repairs: list | None = None
) -> dict:
    """A compared model's results.json entry with lens, components and representations (and
    optionally sensitivity and repairs) on its method's Failure subset."""
    subset = "rtn:failure"
    diagonal = [[cka if i == j else 0.0 for j in range(LAYERS)] for i in range(LAYERS)]
    setting = {
        "key": key,
        "label": f"RTN {bits}-bit",
        "method": "rtn",
        "bits": bits,
        "average_bits": float(bits),
        "recall": {"accuracy": 0.1},
        "lens": {subset: {"median_rank": [5000.0] * (LAYERS - 1) + [3.0 if cka > 0.6 else 4000.0]}},
        "components": {
            subset: {
                "sign_flip": [flips] * LAYERS,
                "jaccard": [0.5 if flips < 0.2 else 0.05] * LAYERS,
                "value_cosine": [0.8 if flips < 0.2 else 0.1] * LAYERS,
            }
        },
        "representations": {
            subset: {
                "cka": {"resid": {"subject": diagonal}},
                "subspaces": {
                    "subject": {
                        "activation": [0.75 if cka > 0.6 else 0.1] * LAYERS,
                        "error": [0.15] * LAYERS,
                        "k": [10] * LAYERS,
                    }
                },
            }
        },
    }
    if half is not None:
        kept = 1.0 if cka > 0.6 else 0.0
        setting["sensitivity"] = {
            "domino": {"robust": [kept] * LAYERS, "failure": [0.0] * LAYERS},
            "half_damage_block": half,
        }
    if repairs is not None:
        setting["repairs"] = {"rows": repairs}
    return setting


def _results(*settings: dict, injection: dict | None = None) -> dict:
    reference = {
        "key": "reference",
        "label": "Reference",
        "method": None,
        "recall": {"accuracy": 0.2},
        "lens": {"rtn:failure": {"median_rank": [5000.0] * (LAYERS - 1) + [1.0]}},
    }
    return {
        "model": {"n_layers": LAYERS, "hidden_size": 100, "vocab_size": 10000},
        "subsets": {"rtn": {"robust": 10, "failure": 10}},
        "settings": [reference, *settings],
        "injection": injection,
    }


def test_evidence_is_read_off_results_json():
    four = _setting("rtn-w4", 4, cka=0.9, flips=0.1)
    values = {m.name: m for m in measure(_results(four), four)}
    assert set(values) == {
        "lens_rank",
        "cka_diagonal",
        "activation_subspace",
        "error_alignment",
        "sign_flip",
        "jaccard",
        "value_cosine",
    }
    assert values["lens_rank"].value == pytest.approx(3 / 10000) and values["lens_rank"].reference == pytest.approx(
        1 / 10000
    )
    assert values["cka_diagonal"].value == pytest.approx(0.9)
    assert values["activation_subspace"].value == pytest.approx((0.75 - 0.1) / 0.9)  # chance k/d = 0.1 taken out
    assert values["sign_flip"].value == pytest.approx(0.1) and values["sign_flip"].reference == 0.0


#: The reader test's model: 16 layers (so the early blocks are the first 2), vocabulary 1000, width 100.
DEEP = 16


def _grid(cells: dict[tuple[int, str], float | None], base: float = 0.05) -> list[list[float | None]]:
    """A (layers x position groups) heatmap: ``base`` everywhere but ``cells``, keyed (layer, group)."""
    return [[cells.get((layer, group), base) for group in GROUPS] for layer in range(DEEP)]


def _matrix(diagonal: list[float], off: float) -> list[list[float]]:
    return [[diagonal[i] if i == j else off for j in range(DEEP)] for i in range(DEEP)]


def _deep_results(failures: int = 10, robust: int = 30) -> tuple[dict, dict]:
    """A synthetic results.json with every section a verdict reads, curves that vary over the
    layers, and decoys (other subsets, streams, positions) holding the values a wrong reader
    would take."""
    robust_patching = {"resid": {"restoration": _grid({(2, "last subject"): 0.9})}}
    patching = {
        "mlp": {"restoration": _grid({}, base=0.99)},  # first in order: a reader must pick the residual stream
        "resid": {
            "restoration": _grid(
                {
                    (0, "first subject"): None,  # undefined cells are skipped
                    (3, "last subject"): 0.62,
                    (11, "last"): 0.7,  # last token before the last quarter (layers 12-15): counts
                    (12, "last"): 0.97,  # last quarter of the last token: copies R's output, skipped
                    (15, "last"): 1.0,
                }
            )
        },
    }
    setting = {
        "key": "rtn-w3",
        "label": "RTN 3-bit",
        "method": "rtn",
        "bits": 3,
        "average_bits": 3.0,
        "recall": {"accuracy": 0.2},
        "lens": {
            "rtn:failure": {"median_rank": [900.0] * 10 + [400.0, 120.0, 60.0, 30.0, 45.0, 80.0]},
            "rtn:robust": {"median_rank": [5.0] * DEEP},
        },
        "causal": {
            "rtn:failure": {"patching": patching, "ablation": {"resid": {"drop": _grid({}, base=0.8)}}},
            "rtn:robust": {"patching": robust_patching},
        },
        "representations": {
            "rtn:failure": {
                "cka": {
                    "resid": {
                        "subject": _matrix([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4] + [0.3] * 9, off=0.9),
                        "last": _matrix([0.1] * DEEP, off=0.1),
                    }
                },
                "subspaces": {
                    "subject": {
                        "activation": [0.91] * 8 + [0.6] * 8,
                        "error": [0.55] * 8 + [0.2] * 8,
                        "k": [10] * 8 + [20] * 8,
                    },
                    "last": {"activation": [0.0] * DEEP, "error": [1.0] * DEEP, "k": [10] * DEEP},
                },
            }
        },
        "components": {
            "rtn:failure": {
                "sign_flip": [0.1, None, 0.3] + [0.2] * 13,
                "jaccard": [0.8] * 8 + [0.2] * 8,
                "value_cosine": [0.9] * 4 + [0.5] * 12,
                "focus_divergence": [0.05, 0.15] + [0.9] * 14,
                "entropy_subject": [0.0] * DEEP,
            }
        },
        "sensitivity": {
            "domino": {"robust": [0.9, 0.8, 0.5] + [0.4] * 13, "failure": [0.5, 0.2, 0.1] + [0.0] * 13},
            "half_damage_block": 2,
        },
        "repairs": {
            "rows": [
                {"repair": "baseline", "average_bits": 3.0, "failure": 0.3, "robust": 0.4},  # no repair: not counted
                {"repair": "eora", "average_bits": 3.6, "failure": 0.25, "robust": 0.4},
                {"repair": "early", "average_bits": 3.6, "failure": 0.125, "robust": 0.5},
                {"repair": "kurtosis", "average_bits": 3.1, "failure": 0.0, "robust": 0.4},
                {"repair": "early+amplify", "average_bits": 3.6, "failure": 0.2, "robust": 0.3},
                {"repair": "early+eora", "average_bits": 4.2, "failure": 0.125, "robust": 0.5},
            ]
        },
    }
    reference = {
        "key": "reference",
        "method": None,
        "recall": {"accuracy": 0.5},
        "lens": {
            "rtn:failure": {"median_rank": [800.0] * 12 + [50.0, 9.0, 2.0, 3.0]},
            "rtn:robust": {"median_rank": [1.0] * DEEP},
        },
        "representations": {
            "rtn:failure": {"cka": {"resid": {"subject": _matrix([1.0] * DEEP, off=0.5)}}, "subspaces": None}
        },
    }
    results = {
        "model": {"n_layers": DEEP, "hidden_size": 100, "vocab_size": 1000},
        "subsets": {"rtn": {"robust": robust, "failure": failures}},
        "settings": [reference, setting],
    }
    return results, setting


def test_every_evidence_value_by_hand():
    """Each reader's value and the reference's, worked out from the synthetic results.json."""
    results, setting = _deep_results()
    measured = measure(results, setting)
    expected = {
        "lens_rank": (30 / 1000, 2 / 1000),  # best median rank over the layers, over the vocabulary
        # subject patching: the last subject token's mean over layers 0-7 (a 0.62 and seven 0.05),
        # not the strongest cell anywhere (0.7 at the last token)
        "patching": ((0.62 + 7 * 0.05) / 8, None),
        # 0.475: the diagonal only, not the off-diagonal 0.9
        "cka_diagonal": ((1.0 + 0.9 + 0.8 + 0.7 + 0.6 + 0.5 + 0.4 + 9 * 0.3) / 16, 1.0),
        "activation_subspace": (((0.91 - 0.1) / 0.9 + (0.6 - 0.2) / 0.8) / 2, 1.0),  # chance k/d = 0.1, then 0.2: 0.7
        "error_alignment": (((0.55 - 0.1) / 0.9 + 0.0) / 2, None),  # 0.25
        "sign_flip": ((0.1 + 0.3 + 13 * 0.2) / 15, 0.0),  # 0.2: the undefined layer is left out
        "jaccard": (0.5, 1.0),
        "value_cosine": ((4 * 0.9 + 12 * 0.5) / 16, 1.0),  # 0.6
        "focus_divergence": (0.1, 0.0),  # the early blocks only (16 // 8 = 2): 0.05 and 0.15
        # 0.65: blocks 0-1 quantized, 30 Robust and 10 Failure prompts
        "early_damage": ((30 * 0.8 + 10 * 0.2) / 40, 1.0),
        "repairs": (0.25, 1.0),  # EoRA's; the baseline's 0.3 is no repair
    }
    assert [m.name for m in measured] == list(expected)
    assert {m.name: m.value for m in measured} == pytest.approx({name: pair[0] for name, pair in expected.items()})
    assert {m.name: m.reference for m in measured} == {name: pair[1] for name, pair in expected.items()}
    verdict = verdict_of(results, setting)
    answers = {row["question"]: row["answer"] for row in verdict["questions"]}
    # the signal reads broken (rank share 0.03 > 0.02, patching 0.12 < 0.2); the mechanism is
    # intact on the mean of its margins (only the CKA diagonal is past its line); intervention intact
    assert answers == {"signal": BROKEN, "mechanism": INTACT, "intervention": INTACT}
    assert (verdict["verdict"], verdict["confidence"], verdict["retention"]) == (DEGRADATION, 0.667, 0.4)
    assert verdict["subset"] == {"name": "failure", "prompts": 10, "robust": 30, "failure": 10}
    assert (verdict["first_damaged_block"], verdict["damage_evidence"]) == (2, "domino")


def test_evidence_comes_from_the_robust_subset_when_too_few_prompts_fail():
    """Fewer Failure prompts than the intervals need: the lens and patching are read on the
    Robust subset, and the domino test's accuracy is the Robust curve's."""
    results, setting = _deep_results(failures=MIN_SUBSET - 1)
    values = {m.name: m.value for m in measure(results, setting)}
    assert values["lens_rank"] == pytest.approx(5 / 1000)
    assert values["patching"] == pytest.approx((0.9 + 7 * 0.05) / 8)
    assert values["early_damage"] == pytest.approx((30 * 0.8 + 7 * 0.2) / 37)


def test_intervals_and_the_floor_come_from_results_json():
    """Per-prompt component values give the interval; the run's 8-bit setting is the floor."""
    results, setting = _deep_results()
    setting["prompt_values"] = {"rtn:failure": {"jaccard": [[0.7] * DEEP, [0.9] * DEEP] * 5}}
    eight = {**setting, "key": "rtn-w8", "bits": 8, "components": {"rtn:failure": {"jaccard": [0.95] * DEEP}}}
    results["settings"].append(eight)
    jaccard = next(m for m in measure(results, setting) if m.name == "jaccard")
    low, high = jaccard.interval
    assert 0.7 < low < 0.8 < high < 0.9  # halves of five 0.7s and five 0.9s
    assert jaccard.floor == pytest.approx(0.95) and jaccard.threshold == pytest.approx(0.1)
    assert jaccard.value == pytest.approx(0.5)  # the curve's mean over all layers


def test_4_bit_like_evidence_is_degradation_and_2_bit_like_is_collapse():
    repairs = [
        {"repair": "baseline", "average_bits": 4.0, "failure": 0.0, "robust": 1.0},
        {"repair": "eora", "average_bits": 4.6, "failure": 0.5, "robust": 0.9},  # +20 pts on the known facts
        {"repair": "early", "average_bits": 4.3, "failure": 0.3, "robust": 1.0},  # +15 pts, cheaper
        {"repair": "kurtosis", "average_bits": 4.1, "failure": 0.1, "robust": 0.95},  # +2.5 pts: not enough
    ]
    four = _setting("rtn-w4", 4, cka=0.9, flips=0.1, half=5, repairs=repairs)
    two = _setting(
        "rtn-w2", 2, cka=0.2, flips=0.4, half=0, repairs=[{**row, "failure": 0.0, "robust": 0.0} for row in repairs]
    )
    injection = {
        "rtn": {"low": "rtn-w2", "highs": ["reference"], "accuracy": [[0.0, 0.0, 0.2, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0]]}
    }
    results = _results(four, two, injection=injection)
    good, bad = verdict_of(results, four), verdict_of(results, two)
    assert good["verdict"] == DEGRADATION and good["first_damaged_block"] == 5 and good["damage_evidence"] == "domino"
    assert (
        good["recommendation"]["repair"]["repair"] == "early" and "early protection" in good["recommendation"]["text"]
    )
    assert bad["verdict"] == COLLAPSE and bad["confidence_level"] == "high" and bad["first_damaged_block"] == 0
    assert "failed" in bad["recommendation"]["text"] and "blocks 0-2" in bad["recommendation"]["text"]
    assert injection_blocks(results, two) == 3 and injection_blocks(results, four) is None
    assert bad["confidence"] == 1.0  # signal, mechanism and intervention all read broken
    rows = {row["name"]: row for row in bad["signatures"]}
    assert (
        rows["cka_diagonal"]["vote"] == COLLAPSE
        and rows["cka_diagonal"]["threshold"] == BY_NAME["cka_diagonal"].threshold
    )


def test_where_the_damage_starts_without_a_domino_test():
    """The CKA diagonal's first layer below its threshold; with only the lens, the first layer
    where the reference's answer has surfaced and the model's has not."""
    collapsed = _setting("rtn-w2", 2, cka=0.2, flips=0.4)
    assert first_damaged_block(_results(collapsed), collapsed) == (0, "cka")
    lens_only = {key: value for key, value in collapsed.items() if key != "representations"}
    assert first_damaged_block(_results(lens_only), lens_only) == (LAYERS - 1, "lens")
    healthy = _setting("rtn-w8", 8, cka=0.99, flips=0.01)
    assert first_damaged_block(_results(healthy), healthy) == (None, None)


def test_docs_state_every_threshold():
    """docs/verdict.md stays true to thresholds.py."""
    text = (Path(__file__).parents[1] / "docs" / "verdict.md").read_text()
    for signature in SIGNATURES:
        side = ">" if signature.collapse_when == "above" else "<"
        assert f"`{signature.name}`" in text and f"| {side} {signature.threshold:g} |" in text, signature.name
    assert f"**{HEALTHY_RETENTION:.0%}**" in text and f"**{LOW_RETENTION:.0%}**" in text
    assert f"**{MIN_SUBSET}**" in text and f"**{REPAIR_GAIN * 100:g} points**" in text


def test_more_bits_names_a_lone_first_block_as_one_block():
    """Damage from block 0 is "block 0", not "blocks 0-0"; from block 2, "blocks 0-2"."""
    results, setting = {"model": {"n_layers": LAYERS}}, {"method": "rtn", "key": "rtn-w2"}
    assert _more_bits(results, setting, 0) == "more bits in block 0, where the damage starts"
    assert _more_bits(results, setting, 2) == "more bits in blocks 0-2, where the damage starts"
