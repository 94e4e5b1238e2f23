"""Architecture adapters: where each probe site lives in a Hugging Face model family.

One small table a family (pyvene-style): module paths relative to a decoder block, plus the
order in which GPTQ quantizes a block's linears. Site names follow docs/architecture.md, Site names:
``blocks.{l}.resid_post``, ``blocks.{l}.attn_out``, ``blocks.{l}.mlp_out``,
``blocks.{l}.mlp.gate_pre``, ``blocks.{l}.mlp.act`` (the SwiGLU intermediate ``act(g) * up``,
i.e. the input of ``down_proj``) and ``blocks.{l}.attn_probs`` (needs eager attention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from quantdiag.errors import QuantdiagError


@dataclass(frozen=True)
class Arch:
    """Module paths of one family. ``attn_out`` / ``mlp_out`` name the module whose output is
    added to the residual stream (Gemma2 normalises before adding)."""

    family: str
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    attn_out: str = "self_attn"
    mlp_out: str = "mlp"
    linears: tuple[tuple[str, str], ...] = (
        ("q", "self_attn.q_proj"),
        ("k", "self_attn.k_proj"),
        ("v", "self_attn.v_proj"),
        ("o", "self_attn.o_proj"),
        ("gate", "mlp.gate_proj"),
        ("up", "mlp.up_proj"),
        ("down", "mlp.down_proj"),
    )
    #: GPTQ's true-sequential order: each group sees the already-quantized earlier groups.
    sequential: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


_LLAMA_LIKE = {family: Arch(family) for family in ("llama", "mistral", "qwen2", "qwen3")}
ARCHS: dict[str, Arch] = {
    **_LLAMA_LIKE,
    "gemma2": Arch("gemma2", attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm"),
}
#: Hugging Face ``model_type`` names of the families quantdiag reads.
SUPPORTED_FAMILIES = tuple(sorted(ARCHS))


def check_supported(family: str | None, source: str) -> None:
    """Fail with one line unless ``family`` (a ``model_type``) is one of ours."""
    if family not in ARCHS:
        supported = ", ".join(SUPPORTED_FAMILIES)
        raise QuantdiagError(f"{source}: architecture '{family}' is not supported (supported: {supported})")


_SITE = re.compile(r"^blocks\.(\d+)\.(resid_post|attn_out|mlp_out|mlp\.gate_pre|mlp\.act|attn_probs)$")


@dataclass(frozen=True)
class SiteHook:
    """Where a site is read or written: a module, whether it is its input (pre-hook) or output,
    and which element of a tuple output holds the tensor."""

    module: nn.Module
    is_input: bool
    tuple_index: int


class Adapter:
    """Binds an :class:`Arch` to one loaded model: blocks, linears, sites, final logits."""

    def __init__(self, model: nn.Module):
        check_supported(model.config.model_type, "model")
        self.model = model
        self.arch = ARCHS[model.config.model_type]
        self.blocks: nn.ModuleList = model.get_submodule(self.arch.layers)
        self.final_norm: nn.Module = model.get_submodule(self.arch.final_norm)
        self.lm_head: nn.Module = model.get_submodule(self.arch.lm_head)
        self.softcap: float | None = getattr(model.config, "final_logit_softcapping", None)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def linear_name(self, layer: int, kind: str) -> str:
        """Full module name of a block's linear, e.g. ``model.layers.3.mlp.down_proj``."""
        return f"{self.arch.layers}.{layer}.{dict(self.arch.linears)[kind]}"

    def linear_names(self) -> list[str]:
        """Every quantizable linear, block by block, in the Arch's order."""
        return [self.linear_name(layer, kind) for layer in range(self.n_layers) for kind, _ in self.arch.linears]

    def linear_kind(self, name: str) -> tuple[int, str]:
        """Inverse of :meth:`linear_name`: ``(layer, kind)``."""
        prefix = self.arch.layers + "."
        layer, _, path = name.removeprefix(prefix).partition(".")
        kind = {p: k for k, p in self.arch.linears}[path]
        return int(layer), kind

    def site(self, name: str) -> SiteHook:
        """Resolve a site name to the module and hook placement that carry it."""
        match = _SITE.match(name)
        if not match:
            raise QuantdiagError(f"unknown probe site '{name}'")
        layer, what = int(match.group(1)), match.group(2)
        if not 0 <= layer < self.n_layers:
            raise QuantdiagError(f"site '{name}': layer {layer} outside 0..{self.n_layers - 1}")
        block = self.blocks[layer]
        paths = dict(self.arch.linears)
        return {
            "resid_post": lambda: SiteHook(block, False, 0),
            "attn_out": lambda: SiteHook(block.get_submodule(self.arch.attn_out), False, 0),
            "mlp_out": lambda: SiteHook(block.get_submodule(self.arch.mlp_out), False, 0),
            "mlp.gate_pre": lambda: SiteHook(block.get_submodule(paths["gate"]), False, 0),
            "mlp.act": lambda: SiteHook(block.get_submodule(paths["down"]), True, 0),
            "attn_probs": lambda: SiteHook(block.get_submodule(self.arch.attn), False, 1),
        }[what]()

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's own read-out of a residual state: final norm, unembedding, softcap."""
        logits = self.lm_head(self.final_norm(resid))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
