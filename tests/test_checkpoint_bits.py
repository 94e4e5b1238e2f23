"""A GGUF checkpoint's bits are its measured bits per weight over its blocks' 2-D tensors,
against the block sizes of ggml's formats worked by hand (Q4_0: 32 weights in 18 bytes = 4.5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

from quantdiag.quant.checkpoint import inspect_checkpoint
from quantdiag.quant.spec import QuantSpec, average_bits

RNG = np.random.default_rng(0)


def _matrix(rows: int, columns: int, kind: Q) -> tuple[np.ndarray, Q | None]:
    """A random matrix stored as ``kind``: quantized by gguf's own code (floats as numpy)."""
    weights = RNG.standard_normal((rows, columns)).astype(np.float32)
    if kind == Q.F16:
        return weights.astype(np.float16), None
    return quants.quantize(weights, kind), kind


def _write(path: Path, tensors: dict[str, tuple[int, int, Q]]) -> Path:
    """A llama GGUF file holding ``tensors`` (name -> rows, columns, type) and a 1-D F32 norm."""
    writer = GGUFWriter(str(path), "llama")
    for name, (rows, columns, kind) in tensors.items():
        data, raw = _matrix(rows, columns, kind)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("tensors", "bits", "label"),
    [
        ({"blk.0.attn_q.weight": (64, 64, Q.Q4_0)}, 4.5, "GGUF 4.50-bit"),  # 18 bytes / 32 weights
        ({"blk.0.attn_q.weight": (64, 64, Q.Q8_0)}, 8.5, "GGUF 8.50-bit"),  # 34 bytes / 32 weights
        ({"blk.0.attn_q.weight": (64, 256, Q.TQ1_0)}, 1.6875, "GGUF 1.69-bit"),  # 54 bytes / 256 weights
        ({"blk.0.attn_q.weight": (64, 64, Q.MXFP4)}, 4.25, "GGUF 4.25-bit"),  # 17 bytes / 32 weights
        ({"blk.0.attn_q.weight": (64, 64, Q.F16)}, 16.0, "GGUF 16.00-bit"),  # no quantized tensor: the floats
        # a tie of two types: 4096 weights at 4.5 and 4096 at 8.5
        ({"blk.0.attn_q.weight": (64, 64, Q.Q4_0), "blk.0.attn_k.weight": (64, 64, Q.Q8_0)}, 6.5, "GGUF 6.50-bit"),
        # 4096 at 4.5, 8192 at 8.5: (4096 x 4.5 + 8192 x 8.5) / 12288 = 43 / 6
        ({"blk.0.attn_q.weight": (64, 64, Q.Q4_0), "blk.0.ffn_up.weight": (128, 64, Q.Q8_0)}, 7.1667, "GGUF 7.17-bit"),
        # a float matrix in a block is one of the compared linears, at 16 bits:
        # (4096 x 4.5 + 8192 x 16) / 12288 = 12.1667
        ({"blk.0.attn_q.weight": (64, 64, Q.Q4_0), "blk.0.ffn_up.weight": (128, 64, Q.F16)}, 12.1667, "GGUF 12.17-bit"),
        # nor are the embeddings and head, quantized or not: only the blocks' linears are compared
        (
            {
                "blk.0.attn_q.weight": (64, 64, Q.Q4_0),
                "token_embd.weight": (256, 64, Q.Q8_0),
                "output.weight": (256, 64, Q.F16),
            },
            4.5,
            "GGUF 4.50-bit",
        ),
    ],
    ids=["q4_0", "q8_0", "tq1_0", "mxfp4", "f16", "tie", "mixed", "float-beside", "embeddings-beside"],
)
def test_gguf_bits_are_measured_bits_per_weight(tmp_path, tensors, bits, label):
    spec = inspect_checkpoint(str(_write(tmp_path / "model.gguf", tensors)))
    assert spec.bits == bits
    assert spec.label == f"model ({label})"
    assert spec.key.startswith(f"ckpt-w{bits:g}-model-")


def test_fractional_checkpoint_bits_weigh_in_average_bits(tmp_path):
    """Two equal linears, one at a Q4_0 GGUF's 4.5 bits and one at 8-bit RTN: 6.25 on average."""
    spec = inspect_checkpoint(str(_write(tmp_path / "q4.gguf", {"blk.0.attn_q.weight": (64, 64, Q.Q4_0)})))
    assert spec.key.startswith("ckpt-w4.5-q4-")
    shapes = {"a": (64, 64), "b": (64, 64)}
    assert average_bits({"a": spec, "b": QuantSpec("rtn", 8)}, shapes) == 6.25
