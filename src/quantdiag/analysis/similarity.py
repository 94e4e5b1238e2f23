"""Representation similarity (docs/methods.md, Representations) computed from spilled rows, block by block, exactly.

* Debiased linear CKA (the unbiased HSIC estimator of Song et al. 2012, as used for CKA by
  Nguyen et al. 2021) of x's layer i against y's layer j, the whole L x L matrix. Linear CKA's
  plain estimator reads about d / (d + n) on unrelated rows (0.95 at n = 30, d = 576); this one
  reads 0 on average. Its terms (the Gram matrices' off-diagonal products, sums and row sums)
  add up over pairs of row blocks of centred Gram blocks. Memory: a few (L, block, block)
  arrays and (L, rows) row sums.
* Subspaces: the top right singular vectors of a column-centred activation matrix are the top
  eigenvectors of its (d x d) covariance, which streams row block by row block (with no more rows
  than d, the matrix itself is smaller and its SVD is taken instead). On the halves of a subset
  (intervals) the similarities come from the halves' (m x m) Gram matrices, many halves at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from quantdiag.analysis.spill import LayerRows

#: Share of the spectral energy (sum of sigma^2) the top-k directions must hold.
ENERGY = 0.9
#: The unbiased HSIC estimator divides by n (n - 1) (n - 2) (n - 3): it needs 4 prompts.
CKA_MIN_PROMPTS = 4
#: Rows per block: memory of the CKA is about 4 x layers x BLOCK^2 floats.
BLOCK = 256


def cka_matrix(x: LayerRows, y: LayerRows, device: torch.device | str = "cpu", block: int = BLOCK) -> np.ndarray:
    """(x.layers, y.layers) debiased linear CKA between x's layers and y's, over the same rows
    (NaN with fewer than ``CKA_MIN_PROMPTS`` rows)."""
    n = x.count
    cross = torch.zeros(x.layers, y.layers, dtype=torch.float64, device=device)
    own = {"x": torch.zeros(x.layers, dtype=torch.float64, device=device)}
    own["y"] = torch.zeros(y.layers, dtype=torch.float64, device=device)
    sums = {"x": torch.zeros_like(own["x"]), "y": torch.zeros_like(own["y"])}
    row_sums = {
        name: torch.zeros(rows.layers, n, dtype=torch.float64, device=device) for name, rows in (("x", x), ("y", y))
    }
    starts = range(0, n, block)
    for a in starts:
        for b in (b for b in starts if b >= a):
            weight = 1.0 if a == b else 2.0  # the (b, a) block is the transpose: same products
            grams = {"x": _centred_grams(x, a, b, block, device), "y": _centred_grams(y, a, b, block, device)}
            if a == b:
                for gram in grams.values():
                    gram.diagonal(dim1=1, dim2=2).zero_()
            cross += weight * grams["x"].flatten(1) @ grams["y"].flatten(1).T
            for name, gram in grams.items():
                own[name] += weight * (gram * gram).sum((1, 2))
                sums[name] += weight * gram.sum((1, 2))
                row_sums[name][:, a : a + gram.shape[1]] += gram.sum(2)
                if a != b:
                    row_sums[name][:, b : b + gram.shape[2]] += gram.sum(1)

    def hsic(p: str, q: str, products: torch.Tensor) -> torch.Tensor:  # every pair (i, j) of layers
        return unbiased_hsic(products, torch.outer(sums[p], sums[q]), row_sums[p] @ row_sums[q].T, n)

    xx = torch.diagonal(hsic("x", "x", torch.diag(own["x"])))
    yy = torch.diagonal(hsic("y", "y", torch.diag(own["y"])))
    return (hsic("x", "y", cross) / torch.outer(xx, yy).sqrt()).cpu().numpy()


def unbiased_hsic(
    products: torch.Tensor, sum_products: torch.Tensor, row_products: torch.Tensor, n: int
) -> torch.Tensor:
    """Song et al.'s unbiased HSIC from Gram matrices K, L with zero diagonals:
    ``[tr(KL) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3))``, elementwise over the terms
    given: ``products`` tr(KL), ``sum_products`` 1'K1 1'L1, ``row_products`` 1'KL1 (= K1 . L1).
    NaN below 4 rows."""
    if n < CKA_MIN_PROMPTS:
        return torch.full_like(products, float("nan"))
    return (products + sum_products / ((n - 1) * (n - 2)) - 2 / (n - 2) * row_products) / (n * (n - 3))


def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA of two in-memory (rows x width) matrices (``cka_matrix``'s estimator)."""
    return float(gram_cka(*(centred_gram(values) for values in (x, y))))


def centred_gram(values: np.ndarray) -> torch.Tensor:
    """``Xc Xc^T`` (float64) of the column-centred rows of ``values``."""
    centred = torch.from_numpy(np.asarray(values, dtype=np.float64))
    centred = centred - centred.mean(0)
    return centred @ centred.T


