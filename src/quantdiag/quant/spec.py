"""What a quantized model is: a QuantSpec per setting, and a PrecisionPlan saying, module by
module, which setting each linear layer uses (GPTQModel's ``dynamic`` idea, as data)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from quantdiag.errors import QuantdiagError

METHODS = ("rtn", "gptq")
REFERENCE = "reference"
#: Nominal bits of a reference-precision linear in average-bits arithmetic.
REFERENCE_BITS = 16
_KEY = re.compile(r"^(?P<method>[a-z]+)-w(?P<bits>\d+)-g(?P<group>\d+)-(?P<sym>sym|asym)$")


def effective_group_size(in_features: int, group_size: int) -> int:
    """``group_size`` if it divides ``in_features``, else the largest power-of-two divisor of
    ``in_features`` below it (SmolLM2's width 576 = 9 x 64 gets 64 for 128)."""
    if in_features % group_size == 0:
        return group_size
    size = 1
    while in_features % (size * 2) == 0 and size * 2 <= group_size:
        size *= 2
    return size


@dataclass(frozen=True)
class QuantSpec:
    """One weight-quantization setting: method, bits, group size and symmetry."""

    method: str
    bits: int
    group_size: int = 128
    sym: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantdiagError(f"unknown quantization method '{self.method}' (choose from {', '.join(METHODS)})")
        if not 2 <= self.bits <= 8:
            raise QuantdiagError(f"bits must be between 2 and 8, not {self.bits}")
        if self.group_size <= 0:
            raise QuantdiagError(f"group size must be positive, not {self.group_size}")

    @property
    def key(self) -> str:
        """Stable identifier, e.g. ``gptq-w4-g128-sym``: cache file names and result keys."""
        return f"{self.method}-w{self.bits}-g{self.group_size}-{'sym' if self.sym else 'asym'}"

    @property
    def label(self) -> str:
        return f"{self.method.upper()} {self.bits}-bit"

    @classmethod
    def from_key(cls, key: str) -> QuantSpec:
        match = _KEY.match(key)
        if not match:
            raise QuantdiagError(f"not a quantization setting: '{key}'")
        return cls(match["method"], int(match["bits"]), int(match["group"]), match["sym"] == "sym")


def setting_bits(setting: str) -> int:
    """Nominal bits of a setting key (the reference counts as 16)."""
    return REFERENCE_BITS if setting == REFERENCE else QuantSpec.from_key(setting).bits


@dataclass(frozen=True)
class Rule:
    """Modules whose name matches ``pattern`` (regex search) in blocks ``layers`` (start
    inclusive, stop exclusive; ``None`` = all) use ``setting``."""

    setting: str
    pattern: str = ".*"
    layers: tuple[int, int] | None = None

    def matches(self, name: str, layer: int) -> bool:
        in_range = self.layers is None or self.layers[0] <= layer < self.layers[1]
        return in_range and re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class PrecisionPlan:
    """``default`` everywhere, then each rule in order; a later rule overrides an earlier one."""

    default: str = REFERENCE
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    @classmethod
    def uniform(cls, setting: str) -> PrecisionPlan:
        """Every linear at one setting: the plain quantized model (or the reference)."""
        return cls(default=setting)

    def setting_for(self, name: str, layer: int) -> str:
        setting = self.default
        for rule in self.rules:
            if rule.matches(name, layer):
                setting = rule.setting
        return setting


def average_bits(assignment: Mapping[str, str], sizes: Mapping[str, int]) -> float:
    """Parameter-weighted mean of nominal bits over the linears: ``assignment`` maps module name to
    setting, ``sizes`` module name to parameter count (2 of 32 blocks at 8 on 4-bit = 4.25)."""
    total = sum(sizes[name] for name in assignment)
    return sum(setting_bits(setting) * sizes[name] for name, setting in assignment.items()) / total
