"""End to end on the built-in SmolLM2 with the quick preset (recall, lens, components,
representations, the early domino test and early protection): RTN and GPTQ at 4 and 2 bits and
their verdicts, then ``quantdiag patch`` on the finished run (residual patching, 4 prompts a
subset), ``quantdiag sensitivity`` at 2 bits and ``quantdiag repair`` at 4 and 2 bits (early
protection of 3 blocks and EoRA, the repairs the paper's Table 1 contrasts; the others are tested
on tiny models), the report in headless Chromium, and ``quantdiag diagnose`` on a GGUF file.

Uses the user's quantdiag cache (content-keyed, so sharing it is safe): the first run on a fresh
machine converts the GGUF, generates calibration text and quantizes (a few minutes); reruns reuse it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants
from typer.testing import CliRunner

from quantdiag.analysis.distribution import distribution_arrays, distribution_summary, held_out_text
from quantdiag.analysis.effects import early_last_subject, from_json
from quantdiag.cli import app
from quantdiag.config import RunConfig
from quantdiag.model.load import builtin_gguf, load_reference
from quantdiag.pipeline import run
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.spec import REFERENCE, QuantSpec

from browser import needs_chromium, open_report

pytestmark = pytest.mark.e2e
#: Relations SmolLM2-135M knows (reference accuracy 15-60%); on most others it says " the".
KNOWN_RELATIONS = ("P103", "P37", "P1412", "P178")


@pytest.fixture(autouse=True)
def isolated_cache():
    """Override the unit tests' per-test cache: quantized SmolLM2 settings are worth keeping."""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    config = RunConfig(
        out=str(tmp_path_factory.mktemp("e2e") / "run"),
        preset="quick",
        bits=(4, 2),
        relations=KNOWN_RELATIONS,
        facts_per_relation=30,
        device="cpu",
    )
    report = run(config).report
    return config, report, json.loads((report.parent / "results.json").read_text())


def _setting(results: dict, label: str) -> dict:
    return next(s for s in results["settings"] if s["label"] == label)


def test_the_performance_cliff(quick_run):
    """4-bit is a rank drop (answers stay near the top); 2-bit is a collapse (ranks in the
    thousands, accuracy near zero). A 135M model loses more at 4-bit than an 8B one does."""
    _, _, results = quick_run
    reference = _setting(results, "Reference")["recall"]
    assert reference["accuracy"] > 0.15
    for method in ("RTN", "GPTQ"):
        four, two = _setting(results, f"{method} 4-bit")["recall"], _setting(results, f"{method} 2-bit")["recall"]
        assert four["accuracy"] >= 0.4 * reference["accuracy"], method
        assert four["median_rank"] <= 2 * reference["median_rank"], method
        assert two["accuracy"] <= 0.1 * reference["accuracy"], method
        assert two["median_rank"] > 100 * reference["median_rank"], method
        assert two["robustness_accuracy"] == 0.0, method


def test_robustness_answers_measure_the_reference(quick_run):
    """The instruction-wrapped paraphrases, answered in SmolLM2's chat template, score the
    reference (measured: 40% with the quick preset on the relations its probe keeps) where its
    first token scored 0% for every setting."""
    _, _, results = quick_run
    assert _setting(results, "Reference")["recall"]["robustness_accuracy"] > 0.2


def test_report_and_lens_per_subset(quick_run):
    config, report, results = quick_run
    html = report.read_text()
    assert "Performance cliff" in html and "Logit lens, GPTQ" in html and html.count("data:image/png;base64,") >= 5
    assert results["model"]["n_layers"] == 30 and results["model"]["family"] == "llama"
    assert any("group size 64" in note for note in results["notes"])
    for setting in results["settings"][1:]:
        robust = setting["lens"][f"{setting['method']}:robust"]
        assert robust is not None and len(robust["mean_prob"]) == 30
    for name in ("cliff", "ranks", "lens-rtn", "lens-gptq", "relations"):
        assert (report.parent / "figures" / f"{name}.svg").is_file()


