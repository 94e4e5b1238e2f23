import torch

from quantdiag.model.stack import calibration_inputs
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.calib import Calibration
from quantdiag.quant.rtn import rtn_dequantized
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec, Rule


def _weights(loaded) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in loaded.model.named_parameters()}


def _calibration(n: int = 8, length: int = 32) -> Calibration:
    return Calibration(torch.randint(1, 500, (n, length), generator=torch.Generator().manual_seed(0)), "random tokens")


def test_apply_reference_restores_weights_bit_for_bit(llama):
    original = _weights(llama)
    bank = WeightBank(llama)
    spec = QuantSpec("rtn", 2, 32)
    bank.ensure(spec)
    bank.apply(PrecisionPlan.uniform(spec))
    assert not torch.equal(
        llama.model.model.layers[0].mlp.up_proj.weight, original["model.layers.0.mlp.up_proj.weight"]
    )
    bank.apply(PrecisionPlan.uniform(REFERENCE))
    for name, tensor in _weights(llama).items():
        assert torch.equal(tensor, original[name]), name


def test_a_plan_swaps_only_the_modules_it_names(llama):
    original = _weights(llama)
    bank = WeightBank(llama)
    spec = QuantSpec("rtn", 4, 32)
    bank.ensure(spec)
    bank.apply(PrecisionPlan(rules=(Rule(spec, pattern=r"mlp\.down_proj", layers=(1, 2)),)))
    changed = {name for name, tensor in _weights(llama).items() if not torch.equal(tensor, original[name])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    expected = rtn_dequantized(original["model.layers.1.mlp.down_proj.weight"], 4, 32)
    assert torch.equal(llama.model.model.layers[1].mlp.down_proj.weight, expected)


def test_each_setting_is_quantized_once_and_reused(llama, monkeypatch):
    spec = QuantSpec("rtn", 3, 32)
    WeightBank(llama).ensure(spec)

    def fail(*_args, **_kwargs):
        raise AssertionError("quantized again")

    monkeypatch.setattr("quantdiag.quant.bank.rtn_dequantized", fail)
    bank = WeightBank(llama)
    assert bank.has(spec)
    bank.ensure(spec)
    bank.apply(PrecisionPlan.uniform(spec))


def test_a_setting_is_written_a_block_at_a_time(llama, monkeypatch):
    """When a block's first linear is quantized, the files of the blocks before it are already
    written and its own is not (a setting is never held whole); the setting then reads back as
    RTN of the reference's weights."""
    original = _weights(llama)
    bank = WeightBank(llama)
    spec = QuantSpec("rtn", 2, 32)
    written, firsts = [], [block.self_attn.q_proj.weight for block in llama.model.model.layers]

    def rtn(weight, *args):
        if any(weight is first for first in firsts):
            written.append(sorted(p.name for p in bank.root.glob(f".{bank.path(spec).name}.*.tmp/block-*")))
        return rtn_dequantized(weight, *args)

    monkeypatch.setattr("quantdiag.quant.bank.rtn_dequantized", rtn)
    bank.ensure(spec)
    assert written == [[f"block-{layer:03d}.safetensors" for layer in range(count)] for count in range(len(firsts))]
    for layer in range(len(firsts)):
        name = f"model.layers.{layer}.mlp.down_proj"
        assert torch.equal(bank.tensor(spec, name), rtn_dequantized(original[f"{name}.weight"], 2, 32))


def test_gptq_keys_depend_on_the_calibration(llama):
    spec = QuantSpec("gptq", 4, 32)
    first = WeightBank(llama, _calibration()).path(spec)
    other = WeightBank(llama, Calibration(torch.ones(8, 32, dtype=torch.long), "ones")).path(spec)
    assert first != other


def test_one_forward_of_the_calibration_set_serves_every_gptq_width_and_eora_pass(llama, monkeypatch):
    """Two GPTQ widths and an EoRA pass each start from the reference's block inputs of the same
    tokens: the bank records them once, and each gets exactly what a forward of its own gives."""
    calibration = _calibration()
    expected = calibration_inputs(llama.adapter, calibration.ids)
    received, recorded = [], []

    def record(adapter, ids):
        recorded.append(ids)
        return calibration_inputs(adapter, ids)

    def gptq(adapter, inputs, spec):
        received.append(inputs)
        for layer, block in enumerate(adapter.blocks):
            yield {
                adapter.linear_name(layer, path): block.get_submodule(path).weight.clone()
                for _, path in adapter.arch.linears
            }

    monkeypatch.setattr("quantdiag.quant.bank.calibration_inputs", record)
    monkeypatch.setattr("quantdiag.quant.bank.gptq_blocks", gptq)
    bank = WeightBank(llama, calibration)
    specs = [QuantSpec("gptq", 4, 32), QuantSpec("gptq", 3, 32)]
    for spec in specs:
        bank.ensure(spec)
    bank.ensure_eora(specs, rank=2)
    assert len(recorded) == 1 and len(received) == 2 and received[0] is received[1]
    for state, reference in zip(received[0].hidden, expected.hidden):
        assert torch.equal(state, reference)
