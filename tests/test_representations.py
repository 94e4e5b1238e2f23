"""Representation similarity (METHODS 5): the debiased CKA against the U-statistic that defines
it and on unrelated noise, CKA and subspace properties with hypothesis, the streamed statistics
against whole-matrix formulas, the intervals, and the pass on tiny models."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdiag.analysis.representations import (
    POSITIONS,
    STREAMS,
    SUBSPACE_METRICS,
    layer_mean_intervals,
    representation_arrays,
)
from quantdiag.analysis.resample import MIN_PROMPTS, halves, mean_interval, share_interval, spread
from quantdiag.analysis.similarity import cka_matrix, covering_k, debiased_cka, subspace_stats
from quantdiag.analysis.spill import LayerRows
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, QuantSpec

shapes = st.tuples(
    st.integers(8, 24), st.integers(2, 30), st.integers(1, 3), st.integers(0, 2**16)
)  # rows, width, layers, seed


def _random(rows: int, width: int, layers: int, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return generator.normal(size=(rows, layers, width)) * generator.uniform(0.5, 3, size=width) + generator.normal(
        size=width
    )


def _spilled(folder: Path, values: np.ndarray, chunk: int = 5) -> LayerRows:
    rows = LayerRows(folder, values.shape[1], values.shape[2])
    for start in range(0, len(values), chunk):
        rows.append(values[start : start + chunk])
    return rows


def _u_hsic(k: np.ndarray, m: np.ndarray) -> float:
    """HSIC's U-statistic by its definition (Song et al. 2012, Theorem 2): the mean over ordered
    4-tuples of distinct rows of h = 1/4! sum over their orderings (t, u, v, w) of
    k_tu m_tu + k_tu m_vw - 2 k_tu m_tv. A plain loop, O(n^4): for a handful of rows."""
    n, total, count = len(k), 0.0, 0
    for rows in itertools.permutations(range(n), 4):
        h = 0.0
        for t, u, v, w in itertools.permutations(rows):
            h += k[t, u] * m[t, u] + k[t, u] * m[v, w] - 2 * k[t, u] * m[t, v]
        total, count = total + h / 24, count + 1
    return total / count


def _loop_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, m = x @ x.T, y @ y.T  # uncentred: the U-statistic does not see a shift of the rows
    return _u_hsic(k, m) / np.sqrt(_u_hsic(k, k) * _u_hsic(m, m))


def _whole_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased CKA on whole matrices, the closed form of ``_u_hsic`` (Song et al., eq. 5)."""

    def hsic(k: np.ndarray, m: np.ndarray) -> float:
        n = len(k)
        k, m = k - np.diag(np.diag(k)), m - np.diag(np.diag(m))
        one = np.ones(n)
        return (
            np.trace(k @ m) + one @ k @ one * (one @ m @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ m @ one
        ) / (n * (n - 3))

    k, m = x @ x.T, y @ y.T
    return hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))


def test_debiased_cka_is_the_hsic_u_statistic():
    """On 7 rows, the streamed and in-memory CKA equal the U-statistic's plain loop."""
    x, y = _random(7, 5, 1, 3), _random(7, 4, 1, 4)
    y[:, 0, :2] += x[:, 0, :2]  # related, so the value is far from 0
    expected = _loop_cka(x[:, 0], y[:, 0])
    assert expected == pytest.approx(_whole_cka(x[:, 0], y[:, 0]))
    assert debiased_cka(x[:, 0], y[:, 0]) == pytest.approx(expected)
    assert _cka(x, y)[0, 0] == pytest.approx(expected)


def test_debiased_cka_reads_zero_on_unrelated_noise_where_plain_cka_reads_high():
    """n = 30 prompts, d = 576 (SmolLM2's width), independent Gaussian rows: plain linear CKA's
    expectation is near d / (d + n) = 0.95; the debiased one's is 0 (its spread over 10 draws is
    about 0.04, so the mean of 10 is within 0.05)."""
    generator = np.random.default_rng(0)
    draws = [generator.normal(size=(2, 30, 576)) for _ in range(10)]
    debiased = [debiased_cka(x, y) for x, y in draws]
    plain = []
    for x, y in draws:
        x, y = x - x.mean(0), y - y.mean(0)
        plain.append(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))
    assert abs(np.mean(debiased)) < 0.05
    assert np.mean(plain) > 0.9


def _cka(x: np.ndarray, y: np.ndarray, block: int = 3) -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        return cka_matrix(_spilled(Path(folder) / "x", x), _spilled(Path(folder) / "y", y), block=block)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_streamed_cka_equals_whole_matrix_cka_for_every_layer_pair(shape):
    rows, width, layers, seed = shape
    x, y = _random(rows, width, layers, seed), _random(rows, width, layers + 1, seed + 1)
    streamed = _cka(x, y)
    whole = np.array([[_whole_cka(x[:, i], y[:, j]) for j in range(layers + 1)] for i in range(layers)])
    np.testing.assert_allclose(streamed, whole, rtol=1e-4, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(0.1, 10))
