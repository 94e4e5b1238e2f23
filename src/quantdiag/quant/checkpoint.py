"""A user's checkpoint as a compared setting: a GPTQ or AWQ Hugging Face folder (dequantized with
GPTQModel's own kernels), a GGUF file (dequantized by transformers, as the reference can be) or a
float folder of the same architecture. Only the block linears are read: the WeightBank swaps
them into the reference model, as it does for quantdiag's own settings."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from gguf import GGUFReader
from safetensors import safe_open
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from quantdiag.errors import QuantdiagError
from quantdiag.model.arch import check_supported
from quantdiag.model.load import converted_gguf, folder_config, gguf_family, gguf_reader
from quantdiag.quant.spec import REFERENCE_BITS, QuantSpec
from quantdiag.storage import content_hash, file_digest

#: Tensor name -> the open safetensors reader that holds it.
Readers = dict[str, Any]
#: Parts of each quantized linear in a GPTQ or AWQ checkpoint.
_PACKED = ("qweight", "qzeros", "scales")
#: GGUF tensor types that hold plain floats, not quantized weights.


@dataclass(frozen=True)
class CheckpointSpec:
    """One checkpoint to compare: where it is, what format, its bits (GPTQ's and AWQ's nominal
    integer, a GGUF's measured bits per weight). Its ``method`` is its own name: its Robust and
    Failure subsets are its own."""

    path: str
    kind: str
    bits: float
    name: str
    version: str  # changes when the files do: part of the cache key
    quantization: Mapping | None = field(default=None, compare=False)  # its quantization_config
    eora_rank: ClassVar[int] = 0
    #: Its weights are read from its files, whatever the calibration.
    reads_calibration: ClassVar[bool] = False

    @property
    def key(self) -> str:
        """``ckpt-w<bits>-<name>-<version>`` (a GGUF's bits as measured, e.g. ``ckpt-w4.5-..``)."""
        return f"ckpt-w{self.bits:g}-{self.method}-{self.version}"

    @property
    def method(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "checkpoint"

    @property
    def label(self) -> str:
        if self.kind == "float":
            return f"{self.name} ({self.kind})"
        bits = f"{self.bits:.2f}" if self.kind == "gguf" else str(self.bits)
        return f"{self.name} ({self.kind.upper()} {bits}-bit)"

    def defines_subsets(self, bits: int) -> bool:
        """A checkpoint's failures define its own subsets, whatever its bits."""
        return True


#: What a run compares with its reference: one of quantdiag's settings, or a user's checkpoint.
ComparedSpec = QuantSpec | CheckpointSpec


@cache
def inspect_checkpoint(source: str) -> CheckpointSpec:
    """Find what ``source`` is (a .gguf file, or a folder with config.json) without reading weights."""
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise QuantdiagError(f"checkpoint not found: {source}")
    version = content_hash(*sorted((p.name, file_digest(p)) for p in _files(path)), length=8)  # by content
    if path.is_file():
        if path.suffix != ".gguf":
            raise QuantdiagError(
                f"checkpoint {source} is a file but not .gguf: give a GGUF file or a Hugging Face folder"
            )
        reader = gguf_reader(path)
        check_supported(gguf_family(path, reader), source)
        return CheckpointSpec(str(path), "gguf", _gguf_bits(path, reader), path.stem, version)
    if not (path / "config.json").is_file():
        raise QuantdiagError(f"checkpoint folder {source} has no config.json: not a Hugging Face model")
    config = folder_config(path)
    check_supported(config.get("model_type"), source)
    quantization = config.get("quantization_config")
    if quantization is None:
        return CheckpointSpec(str(path), "float", REFERENCE_BITS, path.name, version)
    method = str(quantization.get("quant_method", "")).lower() if isinstance(quantization, dict) else ""
    if method not in ("gptq", "awq"):
        raise QuantdiagError(
            f"checkpoint {source} is quantized with '{method}': quantdiag reads GPTQ, AWQ, GGUF and float checkpoints"
        )
    return CheckpointSpec(str(path), method, _quantized_bits(quantization, source), path.name, version, quantization)


def _quantized_bits(quantization: Mapping, source: str) -> int:
    """A GPTQ or AWQ quantization_config's ``bits`` (AWQ's older ``w_bit``): an integer 2..8."""
    bits = quantization.get("bits", quantization.get("w_bit"))
    if bits is None:
        raise QuantdiagError(f"checkpoint {source}: its quantization_config has no bits")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise QuantdiagError(f"checkpoint {source}: its quantization_config gives {bits!r} bits, not an integer 2..8")
    return bits


def _files(path: Path) -> Iterator[Path]:
    return iter([path]) if path.is_file() else (p for p in path.iterdir() if p.is_file())


def _gguf_bits(path: Path, reader: GGUFReader) -> float:
    """Measured bits per weight of the 2-D tensors of the file's blocks (``blk.*``: the linears
    quantdiag compares, quantized or float; not the embeddings or head), bytes x 8 / weights:
    Q4_0 4.5, Q8_0 8.5, F16 16."""
    matrices = [t for t in reader.tensors if len(t.shape) == 2 and t.name.startswith("blk.")]
    if not matrices:
        raise QuantdiagError(f"GGUF file '{path}' has no block weight matrices (blk.*)")
    return round(8 * sum(int(t.n_bytes) for t in matrices) / sum(int(t.n_elements) for t in matrices), 4)


def checkpoint_reader(
    spec: CheckpointSpec,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    shapes: Mapping[str, tuple[int, int]],
) -> Callable[[str], torch.Tensor]:
    """After checking that the checkpoint's architecture and tokenizer match the reference's, a
    function giving the float weight of one linear of ``shapes`` (module name -> the reference's
    shape), read from its file when asked (a checkpoint is never held whole) and checked for shape."""
    folder = converted_gguf(Path(spec.path)) if spec.kind == "gguf" else Path(spec.path)
    _check_architecture(spec, folder, config)
    _check_tokenizer(spec, folder, tokenizer)
    tensors = _open_tensors(folder)

    def read(name: str) -> torch.Tensor:
        shape = shapes[name]
        if spec.kind in ("gptq", "awq"):
            weight = _dequantized(spec, name, shape, tensors)
        else:
            weight = _read(tensors, f"{name}.weight", spec).float()
        if tuple(weight.shape) != tuple(shape):
            raise QuantdiagError(
                f"checkpoint {spec.name}: {name} has shape {tuple(weight.shape)}, the reference's is {tuple(shape)}"
            )
        return weight

    return read


def _check_architecture(spec: CheckpointSpec, folder: Path, config: PretrainedConfig) -> None:
    """Same model type, depth and width as the reference (the config.json of the checkpoint)."""
    theirs = folder_config(folder)
    for key in ("model_type", "num_hidden_layers", "hidden_size"):
        if theirs.get(key) != getattr(config, key, None):
            raise QuantdiagError(
                f"checkpoint {spec.name} does not match the reference: {key} is {theirs.get(key)}, the reference's is "
                f"{getattr(config, key, None)}"
            )


def _check_tokenizer(spec: CheckpointSpec, folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Same vocabulary as the reference, when the checkpoint ships a tokenizer."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return
    try:
        theirs = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise QuantdiagError(f"checkpoint {spec.name}: cannot read its tokenizer ({exc})") from exc
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise QuantdiagError(
            f"checkpoint {spec.name} has a different tokenizer from the reference's ({len(theirs)} vs "
            f"{len(tokenizer)} tokens)"
        )


def _open_tensors(folder: Path) -> Readers:
    """Tensor name -> the open (memory-mapped) reader of the safetensors file holding it; each
    file is opened once."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QuantdiagError(f"no .safetensors files in {folder}: quantdiag reads safetensors checkpoints")
    readers = {}
    for file in files:
        reader = safe_open(str(file), framework="pt")
        readers.update(dict.fromkeys(reader.keys(), reader))
    return readers


def _read(tensors: Readers, name: str, spec: CheckpointSpec) -> torch.Tensor:
    if name not in tensors:
        raise QuantdiagError(f"checkpoint {spec.name} has no tensor {name}: not the reference's architecture")
    return tensors[name].get_tensor(name)


def _dequantized(spec: CheckpointSpec, name: str, shape: tuple[int, int], tensors: Readers) -> torch.Tensor:
    """One packed linear back to float (out x in), by GPTQModel's GPTQ or AWQ kernels."""
    quantization = spec.quantization or {}
    group_size = int(quantization.get("group_size", quantization.get("q_group_size", -1)))
    group_size = shape[1] if group_size <= 0 else group_size
    packed = {part: _read(tensors, f"{name}.{part}", spec) for part in _PACKED}
    groups = -(-shape[1] // group_size)
    if tuple(packed["scales"].shape) != (groups, shape[0]):
        raise QuantdiagError(
            f"checkpoint {spec.name}: {name} has scales of shape {tuple(packed['scales'].shape)}, the reference's "
            f"layer needs {(groups, shape[0])}"
        )
    if spec.kind == "awq":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        return dequantize_gemm(packed["qweight"], packed["qzeros"], packed["scales"], spec.bits, group_size).T.float()
    g_idx = f"{name}.g_idx"
    packed["g_idx"] = (
        _read(tensors, g_idx, spec) if g_idx in tensors else torch.arange(shape[1], dtype=torch.int32) // group_size
    )
    return _gptq_dequantized(spec, packed, shape, group_size)


def _gptq_dequantized(
    spec: CheckpointSpec, packed: dict[str, torch.Tensor], shape: tuple[int, int], group_size: int
) -> torch.Tensor:
    """GPTQModel's torch kernel, given the checkpoint's buffers; v1 checkpoints (zeros stored
    minus one, GPTQ's original format) are converted to the v2 the kernel computes with."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    quantization = spec.quantization or {}
    sym, desc_act = bool(quantization.get("sym", True)), bool(quantization.get("desc_act", False))
    module = TorchLinear(
        bits=spec.bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        in_features=shape[1],
        out_features=shape[0],
        register_buffers=True,
    )
    for part, tensor in packed.items():
        getattr(module, part).data = tensor
    if quantization.get("checkpoint_format", quantization.get("format", "gptq")) == "gptq":
        module.qzero_format(format=1)
        convert_gptq_v1_to_v2_format_module(module, bits=spec.bits, pack_dtype=torch.int32)
    module.eval()
    return module.dequantize_weight().T.float()
