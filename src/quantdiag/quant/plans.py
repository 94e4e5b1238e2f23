"""The plans of the sensitivity maps and the repairs (docs/methods.md, Sensitivity and Repairs):
which blocks or which kind of linear take which setting. Every experiment swaps weights quantized
once; nothing is quantized again."""

from __future__ import annotations

import re

from quantdiag.model.layout import Layout
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, Rule, Setting

#: Component groups of the paper's Table 5, as the layout's linear kinds.
COMPONENT_GROUPS: dict[str, tuple[str, ...]] = {
    "all": ("q", "k", "v", "o", "gate", "up", "down"),
    "mlp": ("gate", "up", "down"),
    "attn": ("q", "k", "v", "o"),
    "gate+up": ("gate", "up"),
    "down": ("down",),
    "q+k": ("q", "k"),
    "v": ("v",),
    "o": ("o",),
}


def blocks_plan(setting: Setting, start: int, stop: int, default: Setting = REFERENCE) -> PrecisionPlan:
    """Blocks ``start..stop-1`` at ``setting``, every other block at ``default``. Domino: (0, k+1);
    single layer: (k, k+1); injection and early protection: a high setting on (0, k) over a low
    default."""
    return PrecisionPlan(default=default, rules=(Rule(setting, layers=(start, stop)),))


def component_plan(arch: Layout, setting: Setting, group: str) -> PrecisionPlan:
    """The linears of one component group at ``setting`` in every block, the rest at reference (a fused
    linear only in a group holding all its kinds; no linear: a never-matching pattern)."""
    pattern = "|".join(rf"\.{re.escape(path)}$" for path in arch.paths_of(COMPONENT_GROUPS[group])) or "(?!)"
    return PrecisionPlan(default=REFERENCE, rules=(Rule(setting, pattern=pattern),))
