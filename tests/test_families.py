"""Every family of conftest.FAMILIES (dense, sliding-window, post-norm, fused, scaled and MoE) through small
versions of each analysis: RTN and GPTQ quantize every block linear (routed experts' included), recall and the
logit lens, components and the sensitivity maps. Patching and the representation metrics run per family in
test_patching.py and test_representations.py (the ``family_model`` fixture)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from quantdiag.analysis.components import component_arrays
from quantdiag.analysis.forward import score_prompts
from quantdiag.analysis.sensitivity import correct_under, sensitivity_arrays
from quantdiag.config import RunConfig
from quantdiag.data.facts import load_pararel, tokenize
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.calib import Calibration
from quantdiag.quant.plans import blocks_plan
from quantdiag.quant.spec import REFERENCE, PrecisionPlan, QuantSpec
from quantdiag.results import MOE_NOTE, _notes
from quantdiag.state import RunContext

from conftest import FAMILIES, tiny_model

GROUP = 32
SPECS = (QuantSpec("rtn", 2, GROUP), QuantSpec("gptq", 2, GROUP))
#: The sensitivity maps' setting: at 3 bits some of every tiny model's answers survive and some do not.
SWEPT = QuantSpec("rtn", 3, GROUP)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """A 2-block model of the family, its bank holding the 2-bit settings and SWEPT, and 12 ParaRel prompts whose
    targets are the model's own answers (the reference gets them all right)."""
    loaded = tiny_model(request.param, layers=2)
    ids = torch.randint(1, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    bank = WeightBank(loaded, Calibration(ids, "random"), request.getfixturevalue("tmp_path_factory").mktemp("bank"))
    for spec in (*SPECS, SWEPT):
        bank.ensure(spec)
    facts = load_pararel(["P19", "P36", "P103"], 4, 0)
    prompts = [p for i, fact in enumerate(facts) if (p := tokenize(loaded.tokenizer, fact, i)) is not None]
    answers = score_prompts(loaded, prompts, 4).predicted
    return loaded, bank, [replace(p, target=int(answer)) for p, answer in zip(prompts, answers)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.method)
def test_every_block_linear_is_quantized_onto_its_grid(family, spec):
    """The setting's block files hold every nn.Linear of the blocks (each expert's too), each changed and each group
    of 32 weights of a row holding at most 2^2 values."""
    loaded, bank, _ = family
    blocks = {n: m for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    stored = {}
    for file in bank.path(spec).glob("block-*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            stored |= {name: handle.get_tensor(name) for name in handle.keys()}
    assert set(stored) == set(blocks)
    for name, module in blocks.items():
        assert not torch.equal(stored[name], module.weight), name
        assert max(len(torch.unique(group)) for group in stored[name].reshape(-1, GROUP)) <= 4, name


def test_lens_at_the_last_layer_is_the_recall_output(family):
    """The lens of the last block's output gives each prompt's target probability and rank of the forward."""
    loaded, _, prompts = family
    scores = score_prompts(loaded, prompts, 4, lens_rows=np.ones(len(prompts), dtype=bool))
    np.testing.assert_allclose(scores.lens_prob[:, -1], scores.target_prob, rtol=1e-4, atol=1e-7)
    assert np.array_equal(scores.lens_rank[:, -1], scores.target_rank)


def test_components_compare_every_layer(family):
    """2-bit weights move every layer's MLP output (cosine below 1) and flip some gate signs; a mixture of
    experts has no single gate or intermediate: its sign flips and Jaccard are NaN."""
    loaded, bank, prompts = family
    key = SPECS[0].key
    arrays = component_arrays(loaded, bank, [SPECS[0]], prompts, 4)
    assert arrays[f"{key}/value_cosine"].shape == (len(prompts), 2)
    assert (arrays[f"{key}/value_cosine"] < 1 - 1e-4).all()
    if loaded.adapter.arch.routed:
        assert np.isnan(arrays[f"{key}/sign_flip"]).all() and np.isnan(arrays[f"{key}/jaccard"]).all()
    else:
        assert (arrays[f"{key}/sign_flip"] > 0).any() and (arrays[f"{key}/sign_flip"] < 0.5).all()


def test_sensitivity_sweeps_resume_like_full_forwards(family):
    """The domino test with every block quantized and the 'all' component group give, prompt by prompt, what a
    full forward of the uniformly quantized model gives; block 0 alone quantized is what its plan gives."""
    loaded, bank, prompts = family
    arrays = sensitivity_arrays(loaded, bank, SWEPT, prompts, 4)
    uniform = correct_under(loaded, bank, PrecisionPlan.uniform(SWEPT), prompts, 4)
    assert 0 < uniform.sum() < len(prompts)  # some answers survive, some do not
    assert np.array_equal(arrays["domino"][-1], uniform)
    assert np.array_equal(arrays["component/all"], uniform)
    assert np.array_equal(arrays["single"][0], correct_under(loaded, bank, blocks_plan(SWEPT, 0, 1), prompts, 4))
    bank.apply(PrecisionPlan.uniform(REFERENCE))


def test_a_mixture_of_experts_run_notes_the_skipped_metrics(family):
    """results.json's notes say why a mixture of experts has no sign flips or Jaccard; a dense model's do not."""
    loaded, bank, _ = family
    notes = _notes(RunContext(None, loaded, bank, SimpleNamespace(dropped=0, probe=None), RunConfig()), [])
    assert (MOE_NOTE in notes) == (loaded.model.config.model_type == "qwen3_moe")
