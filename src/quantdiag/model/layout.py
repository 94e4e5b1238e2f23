"""Read a decoder-only model's layout from its module tree: no table of families.

The decoder blocks are the ``ModuleList`` of ``num_hidden_layers`` modules; in block 0 the attention is the child
holding the q/k/v (or fused qkv) projections and the MLP the child holding the down projection (routed experts
included, see ``experts.py``); the linears get their roles from Hugging Face's projection names; the final norm is
the decoder's one other child with a weight of the hidden width. What joins the residual stream (post-norms) is
read from one short forward by :func:`residual_writers`. A family whose layout this cannot read names its paths in
``OVERRIDES`` (one line); an unreadable layout is a QuantdiagError that names what was not found.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from quantdiag.errors import QuantdiagError
from quantdiag.model.experts import split_experts

#: Linear roles by Hugging Face projection name; a fused linear's role covers several kinds (``FUSED``).
ROLES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "qkv_proj": "qkv",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down",
}
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
#: GPTQ's true-sequential stages: the linears of a stage that share an input are quantized together.
STAGES = (("q", "k", "v", "qkv"), ("o",), ("gate", "up", "gate_up"), ("down",))
#: Layout fields (paths) a family sets because they cannot be read from its modules, e.g.
#: ``"family": {"attn_out": "post_attention_norm"}``.
OVERRIDES: dict[str, dict[str, str]] = {}


@dataclass(frozen=True)
class Layout:
    """Where a model keeps its parts, as module paths (block parts relative to a block)."""

    family: str
    blocks: str
    final_norm: str
    attn: str
    mlp: str
    #: ``(role, path)`` of every quantizable linear of a block, in module order.
    linears: tuple[tuple[str, str], ...]
    #: The modules whose outputs are added to the residual stream (a post-norm where there is one).
    attn_out: str
    mlp_out: str
    #: Per layer, its attention type (``full_attention``, ``sliding_attention``, ...).
    layer_types: tuple[str, ...]
    qk_norm: bool
    softcap: float | None
    #: Logits are divided by this (Granite's ``logits_scaling``).
    logits_scale: float

    @property
    def routed(self) -> bool:
        """Whether the MLP is a mixture of routed experts."""
        return any(".experts." in path for _, path in self.linears)

    @property
    def sequential(self) -> tuple[tuple[str, ...], ...]:
        """Groups of linear paths in GPTQ's true-sequential order; a group shares one input (one expert's
        gate and up share the tokens routed to it)."""
        groups: list[tuple[str, ...]] = []
        for stage in STAGES:
            owners: dict[str, list[str]] = {}
            for role, path in self.linears:
                if role in stage:
                    owners.setdefault(path.rpartition(".")[0], []).append(path)
            groups.extend(tuple(paths) for paths in owners.values())
        return tuple(groups)

    def paths_of(self, kinds: tuple[str, ...]) -> tuple[str, ...]:
        """The linears whose kinds all lie in ``kinds`` (a fused qkv belongs to a group only with q, k and v)."""
        return tuple(path for role, path in self.linears if set(FUSED.get(role, (role,))) <= set(kinds))


def infer_layout(model: nn.Module) -> Layout:
    """The layout of a loaded (or meta-device) causal LM; routed experts are split into linears first."""
    config = model.config.get_text_config()
    family = str(model.config.model_type)
    split_experts(model)
    override = OVERRIDES.get(family, {})
    blocks = override.get("blocks") or _block_list(model, config.num_hidden_layers, family)
    block = model.get_submodule(blocks)[0]
    attn = override.get("attn") or _child_with(block, ("q", "qkv"), family, "attention module with q/k/v projections")
    mlp = override.get("mlp") or _child_with(block, ("down",), family, "MLP module with a down projection")
    linears = _linears(block, attn) + _linears(block, mlp)
    _check_roles(linears, family)
    _check_uniform(model.get_submodule(blocks), attn, mlp, linears, family)
    return Layout(
        family=family,
        blocks=blocks,
        final_norm=override.get("final_norm") or _final_norm(model, blocks, config.hidden_size, family),
        attn=attn,
        mlp=mlp,
        linears=linears,
        attn_out=override.get("attn_out", attn),
        mlp_out=override.get("mlp_out", mlp),
        layer_types=_layer_types(config),
        qk_norm=any(hasattr(block.get_submodule(attn), name) for name in ("q_norm", "k_norm")),
        softcap=getattr(config, "final_logit_softcapping", None),
        logits_scale=float(getattr(config, "logits_scaling", 1.0) or 1.0),
    )


def _layer_types(config) -> tuple[str, ...]:
    """The config's ``layer_types``; without them, every layer slides where a window is set (Mistral)."""
    default = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return tuple(getattr(config, "layer_types", None) or [default] * config.num_hidden_layers)


