"""A first-order cost model of a run (docs/performance.md): the floating-point operations of each
stage as a function of the model's shape (layers, widths, vocabulary) and the run's sizes (facts,
prompts a subset, settings, streams), so a run on another model or machine can be predicted from
a profiled one. Matrix products only: on these models they are nearly all of the work."""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantdiag.analysis.robustness import ANSWER_TOKENS
from quantdiag.quant.bank import EORA_SETTINGS_PER_PASS


@dataclass(frozen=True)
class ModelShape:
    """What a forward costs: ``layers`` blocks of ``block_params`` weights in linears (a
    mixture of experts counts its active experts), a ``hidden`` x ``vocab`` output head."""

    layers: int
    hidden: int
    intermediate: int
    block_params: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers config (``hidden_size``, ``num_attention_heads`` ...)."""
        heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        experts = getattr(config, "num_experts_per_tok", 1) or 1
        intermediate = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        attention = config.hidden_size * head_dim * (2 * heads + 2 * kv)
        mlp = 3 * config.hidden_size * intermediate * experts  # the router (hidden x experts) is negligible
        return cls(config.num_hidden_layers, config.hidden_size, intermediate, attention + mlp, config.vocab_size)

    def block_token(self) -> float:
        """One token through one block (2 operations a weight)."""
        return 2.0 * self.block_params

    def head_token(self) -> float:
        """One position unembedded."""
        return 2.0 * self.hidden * self.vocab


@dataclass(frozen=True)
class RunSizes:
    """The sizes a run's cost depends on: ``facts`` primary prompts and ``robustness`` paraphrase
    prompts (each answered in at most ``ANSWER_TOKENS`` tokens) of ``tokens`` tokens on average;
    ``settings`` compared (the reference apart), of which ``gptq`` calibrate on
    ``calibration_tokens``; ``causal`` settings traced on ``patch_prompts`` prompts of each of
    their ``subsets`` per stream in ``streams``; ``subset_prompts`` Robust plus Failure prompts of
    a setting (components, representations, sensitivity and repairs read them); ``sensitivity``
    and ``repairs``: how many settings get those; the reference is traced (ablation) on the
    subsets of each of ``methods``."""

    facts: int
    robustness: int
    tokens: float
    settings: int
    gptq: int
    calibration_tokens: int
    causal: int
    patch_prompts: int
    subsets: int
    streams: int
    subset_prompts: int
    sensitivity: int
    repairs: int
    methods: int = 1
    alphas: int = 10


#: Plans each repair table evaluates (baseline, EoRA, early, kurtosis, early+EoRA) plus amplification.
REPAIR_PASSES = 6
#: Component groups of the sensitivity map (the paper's Table 5).
COMPONENT_PLANS = 8
#: GPTQ runs each block's inputs once per true-sequential group (q/k/v, o, gate/up, down) up to it.
GPTQ_BLOCK_PASSES = 2.5


def stage_flops(shape: ModelShape, run: RunSizes) -> dict[str, float]:
    """Operations of each stage of ``run`` on a model of ``shape``, summed over its settings."""
    L, block, head = shape.layers, shape.block_token(), shape.head_token()
    forward = run.tokens * L * block + head  # one prompt, last position unembedded
    answer = forward + ANSWER_TOKENS * (L * block + head)  # a paraphrase and its greedy answer, cached keys
    lens = L * head  # the logit lens at every layer
    # a patch at (l, t) reruns blocks l+1.. on tokens t.. (the tokens before reuse clean keys and values)
    patched = (L * (L - 1) / 2) * (run.tokens * (run.tokens + 1) / 2) * block + L * run.tokens * head
    traced_prompts = run.patch_prompts * run.subsets
    calibration = run.calibration_tokens * L * block
    covariances = _input_covariances(shape, run.calibration_tokens)
    return {
        "eval": (run.settings + 1) * (run.facts * (forward + lens) + run.robustness * answer),
        "quantize": run.gptq * (GPTQ_BLOCK_PASSES * calibration + covariances + _gptq_solver(shape)),
        "causal": run.streams * (2 * run.causal + run.methods) * traced_prompts * patched,
        "components": (run.settings + 1) * run.facts * forward,
        "representations": 2 * run.settings * run.subset_prompts * forward,
        "sensitivity": run.sensitivity * run.subset_prompts * (L * L * run.tokens * block + COMPONENT_PLANS * forward),
        "repairs": run.repairs * run.subset_prompts * (REPAIR_PASSES * forward + run.alphas * head),
        "eora": math.ceil(run.repairs / EORA_SETTINGS_PER_PASS) * (calibration + covariances),
    }


def _gptq_solver(shape: ModelShape) -> float:
    """GPTQ's per-linear work beyond the forward: the Hessian's accumulation is in the calibration
    term; its error propagation is about 2 out x in^2 a linear (the block's linears at hidden or
    intermediate width)."""
    d, f = shape.hidden, shape.intermediate
    return shape.layers * (2 * d * d * (2 * d) + 2 * 2 * f * d * d + 2 * d * f * f)


def _input_covariances(shape: ModelShape, tokens: int) -> float:
    """``X^T X`` of the calibration inputs of each group of linears sharing one (three at the
    hidden width, one at the intermediate width), every block: GPTQ's Hessians, EoRA's covariances."""
    d, f = shape.hidden, shape.intermediate
    return shape.layers * 2 * tokens * (3 * d * d + f * f)
