"""AWQ through GPTQModel's AWQ code (its scale search, clip search and quantizer), driven block by
block on cached block inputs as quant/gptq.py drives GPTQ.

Per block, on the inputs the already-quantized blocks before it give: every linear's inputs are
recorded; each of the adapter's groups (q/k/v, o, gate/up, down) gets GPTQModel's per-channel scale
search (``_search_best_scale``: ratios of mean |x| to mean |w|, scored on the output of the attention
or MLP the group feeds, or of the linear itself); then each scaled linear W*s gets GPTQModel's clip
search on its scaled inputs x/s (not q and k, as in GPTQModel) and its pseudo-quantizer. AWQ moves
1/s into the module before the group (a norm or a linear); quantdiag keeps each linear's effective
float weight instead, Q(clip(W*s))/s, so the norms every other setting shares stay untouched. A row
scale on the preceding linear does not change its own quantized weight (groups are along inputs),
so this is the function a real AWQ model computes. The o projection is scaled only where the v
projection could absorb it (no grouped-query attention), as in GPTQModel.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from quantdiag.errors import QuantdiagError
from quantdiag.model.arch import Adapter
from quantdiag.model.stack import BlockInputs, run_block_batches, trace_stack
from quantdiag.quant.gptq import _gptqmodel
from quantdiag.quant.spec import QuantSpec

#: GPTQModel's clip grid (``_compute_best_clip``'s defaults): bounds shrinking in steps of 1/20 to
#: at most half the group's largest weight, scored on at most 512 of the calibration tokens.
_CLIP_GRID, _CLIP_SHRINK, _CLIP_TOKENS = 20, 0.5, 512
#: Numbers of one row chunk's outputs in the clip search (float32: 256 MiB).
_CLIP_CHUNK_NUMBERS = 2**26
#: Kinds GPTQModel's clip search leaves alone (their product goes through a softmax).
_NOT_CLIPPED = ("q", "k")


@dataclass(frozen=True)
class AwqBlock:
    """A block's linears' dequantized effective weights, and the AWQ input scale each was quantized
    with (ones where its group got none)."""

    weights: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]


@torch.no_grad()
def awq_blocks(adapter: Adapter, inputs: BlockInputs, spec: QuantSpec) -> Iterator[AwqBlock]:
    """AWQ weights and scales of the block linears, yielded a block at a time (CPU, model dtype); at
    every yield, as after the last, the model holds its own weights. Routed experts are refused:
    GPTQModel's scale search runs an expert's container, which has no forward."""
    if adapter.arch.routed:
        raise QuantdiagError("AWQ does not quantize routed experts yet (a mixture of experts): use rtn or gptq")
    hidden, block_kwargs, batch_size = inputs.hidden, inputs.kwargs, len(inputs.hidden[0])
    row_kwargs = trace_stack(adapter, inputs.ids[:1].to(hidden[0].device), all_states=False).kwargs
    for layer, block in enumerate(tqdm(adapter.blocks, desc=f"AWQ {spec.bits}-bit", unit="block")):
        weights: dict[str, torch.Tensor] = {}
        scales: dict[str, torch.Tensor] = {}
        roles = {path: role for role, path in adapter.arch.linears}
        linears = {path: block.get_submodule(path) for path in roles}
        originals = {path: module.weight.detach().clone() for path, module in linears.items()}
        seen = _linear_inputs(block, hidden, block_kwargs[layer], linears)
        block_scales = _search_scales(adapter, block, linears, seen, row_kwargs[layer], spec, batch_size)
        for path, linear in linears.items():
            scale = block_scales.get(path, torch.ones(linear.in_features))
            linear.weight.copy_(_quantized(linear.weight, seen[path], scale, roles[path], spec))
            weights[adapter.linear_name(layer, path)] = linear.weight.detach().cpu().clone()
            scales[adapter.linear_name(layer, path)] = scale.cpu()
        hidden = run_block_batches(block, hidden, block_kwargs[layer])
        for path, weight in originals.items():
            linears[path].weight.copy_(weight)
        yield AwqBlock(weights, scales)


def _linear_inputs(
    block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], linears: dict[str, nn.Linear]
) -> dict[str, torch.Tensor]:
    """Every linear's inputs over all calibration batches, concatenated along the batch."""
    seen: dict[str, list[torch.Tensor]] = {path: [] for path in linears}
    handles = [
        module.register_forward_hook(lambda _m, args, _out, path=path: seen[path].append(args[0]))
        for path, module in linears.items()
    ]
    try:
        run_block_batches(block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {path: torch.cat(chunks) for path, chunks in seen.items()}


def _search_scales(
    adapter: Adapter,
    block: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: dict[str, torch.Tensor],
    kwargs: dict,
    spec: QuantSpec,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """GPTQModel's scale search for each group that AWQ scales, on the float block: linear path -> scale."""
    found: dict[str, torch.Tensor] = {}
    previous: nn.Linear | None = None
    parents_seen: set[str] = set()
    for group in adapter.arch.sequential:
        parent = group[0].rpartition(".")[0]
        layers = [linears[path] for path in group]
        first_in_parent = parent not in parents_seen
        parents_seen.add(parent)
        if first_in_parent or previous.out_features == layers[0].in_features:
            inspect = block.get_submodule(parent) if first_in_parent else layers[0]
            processor = _processor(adapter, spec, layers[0].in_features, batch_size)
            *_, scale, _loss = processor._search_best_scale(block, layers[0], layers, inputs[group[0]], inspect, kwargs)
            found.update(dict.fromkeys(group, scale.float()))
        previous = layers[-1]
    return found


def _quantized(weight: torch.Tensor, inputs: torch.Tensor, scale: torch.Tensor, role: str, spec: QuantSpec):
    """The effective weight Q(clip(W*s))/s, with GPTQModel's clip search and pseudo-quantizer."""
    processor = _processor(None, spec, weight.shape[1], 0)
    scale = scale.to(weight.device, weight.dtype)
    scaled = weight * scale
    if role not in _NOT_CLIPPED:
        scaled = _clipped(processor, scaled, inputs / scale)
    quantized, *_ = processor.pseudo_quantize_tensor(scaled)
    return quantized / scale


def _clipped(processor, weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``weight`` with each group clamped to its best bound (``_best_clip``)."""
    group = processor.qcfg.group_size
    x = inputs.reshape(-1, weight.shape[1])
    x = x[:: max(1, len(x) // _CLIP_TOKENS)]  # GPTQModel's token sample
    x_groups = x.reshape(len(x), -1, group).transpose(0, 1)  # groups, tokens, group
    rows = max(1, _CLIP_CHUNK_NUMBERS // (x_groups.shape[0] * x_groups.shape[1]))
    w_groups = weight.reshape(weight.shape[0], -1, group)  # rows, groups, group
    bounds = torch.cat([_best_clip(processor, chunk, x_groups) for chunk in w_groups.split(rows)])
    return torch.clamp(w_groups, -bounds, bounds).reshape_as(weight)


def _best_clip(processor, w_groups: torch.Tensor, x_groups: torch.Tensor) -> torch.Tensor:
    """GPTQModel's clip search (``AWQProcessor._compute_best_clip``: its grid, quantizer and first
    minimum of the output's squared error) with each group's outputs as one matrix product rather
    than its broadcast product and sum, which spent 81% of AWQ's time on a CPU: per row and
    group, the bound [rows, groups, 1]."""
    outputs = lambda w: torch.bmm(x_groups, w.permute(1, 2, 0))  # noqa: E731 (groups, tokens, rows)
    reference = outputs(w_groups)
    largest = w_groups.abs().amax(-1, keepdim=True)
    best, least = largest, torch.full(largest.shape[:2], torch.inf, device=largest.device)
    clamped, quantized = torch.empty_like(w_groups), torch.empty_like(w_groups)
    for step in range(int(_CLIP_SHRINK * _CLIP_GRID)):
        bound = largest * (1 - step / _CLIP_GRID)
        torch.clamp(w_groups, -bound, bound, out=clamped)
        processor._pseudo_quantize_tensor_into(clamped, quantized, abs_max=bound)
        error = (outputs(quantized) - reference).pow(2).mean(1).T  # rows, groups
        better = error < least  # a NaN error never wins, as in GPTQModel
        least, best = torch.where(better, error, least), torch.where(better[..., None], bound, best)
    return best


def _processor(adapter: Adapter | None, spec: QuantSpec, in_features: int, batch_size: int):
    """A GPTQModel ``AWQProcessor`` holding only what its scale and clip searches read: the
    quantize config (this linear's group size), the memory budget, duo scaling, and the model for
    its rotary module. Its constructor wants a whole GPTQModel model and calibration pipeline, so
    the fields are set directly; the block's own rotary tables are passed and kept."""
    _, config_class = _gptqmodel()  # sets GPTQModel's CPU-worker default before importing it
    from gptqmodel.looper.awq_processor import AWQProcessor

    processor = AWQProcessor.__new__(AWQProcessor)
    processor.qcfg = config_class(
        bits=spec.bits, group_size=spec.group_for(in_features), sym=spec.sym, offload_to_disk=False
    )
    processor.max_chunk_memory = 1024**3
    processor.duo_scaling = True
    processor._scale_context = threading.local()
    processor._module_forward_kwargs = {}
    processor._quant_batch_size = batch_size
    processor.gptq_model = SimpleNamespace(rotary_embedding=None, awq_preserve_explicit_position_embeddings=True)
    processor.model = adapter.model if adapter is not None else None
    return processor
