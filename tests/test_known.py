"""Choosing the relations the reference knows when the user names none (docs/verdict.md, Enough prompts)."""

from __future__ import annotations

import numpy as np
import torch

from quantdiag.analysis import known
from quantdiag.config import PROBE_FACTS, RunConfig
from quantdiag.data.facts import load_pararel, pararel_relations, tokenize
from quantdiag.pipeline import run

from conftest import save_model, tiny_model


def test_known_relations_are_those_at_the_line_best_first():
    probe = {"P19": 0.05, "P36": 0.1, "P37": 0.45, "P101": 0.45, "P103": 0.0999}
    assert known.known_relations(probe) == ("P101", "P37", "P36")  # 10% is in; ties by id
    assert known.known_relations({"P37": 0.0, "P19": 0.05}) == ("P19", "P37")  # none known: all, by id


def test_the_probe_is_the_reference_s_accuracy_per_relation_on_its_sample(llama):
    """Against one plain forward a prompt: each relation's share of its PROBE_FACTS sampled facts the model answers."""
    accuracy = known.probe_accuracy(llama, 0, 16)
    assert sorted(accuracy) == sorted(pararel_relations())
    for relation in ("P19", "P103"):
        facts = load_pararel([relation], PROBE_FACTS, 0)
        prompts = [p for i, fact in enumerate(facts) if (p := tokenize(llama.tokenizer, fact, i)) is not None]
        answered = [
            int(llama.model(input_ids=torch.tensor([p.ids])).logits[0, -1].argmax()) == p.target for p in prompts
        ]
        assert accuracy[relation] == np.mean(answered)


def test_a_run_without_relations_keeps_the_known_ones_and_says_why(tmp_path, monkeypatch):
    """The run's facts come from the relations the probe chose, results.json keeps the probe and a
    note names the chosen relations with their accuracy; a rerun reads the probe from its stage."""
    probe = {relation: 0.0 for relation in pararel_relations()} | {"P19": 0.3, "P37": 0.15}
    calls = []
    monkeypatch.setattr("quantdiag.pipeline.probe_accuracy", lambda *args: calls.append(1) or probe)
    save_model(tiny_model("llama"), tmp_path / "reference")
    config = RunConfig(
        out=str(tmp_path / "run"),
        model=str(tmp_path / "reference"),
        methods=("rtn",),
        bits=(4,),
        group_size=32,
        preset="quick",
        analyses=(),
        facts_per_relation=3,
        device="cpu",
    )
    results = run(config).results
    assert results["facts"]["relations"] == ["P19", "P37"] and results["facts"]["count"] == 6
    assert results["facts"]["probe"] == probe
    assert any(
        "Relations chosen by the reference's accuracy" in note and "P19 30%, P37 15%" in note
        for note in results["notes"]
    )
    assert run(config).results["facts"] == results["facts"] and calls == [1]
