"""What a quantized model is: a QuantSpec per setting, and a PrecisionPlan saying, module by
module, which setting each linear layer uses (GPTQModel's ``dynamic`` idea, as data)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from quantdiag.config import METHODS
from quantdiag.errors import QuantdiagError

REFERENCE = "reference"
#: Nominal bits of a reference-precision linear in average-bits arithmetic.
REFERENCE_BITS = 16
_KEY = re.compile(r"^(?P<method>[a-z]+)-w(?P<bits>\d+)-g(?P<group>\d+)-(?P<sym>sym|asym)$")
_EORA = re.compile(r"^(?P<base>.+)\+eora(?P<rank>\d+)$")
_CHECKPOINT = re.compile(r"^ckpt-w(?P<bits>\d+(?:\.\d+)?)-")
#: Bits of each number of a low-rank correction's factors (kept in 16-bit floats).
LOW_RANK_BITS = 16


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

    def defines_subsets(self, bits: int) -> bool:
        """Whether this setting's failures define its method's Robust and Failure subsets."""
        return self.bits == bits

    @classmethod
    def from_key(cls, key: str) -> QuantSpec:
        match = _KEY.match(key)
        if not match:
            raise QuantdiagError(f"not a quantization setting: '{key}'")
        return cls(match["method"], int(match["bits"]), int(match["group"]), match["sym"] == "sym")


def checkpoint_key(bits: float, name: str, version: str) -> str:
    """Setting key of a user's checkpoint: its bits (``ckpt-w4-..``, a GGUF's ``ckpt-w4.5-..``),
    a name and the files' version."""
    return f"ckpt-w{bits:g}-{name}-{version}"


def is_checkpoint(setting: str) -> bool:
    """Whether a setting key (EoRA-compensated or not) is a user's checkpoint."""
    return _CHECKPOINT.match(split_eora(setting)[0]) is not None


def eora_key(setting: str, rank: int) -> str:
    """The setting ``setting`` with a rank-``rank`` EoRA correction added to each linear."""
    return f"{setting}+eora{rank}"


def split_eora(setting: str) -> tuple[str, int]:
    """(base setting, EoRA rank; 0 without a correction)."""
    match = _EORA.match(setting)
    return (match["base"], int(match["rank"])) if match else (setting, 0)


def setting_bits(setting: str) -> float:
    """Bits of a setting key's weights: nominal for quantdiag's settings (the reference counts as
    16), a checkpoint's own (a GGUF's measured bits per weight, e.g. 4.5)."""
    base, _ = split_eora(setting)
    if base == REFERENCE:
        return REFERENCE_BITS
    checkpoint = _CHECKPOINT.match(base)
    return float(checkpoint["bits"]) if checkpoint else QuantSpec.from_key(base).bits


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

    def compensated(self, rank: int) -> PrecisionPlan:
        """The same plan with a rank-``rank`` EoRA correction on every quantized linear."""

        def lift(setting: str) -> str:
            return setting if setting == REFERENCE else eora_key(setting, rank)

        return PrecisionPlan(
            lift(self.default), tuple(replace(rule, setting=lift(rule.setting)) for rule in self.rules)
        )

    def setting_for(self, name: str, layer: int) -> str:
        setting = self.default
        for rule in self.rules:
            if rule.matches(name, layer):
                setting = rule.setting
        return setting


def average_bits(assignment: Mapping[str, str], shapes: Mapping[str, tuple[int, int]]) -> float:
    """Parameter-weighted mean of nominal bits over the linears: ``assignment`` maps module name to
    setting, ``shapes`` module name to weight shape (2 of 32 blocks at 8 on 4-bit = 4.25). An EoRA
    correction adds its factors, rank x (out + in) numbers at ``LOW_RANK_BITS``."""

    def bits(name: str, setting: str) -> float:
        out_features, in_features = shapes[name]
        rank = split_eora(setting)[1]
        return setting_bits(setting) * out_features * in_features + LOW_RANK_BITS * rank * (out_features + in_features)

    total = sum(shapes[name][0] * shapes[name][1] for name in assignment)
    return sum(bits(name, setting) for name, setting in assignment.items()) / total
