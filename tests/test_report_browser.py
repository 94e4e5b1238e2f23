"""The report as a user sees it: a real run on a tiny model (RTN 4- and 2-bit, quick preset),
opened in headless Chromium: no console errors, every figure loaded, a card per setting, and a
screenshot saved beside the report; and a run whose names and facts hold markup shows them as
text and runs none of it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from quantdiag.analysis.forward import score_prompts
from quantdiag.config import RunConfig
from quantdiag.data.facts import load_pararel, target_token, tokenize
from quantdiag.diagnose import diagnose
from quantdiag.model.load import LoadedModel
from quantdiag.pipeline import run

from browser import needs_chromium, open_report
from conftest import save_model, tiny_model


@needs_chromium
def test_the_report_opens_cleanly_in_chromium(tmp_path):
    save_model(tiny_model("llama"), tmp_path / "model")
    config = RunConfig(
        out=str(tmp_path / "run"),
        model=str(tmp_path / "model"),
        methods=("rtn",),
        bits=(4, 2),
        preset="quick",
        relations=("P19", "P36"),
        device="cpu",
    )
    report = run(config).report
    errors, page = open_report(report, report.with_suffix(".png"))
    assert errors == []
    figures = len(list((report.parent / "figures").glob("*.png")))
    assert figures >= 4 and page["images"] == figures and page["broken"] == [] and page["cards"] == 2
    assert report.with_suffix(".png").stat().st_size > 10_000


MODEL = "<img src=x onerror=window.__pwned=1>"  # a folder name: no "/"
CHECKPOINT = "<img src=y onerror=alert(1)>"
SUBJECT = "<script>window.__pwned=1</script>"
OBJECT = "<img src=z onerror=alert(2)>"


def _facts(loaded: LoadedModel, path: Path) -> None:
    """Facts whose subjects hold a script and whose objects (after the answer's first word, the
    reference's own prediction) an image with an ``onerror`` handler."""
    tokenizer = loaded.tokenizer
    facts = [replace(fact, subject=f"{fact.subject} {SUBJECT}") for fact in load_pararel(["P19", "P36"], 6, 0)]
    prompts = [tokenize(tokenizer, fact, i) for i, fact in enumerate(facts)]
    rows = []
    for fact, prompt, answer in zip(facts, prompts, score_prompts(loaded, prompts, 16).predicted):
        word = tokenizer.decode([int(answer)]).strip()
        if word and target_token(tokenizer, fact.text, list(prompt.ids), f"{word} {OBJECT}") == int(answer):
            rows.append({"subject": fact.subject, "object": f"{word} {OBJECT}", "template": fact.template})
    assert rows
    path.write_text("\n".join(json.dumps(row) for row in rows))


@needs_chromium
def test_names_facts_and_checkpoints_are_text_not_markup(tmp_path):
    """A model folder, a checkpoint folder and facts holding markup: on the page they read as
    written, and nothing of them ran (no ``window.__pwned``, no alert, no console error)."""
    loaded = tiny_model("llama")
    for name, model in ((MODEL, loaded.model), (CHECKPOINT, tiny_model("llama", seed=1).model)):
        model.save_pretrained(tmp_path / name)
        loaded.tokenizer.save_pretrained(tmp_path / name)
    _facts(loaded, tmp_path / "facts.jsonl")
    config = RunConfig(
        out=str(tmp_path / "run"),
        model=str(tmp_path / MODEL),
        methods=(),
        bits=(),
        compare=(str(tmp_path / CHECKPOINT),),
        preset="quick",
        facts_file=str(tmp_path / "facts.jsonl"),
        analyses=("patching",),
        streams=("resid",),
        patch_prompts=2,
        device="cpu",
    )
    report = diagnose(config).report
    errors, page = open_report(report, report.with_suffix(".png"))
    assert (errors, page["alerts"], page["pwned"]) == ([], [], "undefined")
    assert f"quantdiag report: {MODEL}" in page["text"]
    assert f"{CHECKPOINT} (float)" in page["text"]
    assert SUBJECT in page["text"]  # in the per-token view's prompt
