"""ROME position groups and the grouped causal heatmaps (METHODS 3), on hand-made grids whose
expected values are worked out by hand: prompts with different p_Q and p_R, groups that only some
prompts have, and a cell under MIN_GAP."""

from __future__ import annotations

import numpy as np

from quantdiag.analysis.effects import (
    as_json,
    drop,
    early_last_subject,
    from_json,
    hotspot,
    per_token_restoration,
    restoration,
)
from quantdiag.analysis.positions import GROUPS, token_groups

NAN = np.nan


def _names(groups: np.ndarray) -> list[str]:
    return [GROUPS[g] for g in groups]


def test_token_groups_follow_rome():
    assert _names(token_groups((2, 5), 8)) == [
        "before subject",
        "before subject",
        "first subject",
        "middle subject",
        "last subject",
        "first after",
        "further",
        "last",
    ]
    # a one-token subject is the last subject token; the token after it may be the last token
    assert _names(token_groups((0, 1), 2)) == ["last subject", "last"]


def _three_prompts() -> tuple[np.ndarray, np.ndarray]:
    """2 layers, 3 prompts (NaN / -1 padding to 5 tokens); groups by index into GROUPS
    (0 before, 1 first subj, 2 middle subj, 3 last subj, 4 first after, 5 further, 6 last):
    A: 4 tokens, subject 1..2 -> [0, 1, 3, 6]    p_Q 0.1, p_R 0.9
    B: 3 tokens, subject 0    -> [3, 4, 6]       p_Q 0.3, p_R 0.5
    C: 5 tokens, subject 1..3 -> [0, 1, 2, 3, 6] p_Q 0.5, p_R 0.55
    Layer 0 holds the values below; layer 1 is each prompt's p_Q, but p_R at the last token."""
    groups = np.array([[0, 1, 3, 6, -1], [3, 4, 6, -1, -1], [0, 1, 2, 3, 6]])
    np.testing.assert_array_equal(groups[0, :4], token_groups((1, 3), 4))
    np.testing.assert_array_equal(groups[1, :3], token_groups((0, 1), 3))
    np.testing.assert_array_equal(groups[2], token_groups((1, 4), 5))
    layer0 = [[0.5, 0.3, 0.5, 0.2, NAN], [0.5, 0.4, 0.3, NAN, NAN], [0.4, 0.5, 0.52, 0.6, 0.5]]
    layer1 = [[0.1, 0.1, 0.1, 0.9, NAN], [0.3, 0.3, 0.5, NAN, NAN], [0.5, 0.5, 0.5, 0.5, 0.55]]
    return np.stack([layer0, layer1], axis=1), groups


P_Q, P_R = np.array([0.1, 0.3, 0.5]), np.array([0.9, 0.5, 0.55])


def test_restoration_is_a_ratio_of_means_over_the_prompts_that_have_the_group():
    grid, groups = _three_prompts()
    maps = restoration(grid, groups, P_Q, P_R)
    # mean_prob, layer 0: before (0.5 + 0.4) / 2, first subj (0.3 + 0.5) / 2, middle 0.52 (C only),
    # last subj (0.5 + 0.5 + 0.6) / 3, first after 0.4 (B only), further: nobody, last (0.2 + 0.3 + 0.5) / 3
    np.testing.assert_allclose(maps["mean_prob"][0], [0.45, 0.4, 0.52, 0.533333, 0.4, NAN, 0.333333], atol=1e-6)
    expected = [
        # layer 0, per group: (mean patched - mean p_Q) / (mean p_R - mean p_Q) over the prompts with the group
        [
            0.352941,  # before, A and C: (0.45 - (0.1 + 0.5) / 2) / ((0.9 + 0.55) / 2 - 0.3) = 0.15 / 0.425
            0.235294,  # first subject, A and C: (0.4 - 0.3) / 0.425
            NAN,  # middle subject, C only: p_R - p_Q = 0.05 < MIN_GAP * p_R = 0.11
            0.666667,  # last subject, all: (1.6 / 3 - 0.9 / 3) / (1.95 / 3 - 0.9 / 3) = 0.7 / 1.05
            0.5,  # first after, B only: (0.4 - 0.3) / (0.5 - 0.3); gap 0.2 >= 0.2 * 0.5
            NAN,  # further: no prompt has one
            0.095238,  # last, all: (1.0 / 3 - 0.9 / 3) / (1.05 / 3)
        ],
        # layer 1: every cell at p_Q (restoration 0), the last token at p_R (restoration 1)
        [0.0, 0.0, NAN, 0.0, 0.0, NAN, 1.0],
    ]
    np.testing.assert_allclose(maps["restoration"], expected, atol=1e-6)


