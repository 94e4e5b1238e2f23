"""Representation similarity (docs/methods.md, Representations) computed from spilled rows, block by block, exactly.

* Linear CKA (Kornblith et al. 2019) of x's layer i against y's layer j, the whole L x L matrix:
  ``||Yc^T Xc||_F^2 = <Xc Xc^T, Yc Yc^T>``, so it is a sum over pairs of row blocks of products
  of centred Gram blocks. Memory: a few (L, block, block) arrays, whatever the number of rows.
* Subspaces: the top right singular vectors of an activation matrix are the top eigenvectors of
  its (d x d) second-moment matrix, which streams row block by row block (with no more rows
  than d, the matrix itself is smaller and its SVD is taken instead).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from quantdiag.analysis.spill import LayerRows

#: Share of the spectral energy (sum of sigma^2) the top-k directions must hold.
ENERGY = 0.9
#: Linear CKA of centred rows needs 3 prompts: on 1 it is undefined, on 2 it is 1 whatever the rows.
CKA_MIN_PROMPTS = 3
#: Rows per block: memory of the CKA is about 4 x layers x BLOCK^2 floats.
BLOCK = 256


def cka_matrix(x: LayerRows, y: LayerRows, device: torch.device | str = "cpu", block: int = BLOCK) -> np.ndarray:
    """(x.layers, y.layers) linear CKA between x's layers and y's, over the same rows."""
    cross = torch.zeros(x.layers, y.layers, dtype=torch.float64, device=device)
    own_x = torch.zeros(x.layers, dtype=torch.float64, device=device)
    own_y = torch.zeros(y.layers, dtype=torch.float64, device=device)
    starts = range(0, x.count, block)
    for a in starts:
        for b in (b for b in starts if b >= a):
            weight = 1.0 if a == b else 2.0  # the (b, a) block is the transpose: same products
            gram_x = _centred_grams(x, a, b, block, device)
            gram_y = _centred_grams(y, a, b, block, device)
            cross += weight * gram_x @ gram_y.T
            own_x += weight * (gram_x * gram_x).sum(1)
            own_y += weight * (gram_y * gram_y).sum(1)
    return (cross / torch.outer(own_x, own_y).sqrt()).cpu().numpy()


def _centred_grams(rows: LayerRows, a: int, b: int, block: int, device: torch.device | str) -> torch.Tensor:
    """Per layer, the centred Gram block ``X[a:a+block] X[b:b+block]^T``, flattened (float64)."""

    def centred(layer: int, start: int) -> torch.Tensor:
        values = torch.from_numpy(rows.block(layer, start, start + block)).to(device)
        return values - torch.from_numpy(rows.mean(layer)).to(device, values.dtype)

    return torch.stack([(centred(layer, a) @ centred(layer, b).T).flatten() for layer in range(rows.layers)]).double()


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
    error's (y - x) top-k directions with x's, and k (the smallest covering ``energy`` of x's)."""

    def blocks(which: str) -> Iterator[torch.Tensor]:
        for start in range(0, x.count, block):
            xs = torch.from_numpy(x.block(layer, start, start + block)).to(device, torch.float64)
            ys = torch.from_numpy(y.block(layer, start, start + block)).to(device, torch.float64)
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
