"""The decoder stack as a sequence of blocks: record what each block receives, and resume a
forward from any block with given hidden states.

GPTQ and EoRA calibrate block by block on recorded block inputs; the patching engine resumes a model
from layer l with patched states instead of recomputing the layers below l. Both need the
keyword arguments (masks, rotary embeddings) the model passes to each block, recorded during one
real forward, so no family's mask logic is reimplemented here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from quantdiag.model.arch import Adapter


@dataclass
class StackTrace:
    """One forward through the blocks. ``states[l]`` is the input of block l and ``states[L]`` the
    output of the last block (so ``h_l = states[l + 1]``); a trace without ``all_states`` keeps
    ``states[0]`` only. ``kwargs[l]`` are block l's keyword arguments (no cache); ``keys_values[l]``
    block l's attention keys and values (batch x heads x tokens x head size), if asked for."""

    states: list[torch.Tensor]
    kwargs: list[dict]
    keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None


#: Block keyword arguments a trace does not keep: the cache belongs to the traced forward only.
_CACHE_KWARGS = ("hidden_states", "past_key_values", "use_cache")


def trace_stack(adapter: Adapter, ids: torch.Tensor, all_states: bool = True, keys_values: bool = False) -> StackTrace:
    """Run the model on ``ids`` (no padding) recording block inputs and keyword arguments, and
    with ``keys_values`` every block's attention keys and values (a transformers ``DynamicCache``)."""
    states: list[torch.Tensor] = []
    kwargs: list[dict] = []
    cache = DynamicCache() if keys_values else None

    def grab(_module, args, block_kwargs):
        if all_states or not states:
            states.append(args[0] if args else block_kwargs["hidden_states"])
        kwargs.append({k: v for k, v in block_kwargs.items() if k not in _CACHE_KWARGS})

    def grab_output(_module, _args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_pre_hook(grab, with_kwargs=True) for block in adapter.blocks]
    if all_states:
        handles.append(adapter.blocks[-1].register_forward_hook(grab_output))
    try:
        adapter.model(input_ids=ids, use_cache=keys_values, past_key_values=cache, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return StackTrace(states, kwargs, None if cache is None else [(layer.keys, layer.values) for layer in cache.layers])


def run_block(block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One block's output hidden states. ``kwargs`` may come from a one-row forward of the same
    length: masks and rotary tables broadcast over rows."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class BlockInputs:
    """What block-by-block calibration (GPTQ, AWQ, EoRA) starts from: the calibration ``ids``, the
    hidden states entering block 0 per batch, and every block's keyword arguments (masks, rotary
    embeddings) per batch, ``kwargs[layer][batch]``. They depend on the reference weights and the
    tokens only, so one set serves every setting of a run."""

    ids: torch.Tensor
    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]


def calibration_inputs(adapter: Adapter, ids: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """The block inputs of ``ids`` in batches of ``batch_size``, from one forward per batch of the
    model as it is (the reference). Per-block kwargs matter for Gemma2, whose sliding-window layers
    get a mask of their own."""
    device = adapter.model.get_input_embeddings().weight.device
    traces = [
        trace_stack(adapter, ids[i : i + batch_size].to(device), all_states=False)
        for i in range(0, len(ids), batch_size)
    ]
    kwargs = [[trace.kwargs[layer] for trace in traces] for layer in range(adapter.n_layers)]
    return BlockInputs(ids, [trace.states[0] for trace in traces], kwargs)


def run_block_batches(block: torch.nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The block's outputs for each calibration batch."""
    return [run_block(block, states, extra) for states, extra in zip(hidden, kwargs)]
