"""Which settings get which analysis: signal injection's low and high settings, the repairs'
protecting setting and the Failure count they need, worked out by hand from the settings."""

from __future__ import annotations

import numpy as np

from quantdiag.analysis.repairs import protect_setting, repairable
from quantdiag.analysis.sensitivity import injection_settings
from quantdiag.quant.checkpoint import CheckpointSpec
from quantdiag.quant.spec import REFERENCE, QuantSpec

CHECKPOINT = CheckpointSpec("/models/q", "gptq", 4, "My Model", "v1")


def test_injection_goes_into_the_2_bit_setting_from_the_reference_then_8_then_4_bit():
    specs = [QuantSpec("rtn", bits, 32) for bits in (4, 3, 2, 8)] + [QuantSpec("gptq", 8, 32)]
    two, eight, four = (QuantSpec("rtn", bits, 32) for bits in (2, 8, 4))
    assert injection_settings("rtn", specs) == (two, [REFERENCE, eight, four])


def test_injection_uses_the_higher_settings_the_run_has_and_needs_a_2_bit_one():
    specs = [QuantSpec("rtn", 2, 32), QuantSpec("gptq", 4, 32), QuantSpec("gptq", 3, 32)]
    assert injection_settings("rtn", specs) == (QuantSpec("rtn", 2, 32), [REFERENCE])
    assert injection_settings("gptq", specs) is None
    assert injection_settings(CHECKPOINT.method, [*specs, CHECKPOINT]) is None


def test_repairs_protect_with_the_methods_8_bit_setting_and_a_checkpoint_with_the_reference():
    assert protect_setting(QuantSpec("gptq", 3, 64, sym=False)) == QuantSpec("gptq", 8, 64, sym=False)
    assert protect_setting(CHECKPOINT) == REFERENCE


def test_repairs_need_two_failure_prompts_of_the_settings_own_method():
    groups = {
        "rtn": {"robust": np.arange(5), "failure": np.array([3])},
        "gptq": {"robust": np.arange(0), "failure": np.array([1, 4])},
    }
    assert [repairable(QuantSpec(method, 2), groups) for method in ("rtn", "gptq")] == [False, True]
    assert not repairable(CHECKPOINT, groups)
