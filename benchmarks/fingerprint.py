"""What the weight fingerprint (every tensor hashed) adds to loading a model.

On SmolLM2's converted folder: the load itself, the fingerprint the first time (its safetensors
files hashed) and later (file hashes cached), and the in-memory fallback (every tensor hashed);
then the same for a ~1 GB set of random float32 tensors in one safetensors file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quantdiag.model.arch import Adapter
from quantdiag.model.load import builtin_gguf, converted_gguf, state_digest, weights_fingerprint
from quantdiag.storage import file_digest


def seconds(action: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``action``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_time(action: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``action`` with an empty quantdiag cache each time (no cached file hash)."""
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["QUANTDIAG_CACHE"] = cache
            times.append(seconds(action, 1))
    return statistics.median(times)


def smollm2(cache: str) -> None:
    folder = converted_gguf(builtin_gguf())
    load = seconds(lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    adapter = Adapter(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    uncached = first_time(lambda: weights_fingerprint(adapter, folder))
    os.environ["QUANTDIAG_CACHE"] = cache
    weights_fingerprint(adapter, folder)
    cached = seconds(lambda: weights_fingerprint(adapter, folder))
    memory = seconds(lambda: weights_fingerprint(adapter))
    print(f"SmolLM2 converted folder ({size:.0f} MB float32): load {load:.2f} s")
    print(f"  fingerprint, files hashed: {uncached:.2f} s; file hashes cached: {cached * 1000:.0f} ms", end="")
    print(f"; in memory: {memory:.2f} s")


def random_set(gigabytes: float) -> None:
    count = round(gigabytes * 2**30 / (4096 * 4096 * 4))
    tensors = {f"t{i}": torch.randn(4096, 4096) for i in range(count)}
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "model.safetensors"
        save_file(tensors, str(file))
        load = seconds(lambda: load_file(str(file)))
        hashed = first_time(lambda: file_digest(file))
    module = torch.nn.ParameterDict({name: torch.nn.Parameter(tensor) for name, tensor in tensors.items()})
    memory = seconds(lambda: state_digest(module))
    print(f"random set, {count} x 4096 x 4096 float32 ({count * 64} MB): load {load:.2f} s")
    print(f"  file hashed: {hashed:.2f} s; in memory: {memory:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    args = parser.parse_args()
    smollm2(os.environ.get("QUANTDIAG_CACHE", str(Path.home() / ".cache" / "quantdiag")))
    random_set(args.gigabytes)


if __name__ == "__main__":
    main()