def test_cka_is_one_on_itself_symmetric_and_invariant_to_rotation_and_scale(shape, scale):
    rows, width, layers, seed = shape
    x, y = _random(rows, width, layers, seed), _random(rows, width, layers, seed + 1)
    np.testing.assert_allclose(np.diag(_cka(x, x)), 1, rtol=1e-5)
    np.testing.assert_allclose(_cka(x, y), _cka(y, x).T, rtol=1e-5, atol=1e-7)
    rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(width, width)))[0]
    np.testing.assert_allclose(np.diag(_cka(x, scale * x @ rotation)), 1, rtol=1e-4)
    np.testing.assert_allclose(_cka(x, scale * y @ rotation), _cka(x, y), rtol=1e-4, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_subspace_similarity_is_in_unit_interval_and_one_for_identical_inputs(shape):
    rows, width, layers, seed = shape
    x, y = _random(rows, width, layers, seed), _random(rows, width, layers, seed + 1)
    with tempfile.TemporaryDirectory() as folder:
        xs, ys = _spilled(Path(folder) / "x", x), _spilled(Path(folder) / "y", y)
        activation, error, k = subspace_stats(xs, ys, 0, block=4)
        same, _, k_same = subspace_stats(xs, xs, 0, block=4)
    assert -1e-9 <= activation <= 1 + 1e-9 and -1e-9 <= error <= 1 + 1e-9
    assert 1 <= k == k_same <= width
    assert abs(same - 1) < 1e-9


@pytest.mark.parametrize("rows, width", [(40, 6), (5, 8)])  # second moments, and the SVD of few rows
def test_subspace_stats_match_the_svd_of_the_whole_matrices(tmp_path, rows, width):
    x = _random(rows, width, 1, 0)
    y = x + 0.3 * _random(rows, width, 1, 1)
    activation, error, k = subspace_stats(_spilled(tmp_path / "x", x), _spilled(tmp_path / "y", y), 0, block=7)

    def top(matrix: np.ndarray, k: int) -> np.ndarray:
        return np.linalg.svd(matrix - matrix.mean(0), full_matrices=False)[2][:k].T  # centred columns

    sigma2 = np.linalg.svd(x[:, 0] - x[:, 0].mean(0), compute_uv=False) ** 2
    assert k == np.searchsorted(np.cumsum(sigma2) / sigma2.sum(), 0.9) + 1
    base = top(x[:, 0], k)
    assert np.isclose(activation, np.linalg.norm(base.T @ top(y[:, 0], k)) ** 2 / k)
    assert np.isclose(error, np.linalg.norm(base.T @ top(y[:, 0] - x[:, 0], k)) ** 2 / k)


def test_covering_k_on_known_spectra():
    assert covering_k(torch.tensor([1.0, 0.0, 0.0])) == 1
    assert covering_k(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 4  # 3 of 4 hold only 75%
    assert covering_k(torch.tensor([0.6, 8.8, 0.6])) == 2  # 8.8 alone holds 88%
    assert covering_k(torch.tensor([0.5, 9.0, 0.5], dtype=torch.float64)) == 1  # 9 holds exactly 90%


def test_spill_reads_back_blocks_and_means(tmp_path):
    values = _random(13, 4, 2, 3)
    rows = _spilled(tmp_path, values, chunk=4)
    assert rows.count == 13
    np.testing.assert_allclose(rows.block(1, 3, 9), values[3:9, 1], rtol=1e-6)
    np.testing.assert_allclose(rows.block(0, 10, 20), values[10:, 0], rtol=1e-6)
    np.testing.assert_allclose(rows.mean(1), values[:, 1].mean(0), rtol=1e-6)


def test_representation_pass_on_a_tiny_model(family_model, tmp_path):
    bank = WeightBank(family_model)
    eight, two = QuantSpec("rtn", 8, 32, True), QuantSpec("rtn", 2, 32, True)
    for spec in (eight, two):
        bank.ensure(spec)
    prompts = [tokenize(family_model.tokenizer, fact, i) for i, fact in enumerate(load_pararel(["P19"], 24, 0))]
    subsets = {"rtn:failure": prompts[:14], "rtn:robust": prompts[14:]}
    layers = family_model.adapter.n_layers
    work = tmp_path / "work"
    work.mkdir()

    own = representation_arrays(family_model, bank, REFERENCE, subsets, batch_size=4, workdir=work)
    assert set(own) == {f"{sub}/{s}/{p}/cka" for sub in subsets for s in STREAMS for p in POSITIONS}
    np.testing.assert_allclose(np.diag(own["rtn:failure/resid/last/cka"]), 1, rtol=1e-4)

    arrays = {
        spec.bits: representation_arrays(family_model, bank, spec, subsets, batch_size=4, workdir=work)
        for spec in (eight, two)
    }
    assert list(work.iterdir()) == []  # spills removed
    for metric in SUBSPACE_METRICS:
        assert arrays[2][f"rtn:failure/resid/subject/{metric}"].shape == (layers,)
    assert arrays[2]["rtn:failure/attn/subject/cka"].shape == (layers, layers)
    for position in POSITIONS:
        diagonal = {bits: np.diag(arrays[bits][f"rtn:failure/resid/{position}/cka"]).mean() for bits in arrays}
        assert diagonal[8] > diagonal[2]
        assert (
            arrays[8][f"rtn:failure/resid/{position}/activation"].mean()
            > arrays[2][f"rtn:failure/resid/{position}/activation"].mean()
        )


def test_half_sampling_interval_is_the_standard_error_wide():
    """Halves drawn without replacement vary like the full mean: on 400 values of spread 1 the
    90% interval is about 2 x 1.645 / sqrt(400) = 0.16 wide (a quarter-sample would give 0.28,
    a half-sample with replacement 0.23), and it is centred on the mean."""
    values = np.random.default_rng(1).normal(size=400)
    values = (values - values.mean()) / values.std()
    low, high = mean_interval(values)
    assert high - low == pytest.approx(2 * 1.645 / 20, rel=0.15)
    assert abs((low + high) / 2) < 0.02
    assert share_interval(0.25, 400) == mean_interval(np.arange(400) < 100)
    assert mean_interval(values[: MIN_PROMPTS - 1]) is None


def test_subspace_intervals_hold_the_whole_subsets_value(tmp_path):
    """16 prompts, k near 16: a half's 8 rows span at most 8 directions, so the halves' subspace
    similarity sits below the whole subset's; the interval keeps their spread around the whole
    subset's value (the debiased CKA's halves need no such move, but get it too)."""
    x = _random(16, 30, 1, 5)
    y = x + 0.2 * _random(16, 30, 1, 6)
    xs, ys = _spilled(tmp_path / "x", x), _spilled(tmp_path / "y", y)
    activation, error, k = subspace_stats(xs, ys, 0)
    centres = {"cka": debiased_cka(x[:, 0], y[:, 0])}
    centres |= {"activation": (activation - k / 30) / (1 - k / 30), "error": (error - k / 30) / (1 - k / 30)}
    intervals = layer_mean_intervals(xs, ys, np.array([k]), centres)
    assert k > 8
    for metric, (low, high) in intervals.items():
        assert low <= centres[metric] <= high, metric


def _top(values: torch.Tensor, size: int) -> torch.Tensor:
    """The top right singular vectors (d x size) of the column-centred rows."""
    return torch.linalg.svd(values - values.mean(0), full_matrices=False)[2][:size].T


def _halves_by_svd(x: np.ndarray, y: np.ndarray, k: np.ndarray, width: int) -> dict[str, list[float]]:
    """Each half's layer means by SVDs of its own centred rows (the definition), one half at a
    time: the CKA diagonal and the activation and error similarities above chance, with at most
    m - 1 directions (the rank of m centred rows)."""
    picks = halves(len(x))
    out = {"cka": [], "activation": [], "error": []}
    for rows in picks:
        sums = dict.fromkeys(out, 0.0)
        for layer in range(x.shape[1]):
            xs, ys = (torch.from_numpy(v[rows, layer]) for v in (x, y))
            size = min(int(k[layer]), len(rows) - 1)
            sums["cka"] += debiased_cka(xs.numpy(), ys.numpy())
            for metric, values in (("activation", ys), ("error", ys - xs)):
                similarity = float(torch.linalg.matrix_norm(_top(xs, size).T @ _top(values, size)) ** 2 / size)
                chance = k[layer] / width
                sums[metric] += (similarity - chance) / (1 - chance)
        for metric in out:
            out[metric].append(sums[metric] / x.shape[1])
    return out


@pytest.mark.parametrize("k", [[5, 8], [14, 3]], ids=["k-below-the-half", "k-above-the-half"])
def test_half_sample_intervals_equal_one_svd_a_half(tmp_path, k):
    """The batched Gram-matrix route gives each half the statistics its own SVDs give (24 prompts:
    halves of 12 rows span 11 directions, so k = 14 uses 11)."""
    x = _random(24, 30, 2, 7)
    y = x + 0.5 * _random(24, 30, 2, 8)
    centres = {"cka": 0.5, "activation": 0.4, "error": 0.1}
    found = layer_mean_intervals(_spilled(tmp_path / "x", x), _spilled(tmp_path / "y", y), np.array(k), centres)
    expected = _halves_by_svd(x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64), k, 30)
    for metric, values in expected.items():
        assert found[metric] == pytest.approx(spread(values, centres[metric]), abs=2e-6), metric