def _unknown(family: str, what: str) -> QuantdiagError:
    return QuantdiagError(f"architecture '{family}' is not supported: its layout has no {what}")


def _block_list(model: nn.Module, n_layers: int, family: str) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            return name
    raise _unknown(family, f"decoder block list (a ModuleList of num_hidden_layers={n_layers} blocks)")


def _child_with(block: nn.Module, roles: tuple[str, ...], family: str, what: str) -> str:
    """The block's direct child holding a linear of one of ``roles``."""
    for name, _ in block.named_children():
        if any(role in roles for role, _ in _linears(block, name)):
            return name
    raise _unknown(family, f"{what} in block 0")


def _linears(block: nn.Module, child: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (ROLES[name.rpartition(".")[2]], f"{child}.{name}")
        for name, module in block.get_submodule(child).named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in ROLES
    )


def _check_roles(linears: tuple[tuple[str, str], ...], family: str) -> None:
    """Every kind q, k, v, o, gate, up, down is covered once per projection owner."""
    kinds = {kind for role, _ in linears for kind in FUSED.get(role, (role,))}
    missing = [kind for kind in ("q", "k", "v", "o", "gate", "up", "down") if kind not in kinds]
    if missing:
        raise _unknown(family, f"{'/'.join(missing)} projection (nn.Linear named like {', '.join(ROLES)})")


def _check_uniform(blocks: nn.ModuleList, attn: str, mlp: str, linears: tuple, family: str) -> None:
    """Every block has block 0's linears (a model that mixes dense and MoE blocks is not read)."""
    for index, block in enumerate(blocks):
        if _linears(block, attn) + _linears(block, mlp) != linears:
            raise _unknown(family, f"uniform block layout (block {index}'s linears differ from block 0's)")


def _final_norm(model: nn.Module, blocks: str, hidden: int, family: str) -> str:
    """The decoder's child (beside the blocks) that holds one weight of the hidden width: the final norm."""
    parent = blocks.rpartition(".")[0]
    decoder = model.get_submodule(parent)
    for name, child in decoder.named_children():
        weights = list(child.parameters())
        if len(weights) == 1 and tuple(weights[0].shape) == (hidden,):
            return f"{parent}.{name}" if parent else name
    raise _unknown(family, f"final norm (a child of '{parent}' with one weight of width {hidden})")


class _Stop(Exception):
    """Ends the probing forward after block 0."""


@torch.no_grad()
def residual_writers(model: nn.Module, layout: Layout) -> Layout:
    """``layout`` with ``attn_out`` / ``mlp_out`` read from one two-token forward of block 0: from the attention
    (MLP), follow the block's children that take the previous one's output as their input; the last of that
    chain writes into the residual stream (Gemma's and OLMo 2's post-norms; Llama's post-attention norm reads
    the sum instead, so it ends no chain)."""
    block = model.get_submodule(layout.blocks)[0]
    calls: list[tuple[str, object, object]] = []

    def record(name: str):
        def hook(_module, args, kwargs, output):
            calls.append((name, args[0] if args else kwargs.get("hidden_states"), _first(output)))

        return hook

    def stop(*_):
        raise _Stop

    handles = [child.register_forward_hook(record(name), with_kwargs=True) for name, child in block.named_children()]
    handles.append(block.register_forward_hook(stop))
    device = model.get_input_embeddings().weight.device
    try:
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return replace(
        layout,
        attn_out=OVERRIDES.get(layout.family, {}).get("attn_out") or _chain_end(calls, layout.attn),
        mlp_out=OVERRIDES.get(layout.family, {}).get("mlp_out") or _chain_end(calls, layout.mlp),
    )


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _chain_end(calls: list[tuple[str, object, object]], start: str) -> str:
    names = [name for name, _, _ in calls]
    at = names.index(start)
    end, tensor = start, calls[at][2]
    for name, given, output in calls[at + 1 :]:
        if given is tensor:
            end, tensor = name, output
    return end
