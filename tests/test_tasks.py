"""Tasks through lm-evaluation-harness: the shipped local tasks' items checked against their
sources, and a run's task accuracy per setting against lm-eval's own ``HFLM`` loaded from a folder
of the same weights."""

from __future__ import annotations

import json

import lm_eval
import numpy as np
import pytest
import torch

from quantdiag.analysis.similarity import debiased_cka
from quantdiag.analysis.tasks import LOCAL_TASKS, SHIPPED, task_config
from quantdiag.config import RunConfig
from quantdiag.data.facts import load_pararel
from quantdiag.errors import QuantdiagError
from quantdiag.pipeline import run
from quantdiag.quant.rtn import rtn_dequantized

from conftest import save_model, tiny_model

LIMIT = 30


def _items(name: str) -> list[dict]:
    return [json.loads(line) for line in (LOCAL_TASKS / f"{name}.jsonl").read_text().splitlines()]


def test_the_multiple_choice_items_are_pararel_facts_with_other_languages_beside_them():
    facts = {(fact.subject, fact.object) for fact in load_pararel(["P37"], None, 0)}
    items = _items("quantdiag_languages")
    assert len(items) >= 100
    for item in items:
        assert (item["subject"], item["choices"][item["answer"]]) in facts
        assert len(set(item["choices"])) == 4
    assert len({item["answer"] for item in items}) == 4  # the right answer is not always in one place


def test_the_arithmetic_items_are_right():
    items = _items("quantdiag_arithmetic")
    assert len(items) >= 100
    for item in items:
        a, operator, b = item["question"].removeprefix("What is ").removesuffix("?").split()
        assert int(item["answer"]) == (int(a) + int(b) if operator == "+" else int(a) - int(b))


def test_a_shipped_task_reads_its_packaged_data_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in SHIPPED:
        (path,) = task_config(name)["dataset_kwargs"]["data_files"].values()
        assert path == str(LOCAL_TASKS / f"{name}.jsonl")
    assert task_config("mmlu") == "mmlu"  # lm-eval's registry resolves other names
    with pytest.raises(QuantdiagError, match="task file not found"):
        task_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(QuantdiagError, match="cannot be read as an lm-eval task"):
        task_config(str(tmp_path / "broken.yaml"))


def _hflm_accuracy(folder, task: str) -> float:
    """lm-eval's own route: ``HFLM`` loaded from ``folder`` by name."""
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},device=cpu,dtype=float32",
        tasks=[task_config(task)],
        limit=LIMIT,
        bootstrap_iters=0,
        log_samples=False,
    )
    return output["results"][task]["acc,none"]


def _run(loaded, tmp_path, **options) -> dict:
    """The results of a run, RTN at 4 and 2 bits (groups of 32) and no analyses, on ``loaded``
    saved as a folder, with ``options`` (the task options)."""
    save_model(loaded, tmp_path / "reference")
    config = RunConfig(
        out=str(tmp_path / "run"),
        model=str(tmp_path / "reference"),
        methods=("rtn",),
        bits=(4, 2),
        group_size=32,
        preset="quick",
        relations=("P19", "P36"),
        facts_per_relation=4,
        analyses=(),
        device="cpu",
        **options,
    )
    return run(config).results


def _write_rtn_2_bit(loaded) -> None:
    """RTN 2-bit (groups of 32) written into every block linear of ``loaded``, by hand."""
    with torch.no_grad():
        for module in loaded.model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(rtn_dequantized(module.weight, 2, 32))


def test_each_settings_task_accuracy_equals_lm_evals_own_model_loaded_from_its_weights(tmp_path):
    loaded = tiny_model("llama")
    with torch.no_grad():  # blocks that write strongly, so their quantization moves the choices
        for block in loaded.model.model.layers:
            block.mlp.down_proj.weight.mul_(30)
            block.self_attn.o_proj.weight.mul_(30)
    results = _run(loaded, tmp_path, tasks=("quantdiag_languages",), task_limit=LIMIT)
    _write_rtn_2_bit(loaded)
    save_model(loaded, tmp_path / "rtn2")
    by_label = {setting["label"]: setting for setting in results["settings"]}
    for label, folder in (("Reference", "reference"), ("RTN 2-bit", "rtn2")):
        score = by_label[label]["tasks"]["quantdiag_languages"]
        assert (score["metric"], score["items"]) == ("acc", LIMIT)
        assert score["value"] == pytest.approx(_hflm_accuracy(tmp_path / folder, "quantdiag_languages"), abs=1e-9)
    assert by_label["RTN 2-bit"]["tasks"] != by_label["Reference"]["tasks"]  # the weights are the setting's
    assert results["tasks"] == ["quantdiag_languages"]
    report = (tmp_path / "run" / "report.html").read_text()
    assert "<th>quantdiag_languages</th>" in report


def test_an_unknown_task_or_missing_task_file_stops_the_run_before_any_work(tmp_path):
    for name, message in (("no_such_task_anywhere", "unknown lm-eval task"), ("gone.yaml", "task file not found")):
        config = RunConfig(out=str(tmp_path / "run"), methods=("rtn",), bits=(4,), tasks=(name,))
        with pytest.raises(QuantdiagError, match=message):
            run(config)
        assert not (tmp_path / "run").exists()


def _last_token_states(model, tokenizer, texts: list[str]) -> np.ndarray:
    """Each text's residual stream after every block but the last (HF's last hidden state is
    normed) at its last token: texts x layers x width."""
    with torch.no_grad():
        return np.stack(
            [
                torch.stack(
                    model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[1:-1]
                )[:, 0, -1].numpy()
                for text in texts
            ]
        )


def test_representations_on_a_task_compare_the_last_token_of_lm_evals_contexts(tmp_path):
    """``--representations-on``: the CKA diagonal of RTN 2-bit against the reference at the last
    token of the task's prompts, against CKA of hidden states captured here from the task's own
    template filled by hand, with the setting's weights written into the model here."""
    loaded = tiny_model("llama")
    results = _run(loaded, tmp_path, representations_on="quantdiag_languages", task_limit=12)
    key = "task:quantdiag_languages"
    summary = next(s for s in results["settings"] if s["label"] == "RTN 2-bit")["representations"][key]
    assert summary["prompts"] == 12
    assert list(summary["cka"]["resid"]) == list(summary["subspaces"]) == ["last"]
    subjects = [item["subject"] for item in _items("quantdiag_languages")[:12]]
    texts = [f"Question: What is the official language of {subject}?\nAnswer:" for subject in subjects]
    reference = _last_token_states(loaded.model, loaded.tokenizer, texts)
    _write_rtn_2_bit(loaded)
    compared = _last_token_states(loaded.model, loaded.tokenizer, texts)
    diagonal = np.diag(np.array(summary["cka"]["resid"]["last"], dtype=float))
    expected = [debiased_cka(reference[:, layer], compared[:, layer]) for layer in range(reference.shape[1])]
    np.testing.assert_allclose(diagonal[: len(expected)], expected, rtol=1e-4, atol=1e-6)
    assert min(expected) < 0.99  # 2-bit moved the representations
    report = (tmp_path / "run" / "report.html").read_text()
    assert f"Representation similarity per layer, {key} (12 prompts" in report
