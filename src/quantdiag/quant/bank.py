"""WeightBank: the reference weights and the dequantized weights of every quantization setting of
one model (and of any user checkpoint compared with it), each computed once and cached on disk as a
folder of safetensors files, one a block, written as each block is computed (so a setting is never
held whole); ``apply(plan)`` swaps them into the one model in memory. Domino tests, protections
and checkpoint comparisons are all plans."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quantdiag.model.load import LoadedModel
from quantdiag.model.stack import BlockInputs, calibration_inputs
from quantdiag.quant.awq import awq_blocks
from quantdiag.quant.calib import Calibration
from quantdiag.quant.checkpoint import CheckpointSpec, ComparedSpec, checkpoint_reader
from quantdiag.quant.eora import eora_blocks
from quantdiag.quant.gptq import gptq_blocks
from quantdiag.quant.rtn import rtn_dequantized
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, Setting, average_bits, compensated
from quantdiag.storage import (
    UNREADABLE,
    atomic_dir,
    cache_key,
    cache_root,
    check_manifest,
    entry_lock,
    load_or_build,
    read_entry,
)

log = logging.getLogger(__name__)
#: Settings compensated in one EoRA pass: the covariances are shared.
EORA_SETTINGS_PER_PASS = 2
#: One block's linears of one setting: module name -> weight.
BlockWeights = dict[str, torch.Tensor]


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
        self.blocks: dict[int, list[str]] = {}
        for name, layer in self.layers.items():
            self.blocks.setdefault(layer, []).append(name)
        self.current: dict[str, Setting] = dict.fromkeys(self.modules, REFERENCE)
        self._inputs: BlockInputs | None = None
        self._cache(REFERENCE, lambda: self._per_block(lambda name: self.modules[name].weight))

    def path(self, setting: Setting) -> Path:
        """Cache folder of a setting, in a folder of the model's fingerprint and the code versions;
        a setting that reads the calibration tokens (GPTQ, EoRA) names their hash too (a
        checkpoint's key has its files' version in it)."""
        if not setting.reads_calibration:
            return self.root / setting.key
        if self.calibration is None:
            raise ValueError(f"{setting.label} needs a calibration set")
        return self.root / f"{setting.key}-calib{self.calibration.digest}"

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

        def compute() -> Iterable[BlockWeights]:
            self.apply(PrecisionPlan.uniform(REFERENCE))
            if isinstance(spec, CheckpointSpec):
                read = checkpoint_reader(spec, self.adapter.model.config, self.tokenizer, self.shapes)
                return self._per_block(lambda name: read(name).to(self.modules[name].weight.dtype))
            if spec.method == "rtn":
                return self._per_block(lambda name: self._rtn(self.modules[name], spec))
            if spec.method == "awq":
                return (block.weights for block in awq_blocks(self.adapter, self._calibration_inputs(), spec))
            return gptq_blocks(self.adapter, self._calibration_inputs(), spec)

        self._cache(spec, compute)

    def ensure_eora(self, settings: list[Setting], rank: int) -> None:
        """Compute the rank-``rank`` EoRA compensation of each setting not cached yet, a pass over
        the calibration set for every ``EORA_SETTINGS_PER_PASS`` of them, holding their folders'
        locks and writing each block as it is compensated; the model is left at the reference."""
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
                tmps = {s: locks.enter_context(atomic_dir(self.path(compensated(s, rank)))) for s in chunk}
                for block in eora_blocks(self.adapter, self._calibration_inputs(), chunk, rank, self.tensor):
                    for setting, weights in block.items():
                        self._save_block(weights, tmps[setting])

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
        """Load each linear's weights for its setting; modules already there are not touched. Each
        block file is opened once and closed after, so no setting's file stays mapped in memory."""
        changed: dict[tuple[Setting, int], list[str]] = defaultdict(list)
        for name, setting in self.assignment(plan).items():
            if self.current[name] != setting:
                changed[setting, self.layers[name]].append(name)
        for (setting, layer), names in changed.items():
            with safe_open(str(self._block_file(self.path(setting), layer)), framework="pt", device="cpu") as handle:
                for name in names:
                    self.modules[name].weight.copy_(handle.get_tensor(name))
                    self.current[name] = setting

    def tensor(self, setting: Setting, name: str) -> torch.Tensor:
        """One linear's cached weight under ``setting`` (which must be cached)."""
        with safe_open(str(self._block_file(self.path(setting), self.layers[name])), framework="pt") as handle:
            return handle.get_tensor(name)

    def average_bits(self, plan: PrecisionPlan) -> float:
        return average_bits(self.assignment(plan), self.shapes)

    def group_size_fallbacks(self, spec: QuantSpec) -> dict[int, int]:
        """Input widths that ``spec.group_size`` does not divide -> the group size used there."""
        widths = {module.in_features for module in self.modules.values()}
        return {w: spec.group_for(w) for w in sorted(widths) if spec.group_for(w) != spec.group_size}

    def _rtn(self, module: nn.Linear, spec: QuantSpec) -> torch.Tensor:
        return rtn_dequantized(module.weight, spec.bits, spec.group_for(module.in_features), spec.sym)

    def _per_block(self, weight: Callable[[str], torch.Tensor]) -> Iterator[BlockWeights]:
        """``weight(name)`` of every linear, a block at a time (computed as the writer asks)."""
        for names in self.blocks.values():
            yield {name: weight(name) for name in names}

    def _cache(self, setting: Setting, compute: Callable[[], Iterable[BlockWeights]]) -> None:
        """The setting's folder: read if cached and readable, else ``compute()``'s blocks saved one
        by one as they come, under its lock."""

        def build(tmp: Path) -> Path:
            log.info("caching %s weights in %s", setting.key, self.path(setting))
            for weights in compute():
                self._save_block(weights, tmp)
            return tmp

        load_or_build(self.path(setting), self._check, build, folder=True)

    def _save_block(self, weights: BlockWeights, folder: Path) -> None:
        layer = self.layers[next(iter(weights))]
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}
        save_file(tensors, str(self._block_file(folder, layer)))

    @staticmethod
    def _block_file(folder: Path, layer: int) -> Path:
        return folder / f"block-{layer:03d}.safetensors"

    def _check(self, folder: Path) -> Path:
        """``folder`` if it is whole (its manifest's sizes) and holds this model's linears, one
        safetensors file a block; raises otherwise."""
        check_manifest(folder)
        for layer, names in self.blocks.items():
            with safe_open(str(self._block_file(folder, layer)), framework="pt", device="cpu") as handle:
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            if shapes != {name: self.shapes[name] for name in names}:
                raise ValueError(f"its block {layer} does not hold this model's linears")
        return folder