def gram_cka(gram_x: torch.Tensor, gram_y: torch.Tensor) -> torch.Tensor:
    """Debiased linear CKA from (... x n x n) Gram matrices (their diagonals are ignored), one per
    leading index. The unbiased HSIC does not change when the rows are re-centred, so Gram
    matrices of a subset of rows, cut from the whole set's, give the subset's CKA."""
    n = gram_x.shape[-1]
    grams = [gram.clone() for gram in (gram_x, gram_y)]
    for gram in grams:
        gram.diagonal(dim1=-2, dim2=-1).zero_()
    sums = [gram.sum((-2, -1)) for gram in grams]
    rows = [gram.sum(-1) for gram in grams]

    def hsic(p: int, q: int) -> torch.Tensor:
        products = (grams[p] * grams[q]).sum((-2, -1))
        return unbiased_hsic(products, sums[p] * sums[q], (rows[p] * rows[q]).sum(-1), n)

    return hsic(0, 1) / (hsic(0, 0) * hsic(1, 1)).sqrt()


def above_chance(similarity: np.ndarray, k: np.ndarray, width: int) -> np.ndarray:
    """Subspace similarity above chance, (s - k/d) / (1 - k/d): two random k-dimensional
    subspaces of a d-dimensional space overlap k/d."""
    chance = np.asarray(k, dtype=float) / width
    return (np.asarray(similarity, dtype=float) - chance) / (1 - chance)


def centre_grams(grams: torch.Tensor) -> torch.Tensor:
    """``H G H`` for each (m x m) Gram matrix ``X Y^T`` of a batch, ``H = I - 11^T / m``: the Gram
    matrix of the column-centred rows."""
    return grams - grams.mean(-1, keepdim=True) - grams.mean(-2, keepdim=True) + grams.mean((-2, -1), keepdim=True)


def gram_subspace_similarity(xx: torch.Tensor, vv: torch.Tensor, xv: torch.Tensor, k: int) -> torch.Tensor:
    """Per batch item, ``||A^T B||_F^2 / k`` for the top-k right singular vectors A of X and B of V,
    from the centred Gram matrices ``XX^T``, ``VV^T`` and ``XV^T`` (batch x m x m) alone: with
    ``X = U S A^T``, ``A = X^T U S^-1``, so ``A^T B = S_x^-1 U_x^T (X V^T) U_v S_v^-1``. k is at most
    m - 1, the rank of m centred rows."""

    def scaled_top(gram: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(gram)  # ascending
        return vectors[..., -k:] / values[..., -k:].clamp_min(torch.finfo(gram.dtype).tiny).sqrt().unsqueeze(-2)

    cross = scaled_top(xx).transpose(-1, -2) @ xv @ scaled_top(vv)
    return (cross**2).sum((-2, -1)) / k


def _centred_grams(rows: LayerRows, a: int, b: int, block: int, device: torch.device | str) -> torch.Tensor:
    """Per layer, the centred Gram block ``X[a:a+block] X[b:b+block]^T`` (layers x rows x rows, float64)."""

    def centred(layer: int, start: int) -> torch.Tensor:
        values = torch.from_numpy(rows.block(layer, start, start + block)).to(device, torch.float64)
        return values - torch.from_numpy(rows.mean(layer)).to(device)

    return torch.stack([centred(layer, a) @ centred(layer, b).T for layer in range(rows.layers)])


def covering_k(eigenvalues: torch.Tensor, energy: float = ENERGY) -> int:
    """Smallest k whose largest eigenvalues (sigma^2) hold ``energy`` of their sum."""
    values = eigenvalues.clamp_min(0).sort(descending=True).values
    held = values.cumsum(0) / values.sum()
    return min(int((held < energy - 1e-12).sum()) + 1, len(values))


def subspace_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||A^T B||_F^2 / k`` for orthonormal (d x k) bases: 1 for the same subspace, 0 for
    orthogonal ones."""
    return float(torch.linalg.matrix_norm(a.T @ b) ** 2 / a.shape[1])


def subspace_stats(
    x: LayerRows,
    y: LayerRows,
    layer: int,
    device: torch.device | str = "cpu",
    energy: float = ENERGY,
    block: int = BLOCK,
) -> tuple[float, float, int]:
    """At ``layer``: similarity of y's top-k activation directions with x's, similarity of the
    error's (y - x) top-k directions with x's, and k (the smallest covering ``energy`` of x's);
    every matrix column-centred, so a mean direction both share does not count as agreement."""

    means = {name: torch.from_numpy(rows.mean(layer)).to(device) for name, rows in (("x", x), ("y", y))}

    def blocks(which: str) -> Iterator[torch.Tensor]:
        for start in range(0, x.count, block):
            xs = torch.from_numpy(x.block(layer, start, start + block)).to(device, torch.float64) - means["x"]
            ys = torch.from_numpy(y.block(layer, start, start + block)).to(device, torch.float64) - means["y"]
            yield {"x": xs, "y": ys, "error": ys - xs}[which]

    values, vectors = _spectrum(blocks("x"), x.count, x.width)
    k = covering_k(values, energy)
    base = vectors[:, :k]
    return (*(subspace_similarity(base, _spectrum(blocks(w), x.count, x.width)[1][:, :k]) for w in ("y", "error")), k)


def _spectrum(blocks: Iterator[torch.Tensor], rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values (descending) and right singular vectors (columns, same order) of
    the matrix made of ``blocks``: an SVD of the matrix itself when it has no more rows than
    columns, else the eigendecomposition of its (width x width) second moment. Memory is at
    most width^2 either way; the first is much faster for few prompts."""
    if rows <= width:
        _, singular, vh = torch.linalg.svd(torch.cat(list(blocks)), full_matrices=False)
        return singular**2, vh.T
    values, vectors = torch.linalg.eigh(sum(b.T @ b for b in blocks))
    return values.flip(0), vectors.flip(1)
