"""ROME position groups and the grouped causal heatmaps, on hand-made grids."""

from __future__ import annotations

import numpy as np

from quantdiag.analysis.effects import as_json, drop, early_last_subject, from_json, hotspot, per_token_restoration, restoration
from quantdiag.analysis.positions import GROUPS, token_groups


def _names(groups: np.ndarray) -> list[str]:
    return [GROUPS[g] for g in groups]


def test_token_groups_follow_rome():
    assert _names(token_groups((2, 5), 8)) == [
        "before subject", "before subject", "first subject", "middle subject", "last subject", "first after", "further", "last",
    ]
    # a one-token subject is the last subject token; the token after it may be the last token
    assert _names(token_groups((0, 1), 2)) == ["last subject", "last"]


def _two_prompts():
    """Two prompts, 3 layers; prompt 0 has 4 tokens (subject 1..2), prompt 1 has 3 (subject 0)."""
    groups = np.array([token_groups((1, 3), 4), np.append(token_groups((0, 1), 3), -1)])
    grid = np.full((2, 3, 4), 0.1)
    grid[1, :, 3] = np.nan
    grid[:, 0, groups[0] == GROUPS.index("last subject")] = 0.5  # layer 0, last subject: patched to p_R
    grid[1, 0, 0] = 0.5
    return grid, groups


def test_restoration_is_one_where_patching_recovers_the_reference():
    grid, groups = _two_prompts()
    maps = restoration(grid, groups, p_model=np.array([0.1, 0.1]), p_reference=np.array([0.5, 0.5]))
    last_subject = GROUPS.index("last subject")
    assert maps["restoration"][0, last_subject] == 1.0
    assert maps["restoration"][1, last_subject] == 0.0
    assert np.isnan(maps["restoration"][0, GROUPS.index("middle subject")])  # no prompt has one


def test_drop_is_relative_to_the_clean_probability():
    grid, groups = _two_prompts()
    maps = drop(grid, groups, p_model=np.array([0.2, 0.2]))
    assert np.isclose(maps["drop"][1, GROUPS.index("last")], 0.1)
    assert np.isclose(maps["relative_drop"][1, GROUPS.index("last")], 0.5)


def test_hotspot_and_its_concentration():
    cells = np.zeros((8, len(GROUPS)))
    cells[2, GROUPS.index("last subject")] = 0.6
    cells[7, GROUPS.index("last")] = 1.0
    assert hotspot(cells).group == "last"
    assert hotspot(cells, skip_last_from=0.0).group == "last subject"
    spot = hotspot(cells, skip_last_from=0.75)
    assert (spot.layer, spot.group, spot.value, spot.concentration) == (2, "last subject", 0.6, 1.0)
    assert hotspot(np.full((2, len(GROUPS)), np.nan)) is None
    assert np.isclose(early_last_subject(cells), 0.6 / 4)


def test_per_token_restoration_and_json_round_trip():
    grid = np.array([[0.1, 0.3], [0.5, np.nan]])
    restored = per_token_restoration(grid, 0.1, 0.5)
    assert np.allclose(restored[:, 0], [0.0, 1.0])
    assert np.isnan(per_token_restoration(grid, 0.2, 0.2)).all()
    assert as_json(restored)[1][1] is None
    np.testing.assert_array_equal(from_json(as_json(restored)), np.round(restored, 6))
