"""The cost model (``quantdiag.cost_model``, docs/performance.md) against a profiled run, and its
prediction for Llama-3.1-8B and Llama-3.1-70B on one H100.

``python benchmarks/cost_model.py RUN_DIR`` (a run made with ``--profile``): per stage the modelled
operations, the measured seconds (stages computed, not read from caches) and the rate they imply;
then, at the run's mean rate on its own machine and at an assumed H100 rate, the full preset on
both Llama models (4 bit widths x 2 methods, every analysis, three streams) and the stage that
dominates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from transformers import LlamaConfig

from quantdiag.config import PRESETS, RunConfig
from quantdiag.cost_model import ModelShape, RunSizes, stage_flops

#: Shapes from the models' config.json (meta-llama/Llama-3.1-8B and -70B): layers, hidden,
#: intermediate, heads, key-value heads, vocabulary.
LLAMA = {
    "Llama-3.1-8B": (32, 4096, 14336, 32, 8, 128256),
    "Llama-3.1-70B": (80, 8192, 28672, 64, 8, 128256),
}
#: An assumption, not a measurement: H100 SXM's dense bfloat16 peak (989 TFLOP/s) at 40% use.
H100_RATE = 0.4 * 989e12
#: ParaRel relations the full preset samples, and its subsets' share of the facts (SmolLM2's demo).
RELATIONS = 39


def llama_shape(layers: int, hidden: int, intermediate: int, heads: int, kv: int, vocab: int) -> ModelShape:
    """The shape of a Llama config with these sizes (built, not downloaded)."""
    config = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
    )
    return ModelShape.from_config(config)


def run_sizes(results: dict) -> RunSizes:
    """The sizes of the run ``results.json`` describes."""
    config, settings = results["config"], results["settings"][1:]
    subsets = [sum(v for k, v in named.items() if k != "defined_by") for named in results["subsets"].values()]
    return RunSizes(
        facts=results["facts"]["count"],
        robustness=results["facts"]["robustness_prompts"],
        tokens=results["facts"]["mean_tokens"],
        settings=len(settings),
        gptq=sum(s["method"] == "gptq" for s in settings),
        calibration_tokens=config["calib_samples"] * config["calib_length"],
        causal=sum("causal" in s for s in settings),
        patch_prompts=config["patch_prompts"],
        subsets=2,
        streams=len(config["streams"]),
        subset_prompts=int(np.mean(subsets)) if subsets else 0,
        sensitivity=sum("sensitivity" in s for s in settings),
        repairs=sum("repairs" in s for s in settings),
        methods=len(results["subsets"]),
    )


def full_preset(facts_kept: float, tokens: float) -> RunSizes:
    """The full preset on every setting (8), its facts, and Robust plus Failure a ``facts_kept`` share."""
    preset, config = PRESETS["full"], RunConfig()
    facts = RELATIONS * preset["facts_per_relation"]
    return RunSizes(
        facts=facts,
        robustness=preset["robustness_facts"] * preset["max_paraphrases"],
        tokens=tokens,
        settings=8,
        gptq=4,
        calibration_tokens=128 * 2048,  # the README's 8B example: --calib-samples 128 --calib-length 2048
        causal=8,
        patch_prompts=preset["patch_prompts"],
        subsets=2,
        streams=len(config.streams),
        subset_prompts=round(facts * facts_kept),
        sensitivity=8,
        repairs=8,
        methods=2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    results = json.loads((args.run_dir / "results.json").read_text())
    if not results.get("profile"):
        raise SystemExit(f"{args.run_dir}: not a profiled run (quantdiag run ... --profile)")
    config = json.loads((args.run_dir / "config.json").read_text())
    shape = ModelShape.from_config(_model_config(config["model"]))
    flops = stage_flops(shape, run_sizes(results))
    seconds = dict.fromkeys(flops, 0.0)
    for cost in results["profile"]["stages"]:
        if cost["stage"] in seconds and not cost["cached"]:
            seconds[cost["stage"]] += cost["wall_s"]
    print(f"{'stage':16s} {'GFLOP':>10s} {'seconds':>9s} {'GFLOP/s':>9s}")
    for stage, work in flops.items():
        rate = work / seconds[stage] / 1e9 if seconds[stage] else float("nan")
        print(f"{stage:16s} {work / 1e9:10.1f} {seconds[stage]:9.1f} {rate:9.1f}")
    measured = sum(flops.values()) / sum(seconds.values())
    print(f"mean rate of this run: {measured / 1e9:.1f} GFLOP/s")
    kept = run_sizes(results).subset_prompts / max(1, results["facts"]["count"])
    for name, dims in LLAMA.items():
        predicted = stage_flops(llama_shape(*dims), full_preset(kept, results["facts"]["mean_tokens"]))
        total = sum(predicted.values())
        top = max(predicted, key=predicted.get)
        print(
            f"{name}, full preset, 8 settings: {total / 1e15:.1f} PFLOP; on one H100 at 40% of peak "
            f"{total / H100_RATE / 60:.0f} min; at this run's rate {total / measured / 3600:.0f} h; "
            f"dominant: {top} ({100 * predicted[top] / total:.0f}%)"
        )


def _model_config(model: str):
    """The reference's transformers config, without loading its weights."""
    from transformers import AutoConfig

    from quantdiag.model.load import DEFAULT_MODEL, builtin_gguf, converted_gguf

    source = converted_gguf(builtin_gguf()) if model == DEFAULT_MODEL else model
    return AutoConfig.from_pretrained(source)


if __name__ == "__main__":
    main()
