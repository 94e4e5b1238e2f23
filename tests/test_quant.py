import os

import pytest
import torch

from quantdiag.errors import QuantdiagError
from quantdiag.quant.rtn import rtn_dequantized
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, Rule, average_bits

# One row, two groups of 4, 2-bit (q = 0..3), worked by hand on GPTQ's grid: the range [lo, hi] holds 0,
# scale = (hi - lo) / 3, value = scale * (clamp(round(w / scale) + zero, 0, 3) - zero); round is half to even.
HAND_ROW = [-1.5, -0.25, 0.75, 1.0, 0.625, 1.0, 0.125, 1.5]
HAND_WORKED = {
    # symmetric, zero = 2. Group 1: lo = -hi = -1.5, scale 1, round(w) = -2, 0, 1, 1 -> q = 0, 2, 3, 3.
    # Group 2 has no negative weight, so lo stays 0 (GPTQ's rule): scale 0.5, round(w / scale) = 1, 2, 0, 3
    # -> q = 3, 4, 2, 5, clipped to 3, 3, 2, 3.
    True: [-2.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.5],
    # asymmetric. Group 1: scale (1 + 1.5) / 3 = 5/6, zero = round(1.5 / (5/6)) = round(1.8) = 2,
    # round(w / scale) = round(-1.8, -0.3, 0.9, 1.2) = -2, 0, 1, 1 -> q = 0, 2, 3, 3.
    # Group 2: range [0, 1.5], scale 0.5, zero 0, q = round(1.25, 2, 0.25, 3) = 1, 2, 0, 3.
    False: [-5 / 3, 0.0, 5 / 6, 5 / 6, 0.5, 1.0, 0.0, 1.5],
}


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_equals_a_hand_worked_2_bit_row(sym):
    out = rtn_dequantized(torch.tensor([HAND_ROW]), bits=2, group_size=4, sym=sym)
    torch.testing.assert_close(out, torch.tensor([HAND_WORKED[sym]]))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_equals_gptqmodels_quantizer(bits, sym):
    """GPTQModel's own Quantizer (min-max, no search) on every group of 8: hand-made ones (no negative
    weight, no positive weight, an outlier, all zero) and 4098 seeded random rows (mixed signs), so the
    weight spans more than one of rtn's 4096-row chunks."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel refuses to start on a small box without it
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer

    t = torch.linspace(-1, 1, 8)
    hand_made = torch.cat([t.abs() + 0.1, -(t**2) - 0.2, torch.where(t > 0.9, 8.0, t.sin()), torch.zeros(8)])
    weight = torch.cat([hand_made.reshape(2, 16), torch.randn(4098, 16, generator=torch.Generator().manual_seed(0))])
    quantizer = Quantizer(QuantizeConfig(bits=bits, group_size=8, sym=sym, desc_act=False, offload_to_disk=False))
    quantizer.configure(perchannel=True)
    groups = weight.reshape(-1, 8)
    quantizer.find_params(groups, weight=True)
    expected = quantizer.quantize(groups).reshape_as(weight)
    torch.testing.assert_close(rtn_dequantized(weight, bits, 8, sym), expected, rtol=0, atol=1e-6)


def test_rtn_keeps_dtype_and_zero_groups():
    weight = torch.zeros(4, 64, dtype=torch.bfloat16)
    out = rtn_dequantized(weight, 4, 32)
    assert out.dtype == torch.bfloat16 and torch.equal(out, weight)


@pytest.mark.parametrize(
    ("width", "group", "expected"), [(576, 128, 64), (1536, 128, 128), (4096, 128, 128), (100, 128, 4), (96, 32, 32)]
)
def test_group_size_falls_back_to_largest_power_of_two_divisor(width, group, expected):
    assert QuantSpec("rtn", 4, group).group_for(width) == expected


@pytest.mark.parametrize(
    ("method", "bits", "group"), [("rtn", 1, 128), ("rtn", 9, 128), ("gptq", 4, 0), ("hqq", 4, 128)]
)
def test_bad_specs_are_user_errors(method, bits, group):
    with pytest.raises(QuantdiagError):
        QuantSpec(method, bits, group)


def test_spec_key_names_every_field():
    assert QuantSpec("gptq", 3, 64, sym=False).key == "gptq-w3-g64-asym"


def test_average_bits_two_of_32_blocks_at_8_on_4_bit():
    names = [f"model.layers.{layer}.mlp.down_proj" for layer in range(32)]
    four, eight = QuantSpec("gptq", 4), QuantSpec("gptq", 8)
    plan = PrecisionPlan(default=four, rules=(Rule(eight, layers=(0, 2)),))
    assignment = {name: plan.setting_for(name, layer) for layer, name in enumerate(names)}
    assert average_bits(assignment, dict.fromkeys(names, (10, 100))) == pytest.approx(4.25)


def test_later_rules_override_earlier_ones():
    plan = PrecisionPlan(
        default="a", rules=(Rule("b", pattern=r"mlp\."), Rule("c", pattern="down_proj", layers=(1, 3)))
    )
    assert plan.setting_for("model.layers.0.self_attn.q_proj", 0) == "a"
    assert plan.setting_for("model.layers.0.mlp.down_proj", 0) == "b"
    assert plan.setting_for("model.layers.2.mlp.down_proj", 2) == "c"
    assert plan.setting_for("model.layers.3.mlp.down_proj", 3) == "b"
    assert PrecisionPlan.uniform(REFERENCE).setting_for("model.layers.0.mlp.up_proj", 0) == REFERENCE
