"""WeightBank: the reference weights and the dequantized weights of every quantization setting of
one model (and of any user checkpoint compared with it), each computed once and cached on disk as
safetensors; ``apply(plan)`` swaps them into the one model in memory. Domino tests, protections
and checkpoint comparisons are all plans."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quantdiag.model.load import LoadedModel
from quantdiag.model.stack import BlockInputs, calibration_inputs
from quantdiag.quant.awq import awq_dequantized
from quantdiag.quant.calib import Calibration
from quantdiag.quant.checkpoint import CheckpointSpec, ComparedSpec, checkpoint_weights
from quantdiag.quant.eora import eora_weights
from quantdiag.quant.gptq import gptq_dequantized
from quantdiag.quant.rtn import rtn_dequantized
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, Setting, average_bits, compensated
from quantdiag.storage import UNREADABLE, atomic_file, cache_key, cache_root, entry_lock, load_or_build, read_entry

log = logging.getLogger(__name__)
#: Settings compensated in one EoRA pass: the covariances are shared, the weights are held.
EORA_SETTINGS_PER_PASS = 2


class WeightBank:
    """Settings of one model's block linears, on disk, swapped in place on demand."""

    def __init__(self, loaded: LoadedModel, calibration: Calibration | None = None, cache_dir: Path | None = None):
        self.adapter = loaded.adapter
        self.tokenizer = loaded.tokenizer
        self.calibration = calibration
        self.root = (cache_dir or cache_root()) / "weights" / f"{loaded.fingerprint}-v{cache_key(length=8)}"
        named = dict(loaded.model.named_modules())
        self.modules: dict[str, nn.Linear] = {name: named[name] for name in self.adapter.linear_names()}
        self.shapes = {name: tuple(module.weight.shape) for name, module in self.modules.items()}
        self.layers = {name: self.adapter.linear_kind(name)[0] for name in self.modules}
        self.current: dict[str, Setting] = dict.fromkeys(self.modules, REFERENCE)
        self._handles: dict[Setting, object] = {}
        self._inputs: BlockInputs | None = None
        self._cache(REFERENCE, lambda: {name: module.weight for name, module in self.modules.items()})

    def path(self, setting: Setting) -> Path:
        """Cache file of a setting, in a folder of the model's fingerprint and the code versions;
        a setting that reads the calibration tokens (GPTQ, EoRA) names their hash too (a
        checkpoint's key has its files' version in it)."""
        if not setting.reads_calibration:
            return self.root / f"{setting.key}.safetensors"
        if self.calibration is None:
            raise ValueError(f"{setting.label} needs a calibration set")
        return self.root / f"{setting.key}-calib{self.calibration.digest}.safetensors"

    def has(self, setting: Setting) -> bool:
        """Whether the setting's file is cached and readable."""
        try:
            self._check(self.path(setting))
        except UNREADABLE:
            return False
        return True

    def ensure(self, spec: ComparedSpec) -> None:
        """Quantize ``spec`` (or read the checkpoint) unless it is cached; the model is left at
        the reference."""

        def compute() -> dict[str, torch.Tensor]:
            self.apply(PrecisionPlan.uniform(REFERENCE))
            if isinstance(spec, CheckpointSpec):
                weights = checkpoint_weights(spec, self.adapter.model.config, self.tokenizer, self.shapes)
                return {name: weight.to(self.modules[name].weight.dtype) for name, weight in weights.items()}
            if spec.method == "rtn":
                return {name: self._rtn(module, spec) for name, module in self.modules.items()}
            if spec.method == "awq":
                return awq_dequantized(self.adapter, self._calibration_inputs(), spec)
            return gptq_dequantized(self.adapter, self._calibration_inputs(), spec)

        self._cache(spec, compute)

    def ensure_eora(self, settings: list[Setting], rank: int) -> None:
        """Compute the rank-``rank`` EoRA compensation of each setting not cached yet, a pass over
        the calibration set for every ``EORA_SETTINGS_PER_PASS`` of them (a pass holds their
        compensated weights in memory), holding their files' locks; the model is left at the
        reference."""
        missing = [setting for setting in dict.fromkeys(settings) if not self.has(compensated(setting, rank))]
        for start in range(0, len(missing), EORA_SETTINGS_PER_PASS):
            chunk = missing[start : start + EORA_SETTINGS_PER_PASS]
            with ExitStack() as locks:
                for path in sorted(self.path(compensated(setting, rank)) for setting in chunk):
                    locks.enter_context(entry_lock(path))
                chunk = [s for s in chunk if read_entry(self.path(compensated(s, rank)), self._check) is None]
                if not chunk:
                    continue
                self.apply(PrecisionPlan.uniform(REFERENCE))
                corrected = eora_weights(self.adapter, self._calibration_inputs(), chunk, rank, self._tensor)
                for setting, weights in corrected.items():
                    with atomic_file(self.path(compensated(setting, rank))) as tmp:
                        self._write(compensated(setting, rank), weights, tmp)

    def _calibration_inputs(self) -> BlockInputs:
        """The calibration set's block inputs under the reference weights (the model must hold
        them): computed once, then shared by every GPTQ, AWQ and EoRA pass of the run."""
        if self._inputs is None:
            self._inputs = calibration_inputs(self.adapter, self.calibration.ids)
        return self._inputs

    def assignment(self, plan: PrecisionPlan) -> dict[str, Setting]:
        """Module name -> setting under ``plan``."""
        return {name: plan.setting_for(name, self.layers[name]) for name in self.modules}

    @torch.no_grad()
    def apply(self, plan: PrecisionPlan) -> None:
        """Load each linear's weights for its setting; modules already there are not touched.
        Files no module uses any more are unmapped, so memory holds at most the settings in use."""
        for name, setting in self.assignment(plan).items():
            if self.current[name] != setting:
                self.modules[name].weight.copy_(self._handle(setting).get_tensor(name))
                self.current[name] = setting
        in_use = set(self.current.values())
        self._handles = {setting: handle for setting, handle in self._handles.items() if setting in in_use}

    def average_bits(self, plan: PrecisionPlan) -> float:
        return average_bits(self.assignment(plan), self.shapes)

    def group_size_fallbacks(self, spec: QuantSpec) -> dict[int, int]:
        """Input widths that ``spec.group_size`` does not divide -> the group size used there."""
        widths = {module.in_features for module in self.modules.values()}
        return {w: spec.group_for(w) for w in sorted(widths) if spec.group_for(w) != spec.group_size}

    def _rtn(self, module: nn.Linear, spec: QuantSpec) -> torch.Tensor:
        return rtn_dequantized(module.weight, spec.bits, spec.group_for(module.in_features), spec.sym)

    def _cache(self, setting: Setting, compute: Callable[[], dict[str, torch.Tensor]]) -> None:
        """The setting's file: read if cached and readable, else ``compute()`` and saved, under its lock."""
        load_or_build(self.path(setting), self._check, lambda tmp: self._write(setting, compute(), tmp))

    def _write(self, setting: Setting, weights: dict[str, torch.Tensor], tmp: Path) -> Path:
        log.info("caching %s weights in %s", setting.key, self.path(setting))
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}, str(tmp))
        return tmp

    def _check(self, path: Path) -> Path:
        """``path`` if it is a whole safetensors file of this model's linears; raises otherwise."""
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        if shapes != self.shapes:
            raise ValueError("its tensors are not this model's linears")
        return path

    def _tensor(self, setting: Setting, name: str) -> torch.Tensor:
        return self._handle(setting).get_tensor(name)

    def _handle(self, setting: Setting):
        """An open, memory-mapped reader per setting file."""
        if setting not in self._handles:
            self._handles[setting] = safe_open(str(self.path(setting)), framework="pt", device="cpu")
        return self._handles[setting]
