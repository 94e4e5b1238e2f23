"""Memory and disk against model size: a randomly initialised Llama-architecture model of about 1B
parameters (made from a config, no download) against one of SmolLM2-135M's shape, each with RTN at
8, 4, 3 and 2 bits in bfloat16 (the quick preset, recall only, 10 facts, from an empty cache).

Prints, per model, the run's peak resident memory (RSS, polled) against the model's own size, the
bank's disk per setting against the bf16 weights of the block linears, and the time per stage; as its
last line ``peak memory: <ratio>x one model`` for the 1B model (issue 18's goal: at most 1.5x).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import transformers

from quantdiag.model.load import load_reference
from quantdiag.report.profile import stage_totals

BITS = (8, 4, 3, 2)
#: The two shapes: SmolLM2-135M's, and TinyLlama-1.1B's (hidden 2048, 22 layers, 4 KV heads).
SHAPES = {
    "135M": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3},
    "1B": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
}  # fmt: skip


def save_random_model(shape: dict, folder: Path) -> int:
    """A seeded random Llama of ``shape`` in bfloat16 with SmolLM2's tokenizer; returns its bytes."""
    tokenizer = load_reference("smollm2", device="cpu").tokenizer
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **shape)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def linear_bytes(folder: Path) -> int:
    """bf16 bytes of the block linears (what the bank stores per setting)."""
    config = transformers.AutoConfig.from_pretrained(folder)
    d, f, heads, kv = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                       config.num_key_value_heads)  # fmt: skip
    per_block = d * d * 2 + 2 * d * (d // heads * kv) + 3 * d * f
    return 2 * per_block * config.num_hidden_layers


def run_polled(command: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, polled every 0.1 s) of ``command``."""
    start, peak = time.perf_counter(), 0
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watched = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit {process.returncode}")
    return time.perf_counter() - start, peak


def measure(name: str, tmp: Path) -> dict:
    folder = tmp / name
    model_bytes = save_random_model(SHAPES[name], folder)
    cache = tmp / f"cache-{name}"
    env = os.environ | {"QUANTDIAG_CACHE": str(cache), "GPTQMODEL_CPU_WORKERS": "2"}
    out = tmp / f"run-{name}"
    command = [sys.executable, "-m", "quantdiag", "run", "--model", str(folder), "--methods", "rtn"]
    command += ["--bits", ",".join(map(str, BITS)), "--preset", "quick", "--analyses", "none", "--relations", "P37"]
    command += ["--facts", "10", "--device", "cpu", "--dtype", "bfloat16", "--profile", "--out", str(out)]
    seconds, peak = run_polled(command, env)
    disk = {bits: sum(p.stat().st_size for p in cache.glob(f"weights/*/rtn-w{bits}-*/*.safetensors")) for bits in BITS}
    profile = json.loads((out / "results.json").read_text())["profile"]
    return {"model": model_bytes, "linears": linear_bytes(folder), "peak": peak, "seconds": seconds,
            "disk": disk, "stages": stage_totals(profile)}  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="quantdiag-scale-") as tmp:
        rows = {name: measure(name, Path(tmp)) for name in SHAPES}
    gib = 2**30
    for name, row in rows.items():
        print(f"{name}: model {row['model'] / gib:.2f} GiB, peak RSS {row['peak'] / gib:.2f} GiB "
              f"({row['peak'] / row['model']:.2f}x one model), {row['seconds']:.0f} s")  # fmt: skip
        for bits, size in row["disk"].items():
            print(f"  RTN {bits}-bit on disk: {size / gib:.2f} GiB ({size / row['linears']:.2f}x the bf16 linears)")
        stages = ", ".join(f"{stage} {cost['computed']:.0f} s" for stage, cost in row["stages"].items())
        print(f"  stages: {stages}")
    ratio = {name: row["peak"] / row["model"] for name, row in rows.items()}
    print(f"peak memory 1B / 135M: {rows['1B']['peak'] / rows['135M']['peak']:.2f}x for "
          f"{rows['1B']['model'] / rows['135M']['model']:.2f}x the weights")  # fmt: skip
    print(f"peak memory: {ratio['1B']:.2f}x one model")


if __name__ == "__main__":
    main()
