"""What a quantized model is: a ``Setting`` per kind of weights a linear can carry (the
reference, a ``QuantSpec``, a user checkpoint, an EoRA-``Compensated`` one), and a
``PrecisionPlan`` saying, module by module, which setting each linear layer uses (GPTQModel's
``dynamic`` idea, as data)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

from quantdiag.config import METHODS
from quantdiag.errors import QuantdiagError

#: Nominal bits of a reference-precision linear in average-bits arithmetic.
REFERENCE_BITS = 16
#: Bits of each number of a low-rank correction's factors (kept in 16-bit floats).
LOW_RANK_BITS = 16


class Setting(Protocol):
    """The weights a linear layer can carry: the reference's, a quantization setting's, a user
    checkpoint's, or one of those with an EoRA correction. ``key`` names it in file names and
    ``results.json``; code passes the value itself and never parses a key back."""

    @property
    def key(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def bits(self) -> float: ...

    @property
    def eora_rank(self) -> int: ...

    @property
    def reads_calibration(self) -> bool: ...


@dataclass(frozen=True)
class Reference:
    """The reference model's own weights."""

    key: ClassVar[str] = "reference"
    label: ClassVar[str] = "Reference"
    method: ClassVar[None] = None
    bits: ClassVar[float] = REFERENCE_BITS
    eora_rank: ClassVar[int] = 0
    reads_calibration: ClassVar[bool] = False


REFERENCE = Reference()


@dataclass(frozen=True)
class QuantSpec:
    """One weight-quantization setting: method, bits, group size and symmetry."""

    method: str
    bits: int
    group_size: int = 128
    sym: bool = True
    eora_rank: ClassVar[int] = 0

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

    @property
    def reads_calibration(self) -> bool:
        """Whether its weights depend on the calibration tokens (all but round-to-nearest)."""
        return self.method != "rtn"

    def group_for(self, in_features: int) -> int:
        """The group size used on a linear of ``in_features`` inputs: ``group_size`` if it divides
        them, else the largest power-of-two divisor below it (SmolLM2's width 576 = 9 x 64 gets
        64 for 128). Decided here only: RTN, GPTQ and the notes read it."""
        if in_features % self.group_size == 0:
            return self.group_size
        size = 1
        while in_features % (size * 2) == 0 and size * 2 <= self.group_size:
            size *= 2
        return size

    def defines_subsets(self, bits: int) -> bool:
        """Whether this setting's failures define its method's Robust and Failure subsets."""
        return self.bits == bits


@dataclass(frozen=True)
class Compensated:
    """``base`` with a rank-``rank`` EoRA correction added to each linear (docs/methods.md, Repairs)."""

    base: Setting
    rank: int

    @property
    def key(self) -> str:
        return f"{self.base.key}+eora{self.rank}"

    @property
    def label(self) -> str:
        return f"{self.base.label} + EoRA {self.rank}"

    @property
    def bits(self) -> float:
        return self.base.bits

    @property
    def eora_rank(self) -> int:
        return self.rank

    @property
    def reads_calibration(self) -> bool:
        """EoRA's factors are fitted on the calibration tokens."""
        return True


def compensated(setting: Setting, rank: int) -> Setting:
    """``setting`` with a rank-``rank`` EoRA correction; the reference needs none and stays itself."""
    return setting if setting == REFERENCE else Compensated(setting, rank)


@dataclass(frozen=True)
class Rule:
    """Modules whose name matches ``pattern`` (regex search) in blocks ``layers`` (start
    inclusive, stop exclusive; ``None`` = all) use ``setting``."""

    setting: Setting
    pattern: str = ".*"
    layers: tuple[int, int] | None = None

    def matches(self, name: str, layer: int) -> bool:
        in_range = self.layers is None or self.layers[0] <= layer < self.layers[1]
        return in_range and re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class PrecisionPlan:
    """``default`` everywhere, then each rule in order; a later rule overrides an earlier one."""

    default: Setting = REFERENCE
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    @classmethod
    def uniform(cls, setting: Setting) -> PrecisionPlan:
        """Every linear at one setting: the plain quantized model (or the reference)."""
        return cls(default=setting)

    def compensated(self, rank: int) -> PrecisionPlan:
        """The same plan with a rank-``rank`` EoRA correction on every quantized linear."""

        return PrecisionPlan(
            compensated(self.default, rank),
            tuple(replace(rule, setting=compensated(rule.setting, rank)) for rule in self.rules),
        )

    def setting_for(self, name: str, layer: int) -> Setting:
        setting = self.default
        for rule in self.rules:
            if rule.matches(name, layer):
                setting = rule.setting
        return setting


def average_bits(assignment: Mapping[str, Setting], shapes: Mapping[str, tuple[int, int]]) -> float:
    """Parameter-weighted mean of nominal bits over the linears: ``assignment`` maps module name to
    setting, ``shapes`` module name to weight shape (2 of 32 blocks at 8 on 4-bit = 4.25). An EoRA
    correction adds its factors, rank x (out + in) numbers at ``LOW_RANK_BITS``."""

    def bits(name: str, setting: Setting) -> float:
        out_features, in_features = shapes[name]
        correction = LOW_RANK_BITS * setting.eora_rank * (out_features + in_features)
        return setting.bits * out_features * in_features + correction

    total = sum(shapes[name][0] * shapes[name][1] for name in assignment)
    return sum(bits(name, setting) for name, setting in assignment.items()) / total
