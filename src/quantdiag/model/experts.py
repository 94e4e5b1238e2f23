"""Routed experts as one ``nn.Linear`` per expert projection, so that quantization, GPTQ's input hooks and the
weight bank treat a mixture-of-experts MLP like any other (Hugging Face stores the experts as 3-D tensors).

:func:`split_experts` replaces, in place, each experts module of the common layout (concatenated
``gate_up_proj`` of shape experts x 2I x H, ``down_proj`` experts x H x I, gated, no bias) by
:class:`RoutedExperts`, whose forward is Hugging Face's eager one with the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from quantdiag.errors import QuantdiagError


class Expert(nn.Module):
    """One expert's gated MLP: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        inner, hidden = down.shape[1], down.shape[0]
        options = {"bias": False, "device": down.device, "dtype": down.dtype}
        self.gate_proj = nn.Linear(hidden, inner, **options)
        self.up_proj = nn.Linear(hidden, inner, **options)
        self.down_proj = nn.Linear(inner, hidden, **options)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate_up[:inner])
            self.up_proj.weight.copy_(gate_up[inner:])
            self.down_proj.weight.copy_(down)


class RoutedExperts(nn.ModuleList):
    """The experts of one MoE block, called like Hugging Face's experts module
    ``(hidden (tokens x H), top_k_index, top_k_weights)``."""

    def __init__(self, fused: nn.Module):
        super().__init__(Expert(gu, d) for gu, d in zip(fused.gate_up_proj.data, fused.down_proj.data))
        self.act_fn = fused.act_fn
        self.train(fused.training).requires_grad_(fused.gate_up_proj.requires_grad)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for index, expert in enumerate(self):
            slot, token = torch.where(top_k_index.T == index)  # Hugging Face's order of the rows
            if len(token):
                x = hidden[token]
                y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
                out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    weight = getattr(module, "gate_up_proj", None)
    return isinstance(weight, nn.Parameter) and weight.ndim == 3


def split_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` by :class:`RoutedExperts`; the number replaced."""
    found = [(name, module) for name, module in model.named_modules() if _is_fused_experts(module)]
    for name, module in found:
        flags = {flag: getattr(module, flag, False) for flag in ("has_bias", "is_transposed", "has_post_expert_norm")}
        if any(flags.values()) or not getattr(module, "is_concatenated", True):
            raise QuantdiagError(f"experts module '{name}' has an unsupported layout ({flags})")
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent).register_module(leaf, RoutedExperts(module))
    return len(found)
