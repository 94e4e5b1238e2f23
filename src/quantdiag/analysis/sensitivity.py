"""Sensitivity maps (docs/methods.md, Sensitivity): where does the damage start? Each experiment is a PrecisionPlan
over the WeightBank (weights quantized once, swapped in): the domino test (blocks 0..k
quantized), single blocks, one component group in every block, and signal injection (the first
k blocks at a higher precision over a 2-bit model). ``early`` sweeps run the domino test over the
early blocks only (docs/verdict.md, the intervention question).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantdiag.analysis.effects import as_json
from quantdiag.analysis.forward import length_batches, score_prompts
from quantdiag.data.facts import Prompt
from quantdiag.model.arch import Adapter
from quantdiag.model.load import LoadedModel
from quantdiag.model.stack import run_block, trace_stack
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.checkpoint import ComparedSpec
from quantdiag.quant.plans import COMPONENT_GROUPS, blocks_plan, component_plan
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, Setting
from quantdiag.verdict.thresholds import early_blocks

#: Signal injection goes into each method's setting of this width...
INJECTION_LOW_BITS = 2
#: ...from the reference, then from its settings of these widths (those in the run), in this order.
INJECTION_HIGH_BITS = (8, 4)


def correct_under(
    loaded: LoadedModel, bank: WeightBank, plan: PrecisionPlan, prompts: Sequence[Prompt], batch_size: int
) -> np.ndarray:
    """Which prompts the model answers correctly with ``plan`` applied."""
    bank.apply(plan)
    return score_prompts(loaded, prompts, batch_size, desc="plan").correct


def sensitivity_arrays(
    loaded: LoadedModel,
    bank: WeightBank,
    setting: Setting,
    prompts: Sequence[Prompt],
    batch_size: int,
    sweeps: str = "full",
) -> dict[str, np.ndarray]:
    """Per-prompt correctness with ``setting`` everywhere (``whole``), in blocks 0..k (``domino``,
    swept blocks x prompts) and, for ``full`` sweeps, in block k alone (``single``, layers x
    prompts) and in one component group of every block (``component/<group>``, prompts).
    ``early`` sweeps the domino test over the early blocks only: what the verdict reads."""
    full = sweeps == "full"
    layers = loaded.adapter.n_layers
    arrays = block_sweeps(loaded, bank, setting, prompts, batch_size, layers if full else early_blocks(layers), full)
    if full:
        groups = tqdm(COMPONENT_GROUPS, desc=f"components {setting.label}", unit="plan", leave=False)
        for group in groups:
            plan = component_plan(loaded.adapter.arch, setting, group)
            arrays[f"component/{group}"] = correct_under(loaded, bank, plan, prompts, batch_size)
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    return arrays


@torch.inference_mode()
def block_sweeps(
    loaded: LoadedModel,
    bank: WeightBank,
    setting: Setting,
    prompts: Sequence[Prompt],
    batch_size: int,
    steps: int,
    single: bool = True,
) -> dict[str, np.ndarray]:
    """Correctness of the domino test for k < ``steps`` (``domino``, steps x prompts), of the
    single-block test for every k (``single``, layers x prompts, when asked) and of ``setting``
    everywhere (``whole``), without recomputing shared prefixes: ``setting`` (and, for the
    single-block test, the reference) is traced once per batch; domino k resumes from
    ``setting``'s input of block k+1, single k from the reference's input of block k, and both go
    on through the reference blocks above k (about half the work of full forwards)."""
    adapter, layers = loaded.adapter, loaded.adapter.n_layers
    shapes = {"domino": (steps, len(prompts)), "whole": (len(prompts),)}
    if single:
        shapes["single"] = (layers, len(prompts))
    correct = {test: np.zeros(shape, dtype=bool) for test, shape in shapes.items()}
    for batch in tqdm(
        length_batches(prompts, batch_size), desc=f"domino and single blocks {setting.label}", unit="batch", leave=False
    ):
        ids = torch.tensor([prompts[i].ids for i in batch], device=loaded.device)
        targets = torch.tensor([prompts[i].target for i in batch])
        if single:
            bank.apply(PrecisionPlan.uniform(REFERENCE))
            reference = trace_stack(adapter, ids)
        bank.apply(PrecisionPlan.uniform(setting))
        quantized = trace_stack(adapter, ids)  # its masks and positions are the reference's: no weights in them
        correct["whole"][batch] = _answered(adapter, quantized.states[layers], targets)
        for k in range(layers if single else steps):  # steps <= layers
            bank.apply(blocks_plan(setting, k, k + 1))
            starts = {"domino": quantized.states[k + 1]} if k < steps else {}
            if single:
                starts["single"] = run_block(adapter.blocks[k], reference.states[k], reference.kwargs[k])
            for test, hidden in starts.items():
                for layer in range(k + 1, layers):
                    hidden = run_block(
                        adapter.blocks[layer], hidden.to(quantized.states[layer].device), quantized.kwargs[layer]
                    )
                correct[test][k, batch] = _answered(adapter, hidden, targets)
    return correct


def _answered(adapter: Adapter, hidden: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Whether the greedy next token after each row's last position is its target."""
    return (adapter.logits(hidden[:, -1]).argmax(-1).cpu() == targets).numpy()


