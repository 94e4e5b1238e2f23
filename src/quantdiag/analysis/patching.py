"""The patching engine (docs/methods.md, Causal tracing): p(target) after writing a value at every (layer, token) of a
batch of prompts, one heatmap per call, and the naive loop it must equal.

The engine runs a model's clean forward once per batch (:func:`trace`), then for each layer l
resumes from the cached input of the first patched block with all (prompt, token) patches of that
layer stacked as rows of one batch: layers below l are never recomputed, and only the last
position goes through the unembedding. The tokens before a patched token are clean too: each
token's patches run from that token on, attending to the clean trace's keys and values of the
tokens before it. Cross-model patching writes the reference's values into
the compared model; zero ablation writes a model's own ``h_{l-1}`` (residual) or zeros (MLP,
attention) into itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from quantdiag.analysis.forward import target_scores
from quantdiag.model.arch import Adapter
from quantdiag.model.probes import capture, replace
from quantdiag.model.stack import StackTrace, run_block, trace_stack

#: Tokens of one block call, a memory bound: 16k tokens of an 8B model's MLP are about 0.5 GB.
MAX_TOKENS = 16384
#: Patchable stream -> the per-block site that carries it.
KIND_SITES = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


@dataclass(frozen=True)
class Sweep:
    """One heatmap: at each (layer l, token t) in turn, write values at ``kind``'s site. MLP and
    attention sweeps write the layers of ROME's window centred on l; the residual sweep writes l."""

    kind: str
    window: int = 1

    def layers(self, layer: int, n_layers: int) -> range:
        if self.kind == "resid":
            return range(layer, layer + 1)
        return range(max(0, layer - self.window // 2), min(n_layers, layer - (-self.window // 2)))

    def start(self, layer: int, n_layers: int) -> int:
        """The first block a patch at ``layer`` changes: the residual patch replaces block l's
        output, so the model resumes at block l + 1."""
        return layer + 1 if self.kind == "resid" else self.layers(layer, n_layers).start

    def site(self, layer: int) -> str:
        return f"blocks.{layer}.{KIND_SITES[self.kind]}"


@dataclass
class Trace:
    """A model's clean forward on prompts of one length: block inputs and kwargs (``stack``), the
    MLP and attention outputs of every block, and p(target)."""

    stack: StackTrace
    outputs: dict[str, list[torch.Tensor]]
    prob: torch.Tensor

    def values(self, kind: str) -> list[torch.Tensor]:
        """Per layer, the batch x tokens x d tensor at ``kind``'s site (residual: ``h_l``)."""
        return self.stack.states[1:] if kind == "resid" else self.outputs[kind]

    def ablation_values(self, kind: str) -> list[torch.Tensor] | None:
        """What zero ablation writes: ``h_{l-1}`` for the residual (block l's update removed),
        ``None`` (zeros) for MLP and attention outputs."""
        return self.stack.states[:-1] if kind == "resid" else None


@torch.inference_mode()
def trace(
    adapter: Adapter, ids: torch.Tensor, targets: torch.Tensor, kinds: Sequence[str] = tuple(KIND_SITES)
) -> Trace:
    """One clean forward of ``ids`` (prompts x tokens, equal lengths), keeping the MLP and
    attention outputs only for those of ``kinds`` (the residual is always kept)."""
    outputs = [Sweep(kind) for kind in kinds if kind != "resid"]
    layers = range(adapter.n_layers)
    with capture(adapter, [sweep.site(layer) for sweep in outputs for layer in layers]) as store:
        stack = trace_stack(adapter, ids, keys_values=True)
    prob, _ = target_scores(adapter.logits(stack.states[-1][:, -1]), targets)
    return Trace(stack, {sweep.kind: [store[sweep.site(layer)] for layer in layers] for sweep in outputs}, prob)


@torch.inference_mode()
def sweep_probs(
    adapter: Adapter,
    own: Trace,
    kwargs: list[dict],
    targets: torch.Tensor,
    sweep: Sweep,
    values: Sequence[torch.Tensor] | None,
    max_tokens: int = MAX_TOKENS,
    reuse: bool = True,
) -> torch.Tensor:
    """p(target) (prompts x layers x tokens) after writing ``values[j][prompt, t]`` (zeros if
    ``values`` is None) at each (layer, token). ``own`` is the patched model's clean trace;
    ``kwargs`` are block kwargs of a one-row forward of the same length. ``max_tokens`` bounds
    the tokens of one block call (memory). A patch at token t leaves the tokens before it clean,
    so with ``reuse``, where the blocks' arguments allow (:func:`suffix_kwargs`), each token's
    patches run only tokens t.. with the clean keys and values of the tokens before (about half
    the work)."""
    batch, length = own.stack.states[0].shape[:2]
    device = own.prob.device
    out = torch.empty(batch, adapter.n_layers, length, device=device)
    for prompts, tokens, start in _chunks(adapter, own, kwargs, max_tokens, reuse):
        out[prompts, :, tokens] = _all_layers(
            adapter, own, kwargs, sweep, values, prompts, tokens, targets[prompts], start
        ).to(device)
    return out


def _chunks(
    adapter: Adapter, own: Trace, kwargs: list[dict], max_tokens: int, reuse: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(prompts, tokens, first token run) of each block call's (prompt, token) pairs: one token
    at a time from that token on when the keys and values before it can be reused, else every
    pair over all tokens."""
    batch, length = own.stack.states[0].shape[:2]
    device = own.prob.device
    implementation = adapter.model.config._attn_implementation
    reusable = own.stack.keys_values is not None and all(suffix_kwargs(kw, 1, length, implementation) for kw in kwargs)
    if reuse and reusable:
        for token in range(length):
            per_call = max(1, max_tokens // (adapter.n_layers * (length - token)))
            for first in range(0, batch, per_call):
                prompts = torch.arange(first, min(batch, first + per_call), device=device)
                yield prompts, torch.full_like(prompts, token), token
        return
    prompt_of = torch.arange(batch, device=device).repeat_interleave(length)
    token_of = torch.arange(length, device=device).repeat(batch)
    pairs = max(1, max_tokens // (adapter.n_layers * length))
    for first in range(0, batch * length, pairs):
        yield prompt_of[first : first + pairs], token_of[first : first + pairs], 0


def suffix_kwargs(kwargs: dict, start: int, length: int, implementation: str) -> dict | None:
    """A block's keyword arguments for tokens ``start..length-1`` of a ``length``-token forward
    whose earlier tokens' keys and values come from a cache: the causal mask's rows from
    ``start`` (built when SDPA's forward had none: its implicit causal mask is aligned to the
    first key, not the last), the positions' and rotary tables' entries from ``start``. ``None``
    where this cannot slice safely (an argument of another kind, another attention
    implementation): those blocks run over all tokens."""
    mask = kwargs.get("attention_mask")
    if implementation not in ("sdpa", "eager") or (mask is None and implementation != "sdpa"):
        return None
    causal = torch.ones(length - start, length, dtype=torch.bool, device=_device(kwargs)).tril(start)[None, None]
    out = {"attention_mask": causal if mask is None else mask[..., start:, :]}
    for name, value in kwargs.items():
        if name == "position_embeddings":
            out[name] = tuple(table[:, start:] for table in value)
        elif name in ("position_ids", "cache_position"):
            out[name] = value[..., start:]
        elif name != "attention_mask" and (isinstance(value, torch.Tensor) or isinstance(value, tuple)):
            return None
        elif name != "attention_mask":
            out[name] = value
    return out


def _device(kwargs: dict) -> torch.device | None:
    """Where a block's arguments live (its rotary tables, positions), for a mask built beside them."""
    tensors = [v for value in kwargs.values() for v in (value if isinstance(value, tuple) else (value,))]
    return next((tensor.device for tensor in tensors if isinstance(tensor, torch.Tensor)), None)


class _Prefix:
    """What a block's attention sees as its cache: the clean keys and values of the tokens before
    the patched one, put before the new tokens' own (transformers' ``Cache.update`` contract)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, keys: torch.Tensor, values: torch.Tensor, *_args, **_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys.to(keys), keys], -2), torch.cat([self.values.to(values), values], -2)


def _all_layers(
    adapter: Adapter,
    own: Trace,
    kwargs: list[dict],
    sweep: Sweep,
    values: Sequence[torch.Tensor] | None,
    prompts: torch.Tensor,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    start: int = 0,
) -> torch.Tensor:
    """p(target) (pairs x layers) for each (prompt, token) pair patched at every layer, in one
    pass over the blocks: layer l's patches join the batch at their first block (taking the
    model's cached input there), so late blocks run all of them together. Only tokens
    ``start..`` run (every pair's token is at least ``start``); the clean keys and values of the
    tokens before them come from ``own``."""
    n_pairs, n_layers = len(prompts), adapter.n_layers
    pair_rows = torch.arange(n_pairs, device=prompts.device)
    local = tokens - start
    joined: list[int] = []
    hidden: torch.Tensor | None = None
    for block in range(n_layers + 1):
        for layer in (layer for layer in range(n_layers) if sweep.start(layer, n_layers) == block):
            state = own.stack.states[block][prompts.to(own.stack.states[block].device), start:]  # a copy
            if sweep.kind == "resid":
                state[pair_rows.to(state.device), local.to(state.device)] = _at(values[layer], prompts, tokens).to(
                    state
                )
            hidden = state if hidden is None else torch.cat([hidden.to(state.device), state])
            joined.append(layer)
        if block == n_layers or hidden is None:
            continue
        # residual patches were written when they joined; MLP and attention patches are written
        # at every block of their window, for the row groups whose window holds this block
        groups = (
            []
            if sweep.kind == "resid"
            else [g for g, layer in enumerate(joined) if block in sweep.layers(layer, n_layers)]
        )
        edits = {}
        if groups:
            rows = torch.cat([pair_rows + g * n_pairs for g in groups])
            value = None if values is None else _at(values[block], prompts, tokens).repeat(len(groups), 1)
            edits = {sweep.site(block): _writer(rows, local.repeat(len(groups)), value)}
        with replace(adapter, edits):
            hidden = run_block(
                adapter.blocks[block], hidden, _block_kwargs(adapter, own, kwargs, block, prompts, start, len(joined))
            )
    prob, _ = target_scores(adapter.logits(hidden[:, -1]), targets.to(hidden.device).repeat(len(joined)))
    out = torch.empty(n_pairs, n_layers, device=prob.device)
    out[:, joined] = prob.view(len(joined), n_pairs).T
    return out


def _block_kwargs(
    adapter: Adapter, own: Trace, kwargs: list[dict], block: int, prompts: torch.Tensor, start: int, groups: int
) -> dict:
    """Block ``block``'s arguments for ``groups`` groups of rows of ``prompts`` from token
    ``start``: as recorded when every token runs, else sliced, with the clean keys and values of
    the tokens before ``start`` as the attention's cache."""
    if not start:
        return kwargs[block]
    length = own.stack.states[0].shape[1]
    keys, values = own.stack.keys_values[block]
    rows = prompts.to(keys.device)
    prefix = _Prefix(keys[rows, :, :start].repeat(groups, 1, 1, 1), values[rows, :, :start].repeat(groups, 1, 1, 1))
    implementation = adapter.model.config._attn_implementation
    return suffix_kwargs(kwargs[block], start, length, implementation) | {"past_key_values": prefix}


def _at(tensor: torch.Tensor, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``tensor[prompts[i], tokens[i]]`` for each i, indexed on the tensor's own device (a model
    split over devices keeps each block's states where the block is)."""
    return tensor[prompts.to(tensor.device), tokens.to(tensor.device)]


def _writer(
    rows: torch.Tensor, tokens: torch.Tensor, value: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A site function writing ``value[i]`` (zeros if None) at ``[rows[i], tokens[i]]``."""

    def write(old: torch.Tensor) -> torch.Tensor:
        new = old.clone()
        new[rows.to(old.device), tokens.to(old.device)] = 0 if value is None else value.to(old.device, old.dtype)
        return new

    return write


@torch.inference_mode()
def naive_sweep_probs(
    adapter: Adapter,
    ids: torch.Tensor,
    targets: torch.Tensor,
    sweep: Sweep,
    values: Sequence[torch.Tensor] | None,
) -> torch.Tensor:
    """The plain loop the engine is checked against (tests, ``benchmarks/patching.py``): one full
    forward of one prompt per (layer, token), all logits computed, hooks doing the writes."""
    batch, length = ids.shape
    out = torch.empty(batch, adapter.n_layers, length)
    one = torch.zeros(1, dtype=torch.long)
    for prompt in range(batch):
        for layer in range(adapter.n_layers):
            for token in range(length):
                at = torch.tensor([token])
                edits = {
                    sweep.site(j): _writer(one, at, None if values is None else values[j][prompt : prompt + 1, token])
                    for j in sweep.layers(layer, adapter.n_layers)
                }
                with replace(adapter, edits):
                    logits = adapter.model(input_ids=ids[prompt : prompt + 1]).logits[0, -1]
                out[prompt, layer, token] = torch.softmax(logits.float(), -1)[targets[prompt]].item()
    return out