def test_drop_is_relative_to_the_clean_probability_of_the_prompts_that_have_the_group():
    grid, groups = _three_prompts()
    maps = drop(grid, groups, p_model=P_R)  # the clean p(target) here: 0.9, 0.5, 0.55
    # per group, layer 0: clean mean over the prompts with the group - mean after ablation
    np.testing.assert_allclose(
        maps["drop"][0],
        [
            0.275,  # before, A and C: (0.9 + 0.55) / 2 - 0.45
            0.325,  # first subject: 0.725 - 0.4
            0.03,  # middle subject, C only: 0.55 - 0.52
            0.116667,  # last subject, all: 1.95 / 3 - 1.6 / 3
            0.1,  # first after, B only: 0.5 - 0.4
            NAN,  # further: nobody
            0.316667,  # last, all: 1.95 / 3 - 1.0 / 3
        ],
        atol=1e-6,
    )
    # drop / clean mean: 0.275 / 0.725, 0.325 / 0.725, 0.03 / 0.55, 0.35 / 1.95, 0.1 / 0.5, -, 0.95 / 1.95
    relative = [0.37931, 0.448276, 0.054545, 0.179487, 0.2, NAN, 0.487179]
    np.testing.assert_allclose(maps["relative_drop"][0], relative, atol=1e-6)


def test_hotspot_concentration_is_the_share_of_the_top_five_percent():
    """8 layers x 7 groups = 56 cells; the top 5% is round(0.05 * n) of the n defined cells."""
    cells = np.zeros((8, len(GROUPS)))
    for layer, group, value in [
        (2, "last subject", 0.6),
        (3, "last subject", 0.3),
        (1, "first subject", 0.2),
        (5, "further", 0.1),
        (7, "last", 1.0),
        (0, "last", 0.4),
        (4, "before subject", -0.5),
    ]:
        cells[layer, GROUPS.index(group)] = value
    spot = hotspot(cells)
    # all 56 cells: top round(2.8) = 3 of the positives 1.0, 0.6, 0.4, 0.3, 0.2, 0.1 (sum 2.6): 2.0 / 2.6
    assert (spot.layer, spot.group, spot.value) == (7, "last", 1.0)
    assert np.isclose(spot.concentration, 0.769231, atol=1e-6)
    spot = hotspot(cells, skip_last_from=0.75)
    # last token of layers 6, 7 skipped, 54 cells: top round(2.7) = 3 of 0.6, 0.4, 0.3, 0.2, 0.1: 1.3 / 1.6
    assert (spot.layer, spot.group, spot.value) == (2, "last subject", 0.6)
    assert np.isclose(spot.concentration, 0.8125)
    spot = hotspot(cells, skip_last_from=0.0)
    # no last token, 48 cells: top round(2.4) = 2 of 0.6, 0.3, 0.2, 0.1 (the -0.5 counts as 0): 0.9 / 1.2
    assert (spot.layer, spot.group, spot.value) == (2, "last subject", 0.6)
    assert np.isclose(spot.concentration, 0.75)
    assert hotspot(np.full((2, len(GROUPS)), np.nan)) is None
    assert np.isclose(early_last_subject(cells), 0.225)  # layers 0..3 at the last subject: (0 + 0 + 0.6 + 0.3) / 4


def test_per_token_restoration_and_json_round_trip():
    grid = np.array([[0.1, 0.3], [0.5, np.nan]])
    restored = per_token_restoration(grid, 0.1, 0.5)
    np.testing.assert_allclose(restored, [[0.0, 0.5], [1.0, NAN]])  # (p - 0.1) / 0.4
    assert np.isnan(per_token_restoration(grid, 0.45, 0.5)).all()  # gap 0.05 < MIN_GAP * 0.5
    assert as_json(restored) == [[0.0, 0.5], [1.0, None]]
    np.testing.assert_allclose(from_json(as_json(restored)), restored, atol=1e-6)
