"""Activation rows spilled to disk, one file per layer, read back in row blocks.

Statistics over every pair of rows (the layer x layer CKA) need all rows, but not all at once:
with the rows on disk they are computed block by block, so memory does not grow with the
number of prompts. Reads are plain file reads (not mmap): a block costs its own size and
leaves no resident pages behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_DTYPE = np.dtype(np.float32)


class LayerRows:
    """Rows (prompts) x width activations of every layer of one model, stream and position."""

    def __init__(self, folder: Path, layers: int, width: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.layers, self.width = folder, layers, width
        self.count = 0
        self._sums = np.zeros((layers, width))

    def append(self, values: np.ndarray) -> None:
        """Add rows: ``values`` is (rows, layers, width)."""
        values = np.asarray(values, dtype=_DTYPE)
        for layer in range(self.layers):
            with self._file(layer).open("ab") as handle:
                values[:, layer].tofile(handle)
        self._sums += values.sum(0, dtype=np.float64)
        self.count += len(values)

    def mean(self, layer: int) -> np.ndarray:
        """Column means of ``layer`` (float64), kept as rows arrive."""
        return self._sums[layer] / self.count

    def block(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``layer`` as a (rows, width) float32 array."""
        stop = min(stop, self.count)
        with self._file(layer).open("rb") as handle:
            handle.seek(start * self.width * _DTYPE.itemsize)
            flat = np.fromfile(handle, dtype=_DTYPE, count=(stop - start) * self.width)
        return flat.reshape(stop - start, self.width)

    def _file(self, layer: int) -> Path:
        return self.folder / f"layer{layer}.f32"
