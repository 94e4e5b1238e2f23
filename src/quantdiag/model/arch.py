"""The adapter: a loaded model's blocks, linears, probe sites and read-out, from its inferred layout (layout.py).

Site names follow docs/architecture.md, Site names: ``blocks.{l}.resid_post``, ``blocks.{l}.attn_out``,
``blocks.{l}.mlp_out``, ``blocks.{l}.mlp.gate_pre``, ``blocks.{l}.mlp.act`` (the gated intermediate
``act(g) * up``, i.e. the input of the down projection) and ``blocks.{l}.attn_probs`` (needs eager attention).
A fused ``gate_up_proj``'s gate is the first half of its output (as Phi-3 splits it); a mixture of experts has
no single gate or intermediate, so those two sites do not exist there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from quantdiag.errors import QuantdiagError
from quantdiag.model.layout import Layout, infer_layout, residual_writers


def check_supported(family: str | None, source: str, fields: dict | None = None) -> None:
    """Fail in seconds with one line unless a causal LM of ``family`` (a ``model_type``; ``fields`` its config
    where known) has a layout quantdiag reads: the model is built on the meta device (no weights) and read."""
    fields = {key: value for key, value in (fields or {}).items() if key not in ("model_type", "auto_map")}
    try:
        config = AutoConfig.for_model(str(family), **fields)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise QuantdiagError(
            f"{source}: architecture '{family}' is not supported (not a transformers causal LM)"
        ) from exc
    try:
        infer_layout(model)
    except QuantdiagError as exc:
        raise QuantdiagError(f"{source}: {exc}") from exc


_SITE = re.compile(r"^blocks\.(\d+)\.(resid_post|attn_out|mlp_out|mlp\.gate_pre|mlp\.act|attn_probs)$")


@dataclass(frozen=True)
class SiteHook:
    """Where a site is read or written: a module, whether it is its input (pre-hook) or output, which element
    of a tuple holds the tensor, and which slice of its last axis (``None``: all of it)."""

    module: nn.Module
    is_input: bool
    tuple_index: int
    part: slice | None = None

    def read(self, value) -> torch.Tensor:
        """The site's tensor in a module's args or output."""
        tensor = value[self.tuple_index] if isinstance(value, tuple) else value
        return tensor if self.part is None else tensor[..., self.part]

    def write(self, value, new: torch.Tensor):
        """``value`` (args or output) with the site's tensor replaced by ``new``."""
        if self.part is not None:
            whole = (value[self.tuple_index] if isinstance(value, tuple) else value).clone()
            whole[..., self.part] = new
            new = whole
        if isinstance(value, tuple):
            return value[: self.tuple_index] + (new,) + value[self.tuple_index + 1 :]
        return new


class Adapter:
    """Binds a :class:`Layout` to one loaded model: blocks, linears, sites, final logits."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.arch: Layout = residual_writers(model, infer_layout(model))
        self.blocks: nn.ModuleList = model.get_submodule(self.arch.blocks)
        self.final_norm: nn.Module = model.get_submodule(self.arch.final_norm)
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.softcap: float | None = self.arch.softcap

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def linear_name(self, layer: int, path: str) -> str:
        """Full module name of a block's linear, e.g. ``model.layers.3.mlp.down_proj``."""
        return f"{self.arch.blocks}.{layer}.{path}"

    def linear_names(self) -> list[str]:
        """Every quantizable linear, block by block, in the layout's order."""
        return [self.linear_name(layer, path) for layer in range(self.n_layers) for _, path in self.arch.linears]

    def linear_kind(self, name: str) -> tuple[int, str]:
        """``(layer, role)`` of a linear's full name."""
        layer, _, path = name.removeprefix(self.arch.blocks + ".").partition(".")
        return int(layer), {p: role for role, p in self.arch.linears}[path]

    def has_site(self, what: str) -> bool:
        """Whether a site (its name without ``blocks.{l}.``) exists in this model: not the gate and the
        intermediate of routed experts."""
        return not (self.arch.routed and what in ("mlp.gate_pre", "mlp.act"))

    def site(self, name: str) -> SiteHook:
        """Resolve a site name to the module and hook placement that carry it."""
        match = _SITE.match(name)
        if not match:
            raise QuantdiagError(f"unknown probe site '{name}'")
        layer, what = int(match.group(1)), match.group(2)
        if not 0 <= layer < self.n_layers:
            raise QuantdiagError(f"site '{name}': layer {layer} outside 0..{self.n_layers - 1}")
        if not self.has_site(what):
            raise QuantdiagError(f"site '{name}': a mixture of experts has no single {what.removeprefix('mlp.')}")
        block = self.blocks[layer]
        return {
            "resid_post": lambda: SiteHook(block, False, 0),
            "attn_out": lambda: SiteHook(block.get_submodule(self.arch.attn_out), False, 0),
            "mlp_out": lambda: SiteHook(block.get_submodule(self.arch.mlp_out), False, 0),
            "mlp.gate_pre": lambda: self._gate(block),
            "mlp.act": lambda: SiteHook(block.get_submodule(self._path("down")), True, 0),
            "attn_probs": lambda: SiteHook(block.get_submodule(self.arch.attn), False, 1),
        }[what]()

    def _path(self, role: str) -> str:
        return next(path for r, path in self.arch.linears if r == role)

    def _gate(self, block: nn.Module) -> SiteHook:
        roles = dict(self.arch.linears)
        if "gate" in roles:
            return SiteHook(block.get_submodule(roles["gate"]), False, 0)
        fused = block.get_submodule(roles["gate_up"])
        return SiteHook(fused, False, 0, slice(0, fused.out_features // 2))

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's own read-out of a residual state: final norm, unembedding, scaling, softcap."""
        logits = self.lm_head(self.final_norm(resid)) / self.arch.logits_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
