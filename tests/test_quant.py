import pytest
import torch

from quantdiag.errors import QuantdiagError
from quantdiag.quant.rtn import rtn_dequantized
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, Rule, average_bits, effective_group_size


def test_rtn_error_shrinks_with_bits():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    errors = [(rtn_dequantized(weight, bits, 128) - weight).pow(2).mean().item() for bits in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4 * weight.pow(2).mean().item()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_uses_at_most_2_to_the_bits_levels_per_group(bits, sym):
    weight = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    deq = rtn_dequantized(weight, bits, 64, sym).reshape(8, 4, 64)
    for row in deq.reshape(-1, 64):
        assert len(torch.unique(row)) <= 2**bits


def test_rtn_keeps_dtype_and_zero_groups():
    weight = torch.zeros(4, 64, dtype=torch.bfloat16)
    out = rtn_dequantized(weight, 4, 32)
    assert out.dtype == torch.bfloat16 and torch.equal(out, weight)


@pytest.mark.parametrize(("width", "group", "expected"), [(576, 128, 64), (1536, 128, 128), (4096, 128, 128), (100, 128, 4), (96, 32, 32)])
def test_group_size_falls_back_to_largest_power_of_two_divisor(width, group, expected):
    assert effective_group_size(width, group) == expected


@pytest.mark.parametrize(("method", "bits", "group"), [("rtn", 1, 128), ("rtn", 9, 128), ("gptq", 4, 0), ("awq", 4, 128)])
def test_bad_specs_are_user_errors(method, bits, group):
    with pytest.raises(QuantdiagError):
        QuantSpec(method, bits, group)


def test_spec_key_round_trip():
    spec = QuantSpec("gptq", 3, 64, sym=False)
    assert QuantSpec.from_key(spec.key) == spec


def test_average_bits_two_of_32_blocks_at_8_on_4_bit():
    names = [f"model.layers.{layer}.mlp.down_proj" for layer in range(32)]
    four, eight = QuantSpec("gptq", 4).key, QuantSpec("gptq", 8).key
    plan = PrecisionPlan(default=four, rules=(Rule(eight, layers=(0, 2)),))
    assignment = {name: plan.setting_for(name, layer) for layer, name in enumerate(names)}
    assert average_bits(assignment, dict.fromkeys(names, (10, 100))) == pytest.approx(4.25)


def test_later_rules_override_earlier_ones():
    plan = PrecisionPlan(default="a", rules=(Rule("b", pattern=r"mlp\."), Rule("c", pattern="down_proj", layers=(1, 3))))
    assert plan.setting_for("model.layers.0.self_attn.q_proj", 0) == "a"
    assert plan.setting_for("model.layers.0.mlp.down_proj", 0) == "b"
    assert plan.setting_for("model.layers.2.mlp.down_proj", 2) == "c"
    assert plan.setting_for("model.layers.3.mlp.down_proj", 3) == "b"
    assert PrecisionPlan.uniform(REFERENCE).setting_for("model.layers.0.mlp.up_proj", 0) == REFERENCE
