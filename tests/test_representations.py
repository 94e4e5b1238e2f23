"""Representation similarity (METHODS 5): CKA and subspace properties with hypothesis, the
streamed statistics against whole-matrix formulas, and the pass on tiny models."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdiag.analysis.representations import POSITIONS, STREAMS, SUBSPACE_METRICS, representation_arrays
from quantdiag.analysis.similarity import cka_matrix, covering_k, subspace_stats
from quantdiag.analysis.spill import LayerRows
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, QuantSpec

shapes = st.tuples(
    st.integers(4, 24), st.integers(2, 30), st.integers(1, 3), st.integers(0, 2**16)
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


def _whole_cka(x: np.ndarray, y: np.ndarray) -> float:
    """METHODS 5, on whole matrices: ||Yc^T Xc||^2 / (||Xc^T Xc|| ||Yc^T Yc||)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


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
        return np.linalg.svd(matrix, full_matrices=False)[2][:k].T

    sigma2 = np.linalg.svd(x[:, 0], compute_uv=False) ** 2
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
    prompts = [tokenize(family_model.tokenizer, fact, i) for i, fact in enumerate(load_pararel(["P19"], 12, 0))]
    subsets = {"rtn:failure": prompts[:7], "rtn:robust": prompts[7:]}
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