def injection_settings(method: str, specs: Iterable[ComparedSpec]) -> tuple[Setting, list[Setting]] | None:
    """The setting signal injection of ``method`` goes into and those it injects from (the
    reference first), among ``specs``; ``None`` when the run has no low setting of ``method``."""
    by_bits = {spec.bits: spec for spec in specs if spec.method == method}
    if INJECTION_LOW_BITS not in by_bits:
        return None
    return by_bits[INJECTION_LOW_BITS], [REFERENCE] + [by_bits[bits] for bits in INJECTION_HIGH_BITS if bits in by_bits]


@torch.inference_mode()
def injection_arrays(
    loaded: LoadedModel,
    bank: WeightBank,
    low: Setting,
    highs: Sequence[Setting],
    prompts: Sequence[Prompt],
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Signal injection: for each high setting and k = 0..L, blocks below k at that setting and
    the rest at ``low``. ``cosine`` (highs x L+1 x layers): mean cosine of the last token's
    residual with the reference's at every layer; ``accuracy`` (highs x L+1). Each high setting
    is traced once per batch and every k resumes from its input of block k."""
    adapter, layers = loaded.adapter, loaded.adapter.n_layers
    cosine = np.zeros((len(highs), layers + 1, layers))
    correct = np.zeros((len(highs), layers + 1))
    for batch in tqdm(length_batches(prompts, batch_size), desc=f"injection into {low.label}", unit="batch"):
        ids = torch.tensor([prompts[i].ids for i in batch], device=loaded.device)
        targets = torch.tensor([prompts[i].target for i in batch])
        bank.apply(PrecisionPlan.uniform(REFERENCE))
        reference = torch.stack([state[:, -1].float().cpu() for state in trace_stack(adapter, ids).states[1:]])
        for h, high in enumerate(highs):
            bank.apply(PrecisionPlan.uniform(high))
            traced = trace_stack(adapter, ids)
            bank.apply(PrecisionPlan.uniform(low))
            for k in range(layers + 1):
                last, hidden = [state[:, -1] for state in traced.states[1 : k + 1]], traced.states[k]
                for layer in range(k, layers):
                    hidden = run_block(
                        adapter.blocks[layer], hidden.to(traced.states[layer].device), traced.kwargs[layer]
                    )
                    last.append(hidden[:, -1])
                residuals = torch.stack([state.float().cpu() for state in last])
                cosine[h, k] += F.cosine_similarity(residuals, reference, dim=-1).sum(-1).numpy()
                correct[h, k] += (adapter.logits(hidden[:, -1]).argmax(-1).cpu() == targets).sum().item()
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    return {"cosine": cosine / len(prompts), "accuracy": correct / len(prompts)}


def half_damage_block(domino_accuracy: np.ndarray, whole_accuracy: float) -> int | None:
    """The first block k such that quantizing blocks 0..k already loses half of the accuracy the
    whole quantized model loses (the reference scores 1 on these prompts); ``None`` if nothing is
    lost, or if that block lies beyond the swept ones."""
    loss = 1.0 - whole_accuracy
    reached = np.flatnonzero(domino_accuracy <= 1.0 - loss / 2)
    return int(reached[0]) if loss > 0 and len(reached) else None


def damage_onset(arrays: dict[str, np.ndarray]) -> int | None:
    """Where the damage has started by: the half-damage block; the number of swept blocks when
    it lies beyond them (the onset is no earlier); ``None`` if nothing is lost."""
    whole = arrays["whole"].mean()
    half = half_damage_block(arrays["domino"].mean(-1), whole)
    return len(arrays["domino"]) if half is None and whole < 1 else half


def sensitivity_summary(arrays: dict[str, np.ndarray]) -> dict:
    """Accuracy on the Robust and Failure prompts (an empty subset is left out): curves over k
    for the domino test (over the swept blocks) and, when swept, the single-block test, one
    number per component group; the setting's own accuracy (``whole``), the swept blocks and the
    domino test's half-damage block on both subsets together."""
    failure = arrays["failure"].astype(bool)

    def accuracy(correct: np.ndarray) -> dict:
        means = {
            name: correct[..., rows].mean(-1)
            for name, rows in (("robust", ~failure), ("failure", failure))
            if rows.any()
        }
        return {name: as_json(mean) if mean.ndim else round(float(mean), 6) for name, mean in means.items()}

    groups = [key.removeprefix("component/") for key in arrays if key.startswith("component/")]
    return {
        "domino": accuracy(arrays["domino"]),
        "single": accuracy(arrays["single"]) if "single" in arrays else None,
        "components": {group: accuracy(arrays[f"component/{group}"]) for group in groups} or None,
        "whole": accuracy(arrays["whole"]),
        "swept_blocks": len(arrays["domino"]),
        "half_damage_block": half_damage_block(arrays["domino"].mean(-1), arrays["whole"].mean()),
    }


def injection_summary(arrays: dict[str, np.ndarray]) -> dict:
    """Signal injection for results.json: the low setting, the high ones, and per high setting
    and k the accuracy and the per-layer cosine with the reference."""
    return {
        "low": str(arrays["low"]),
        "highs": [str(h) for h in arrays["highs"]],
        "accuracy": as_json(arrays["accuracy"]),
        "cosine": as_json(arrays["cosine"]),
    }