def test_quick_verdicts_4_bit_is_degradation_2_bit_is_collapse(quick_run):
    """The issue's acceptance: on the quick preset GPTQ 4-bit is Signal Degradation and RTN 2-bit
    is Computation Collapse, decided by the mechanism question (docs/verdict.md, the three
    questions); the report opens with their cards. The per-signature votes of the earlier
    vote-counting rules are no longer asserted: under the intervals and the noise floor a
    signature close to its line does not vote."""
    _, report, results = quick_run
    four, two = (_setting(results, label)["verdict"] for label in ("GPTQ 4-bit", "RTN 2-bit"))
    assert four["verdict"] == "degradation", four
    assert two["verdict"] == "collapse", two
    html = report.read_text()
    assert html.index("Computation Collapse") < html.index("Performance cliff")


def test_a_rerun_resumes_from_finished_stages(quick_run):
    config, report, results = quick_run
    stages = {p: p.stat().st_mtime_ns for p in (report.parent / "stages").iterdir()}
    start = time.perf_counter()
    run(config)
    assert time.perf_counter() - start < 120
    assert {p: p.stat().st_mtime_ns for p in (report.parent / "stages").iterdir()} == stages
    assert json.loads((report.parent / "results.json").read_text())["settings"] == results["settings"]


@pytest.fixture(scope="module")
def patched_run(quick_run):
    _, report, _ = quick_run
    args = ["patch", str(report.parent), "--analyses", "patching", "--streams", "resid", "--patch-prompts", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return report, json.loads((report.parent / "results.json").read_text())


def test_patching_restores_4_bit_not_2_bit(patched_run):
    """The paper's Fig. 4: on the Failure subset, the reference's residual at the last subject
    token in early layers restores the 4-bit model's answer, not the 2-bit model's."""
    _, results = patched_run
    for method in ("RTN", "GPTQ"):
        key = f"{method.lower()}:failure"
        four, two = (
            early_last_subject(
                from_json(_setting(results, f"{method} {bits}-bit")["causal"][key]["patching"]["resid"]["restoration"])
            )
            for bits in (4, 2)
        )
        assert four > max(5 * two, two + 0.005), (method, four, two)


def test_patch_adds_the_causal_section(patched_run):
    report, results = patched_run
    assert results["causal"]["analyses"] == ["patching"] and "causal" not in results["settings"][0]
    html = report.read_text()
    assert "Cross-model patching, GPTQ, Failure subset" in html and "restored" in html
    assert (report.parent / "figures" / "causal-tokens-gptq.svg").is_file()
    arrays = np.load(report.parent / "arrays.npz")
    grid = arrays["gptq-w4-g128-sym/causal/gptq:failure/patching/resid"]
    assert grid.shape[:2] == (4, 30) and np.isfinite(grid[:, :, 0]).all()


def test_2_bit_components_are_worse_than_4_bit(patched_run):
    """METHODS 4: at most layers the 2-bit gates flip more signs and the MLP outputs point further
    from the reference's than at 4-bit (Failure subset); patching stays in the results."""
    report, results = patched_run
    assert results["config"]["analyses"] == ["components", "representations", "sensitivity", "repairs", "patching"]
    assert "Components, GPTQ, Failure subset" in report.read_text()
    for method in ("RTN", "GPTQ"):
        key = f"{method.lower()}:failure"
        four, two = (_setting(results, f"{method} {bits}-bit")["components"][key] for bits in (4, 2))
        assert "patching" in _setting(results, f"{method} 4-bit")["causal"][key]
        assert np.mean(np.array(two["sign_flip"]) > np.array(four["sign_flip"])) > 0.5, method
        assert np.mean(np.array(two["value_cosine"]) < np.array(four["value_cosine"])) > 0.5, method


def test_2_bit_representations_drift_further_than_4_bit(patched_run):
    """METHODS 5: at most layers the 2-bit residual stream keeps less of the reference's CKA
    diagonal and of its activation subspace than 4-bit (Failure subset, last subject token)."""
    report, results = patched_run
    assert "CKA at the last subject token, GPTQ, Failure subset" in report.read_text()
    assert (report.parent / "figures" / "subspaces-rtn.svg").is_file()
    for method in ("RTN", "GPTQ"):
        key = f"{method.lower()}:failure"
        four, two = (_setting(results, f"{method} {bits}-bit")["representations"][key] for bits in (4, 2))
        diagonal = {
            name: np.diag(np.array(r["cka"]["resid"]["subject"], dtype=float)) for name, r in (("4", four), ("2", two))
        }
        assert np.mean(diagonal["2"] < diagonal["4"]) > 0.5, method
        activation = {name: np.array(r["subspaces"]["subject"]["activation"]) for name, r in (("4", four), ("2", two))}
        assert np.mean(activation["2"] < activation["4"]) > 0.5, method


@pytest.fixture(scope="module")
def repaired_run(quick_run):
    _, report, _ = quick_run
    run_dir = str(report.parent)
    for args in (
        ["sensitivity", run_dir, "--sensitivity-bits", "2"],
        ["repair", run_dir, "--repair-bits", "4,2", "--repairs", "early,eora", "--protect-blocks", "3"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    return report, json.loads((report.parent / "results.json").read_text())


def test_2_bit_damage_starts_at_the_source(repaired_run):
    """The paper's Table 2 and Fig. 11: quantizing the first few blocks at 2-bit already loses
    half of what the whole 2-bit model loses, and the more leading blocks stay at reference
    precision, the closer the 2-bit model's last-layer residual is to the reference's."""
    report, results = repaired_run
    assert "Where the damage starts, RTN" in report.read_text()
    for method in ("RTN", "GPTQ"):
        assert _setting(results, f"{method} 2-bit")["sensitivity"]["half_damage_block"] <= 5, method
        cosine = np.array(results["injection"][method.lower()]["cosine"][0])  # high = reference
        assert cosine[-1, -1] > 0.99 and cosine[0, -1] < cosine[len(cosine) // 2, -1] < cosine[-1, -1], method


@needs_chromium
def test_the_full_report_opens_cleanly_in_chromium(repaired_run):
    """Every section kind (lens, causal, components, representations, sensitivity, repairs) in a
    real browser: no console errors, every figure loaded, one card per setting."""
    report, results = repaired_run
    errors, page = open_report(report, report.with_suffix(".png"))
    figures = len(list((report.parent / "figures").glob("*.png")))
    assert errors == [] and page["broken"] == [] and page["images"] == figures >= 15
    assert page["cards"] == len(results["settings"]) - 1


def test_repairs_help_4_bit_not_2_bit(repaired_run):
    """The paper's Table 1: early protection and EoRA recover Failure-subset answers at 4-bit
    (whose baseline there is 0 by definition); at 2-bit no repair comes close to the reference's
    100%."""
    report, results = repaired_run
    assert "Repairs, GPTQ" in report.read_text()
    for method in ("RTN", "GPTQ"):
        four = {row["repair"]: row for row in _setting(results, f"{method} 4-bit")["repairs"]["rows"]}
        assert four["baseline"]["failure"] == 0 and four["early"]["average_bits"] > 4
        assert four["early"]["failure"] > 0 and four["eora"]["failure"] > 0, (method, four)
        two = _setting(results, f"{method} 2-bit")["repairs"]["rows"]
        assert max(row["failure"] for row in two) < 0.5 and max(row["robust"] for row in two) < 0.5, (method, two)


def _requantized_gguf(source: Path, target: Path, qtype: GGMLQuantizationType) -> None:
    """A copy of a GGUF file with every block's 2-D weights requantized to ``qtype`` (metadata and
    the other tensors as they are), written with gguf-py."""
    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name != "general.architecture" and not field.name.startswith("GGUF."):
            value_type = field.types[0]
            writer.add_key_value(
                field.name,
                field.contents(),
                value_type,
                sub_type=field.types[-1] if value_type == GGUFValueType.ARRAY else None,
            )
    tensors = []
    for tensor in reader.tensors:
        data, kind = tensor.data, tensor.tensor_type
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            data, kind = quants.quantize(quants.dequantize(tensor.data, tensor.tensor_type), qtype), qtype
        tensors.append((tensor.name, data, kind))
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in tensors:
        writer.write_tensor_data(data)
    writer.close()


def test_diagnose_a_gguf_file(tmp_path):
    """SmolLM2 requantized from Q4_1 to Q4_0 as a GGUF file: read, dequantized by transformers,
    judged against the built-in reference: Signal Degradation (it keeps less than 90% of the
    reference's accuracy and no signature votes Collapse)."""
    checkpoint = tmp_path / "smollm2-q4_0.gguf"
    _requantized_gguf(builtin_gguf(), checkpoint, GGMLQuantizationType.Q4_0)
    args = [
        "diagnose",
        "--compare",
        str(checkpoint),
        "--preset",
        "quick",
        "--relations",
        ",".join(KNOWN_RELATIONS),
        "--facts",
        "30",
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    model = json.loads(result.stdout)["models"][0]
    assert model["label"] == "smollm2-q4_0 (GGUF 4.50-bit)"  # Q4_0: 18 bytes per 32 weights
    # Measured: 42% of the reference's accuracy kept (11.7% vs 27.5%; Healthy needs 90%), every signature on its
    # intact side (mechanism score +0.68; early protection recovers 55% of the Failure test split).
    assert result.exit_code == 3 and model["verdict"]["verdict"] == "degradation", model
    flips = next(row for row in model["verdict"]["signatures"] if row["name"] == "sign_flip")
    assert 0 < flips["value"] < 0.25


@pytest.fixture(scope="module")
def awq_run(tmp_path_factory):
    """The quick preset with RTN and AWQ at 4 bits and the distribution statistics, on 4
    calibration sequences: AWQ's scale search runs each block's attention and MLP 20 times over
    the calibration text (about 3 minutes a width on the default 16 sequences here). Without
    repairs, whose early protection would quantize AWQ at 8 bits too."""
    config = RunConfig(
        out=str(tmp_path_factory.mktemp("e2e") / "awq"),
        preset="quick",
        methods=("rtn", "awq"),
        bits=(4,),
        relations=KNOWN_RELATIONS,
        facts_per_relation=30,
        calib_samples=4,
        analyses=("components", "representations", "sensitivity", "distribution"),
        device="cpu",
    )
    return json.loads((run(config).report.parent / "results.json").read_text())


def test_awq_4_bit_is_closer_to_the_reference_than_rtn_4_bit(awq_run):
    """AWQ's promise on the built-in model: a lower mean KL divergence from the reference on the
    held-out text than RTN at the same bits and groups, and every analysis of the run on it."""
    rtn, awq = (_setting(awq_run, label) for label in ("RTN 4-bit", "AWQ 4-bit"))
    assert awq["distribution"]["kld_mean"] < rtn["distribution"]["kld_mean"]
    assert awq["verdict"]["verdict"] == "degradation", awq["verdict"]
    assert {"awq:failure", "awq:robust"} <= set(awq["components"]) & set(awq["representations"])
    assert awq["sensitivity"]


def test_kld_grows_from_8_to_4_to_2_bits_on_the_built_in_model():
    """The distribution statistics on SmolLM2's held-out text (4 generated windows of 256 tokens):
    mean KL divergence from the reference grows and top-token agreement falls as RTN's bits drop."""
    loaded = load_reference("smollm2", "cpu", "auto", False)
    bank = WeightBank(loaded)
    specs = [QuantSpec("rtn", bits, 128) for bits in (8, 4, 2)]
    for spec in specs:
        bank.ensure(spec)
    text = held_out_text(loaded, None, None, 4, 256, 0)
    arrays = distribution_arrays(loaded, bank, [REFERENCE, *specs], text.ids)
    summaries = [distribution_summary(arrays[spec], arrays[REFERENCE]) for spec in specs]
    means = [summary["kld_mean"] for summary in summaries]
    assert 0 < means[0] < means[1] < means[2]
    agreement = [summary["top_token_agreement"] for summary in summaries]
    assert 1 > agreement[0] > agreement[1] > agreement[2]
