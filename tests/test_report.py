"""The report on a real tiny run whose three float checkpoints have Failure subsets of 0, 1 and 2
prompts (Robust: 2, 1, 0): every section renders or says why it is empty; user and model strings
are escaped, drawn without mathtext, and long prompts or many relations keep figures in bounds;
``figures/`` holds only the report's own figures."""

from __future__ import annotations

import copy
import json
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from quantdiag.analysis.forward import score_prompts
from quantdiag.config import RunConfig
from quantdiag.data.facts import load_pararel, target_token, tokenize
from quantdiag.model.load import LoadedModel, load_reference
from quantdiag.pipeline import run
from quantdiag.report.html import _save, write_report
from quantdiag.runs import RunDir

from conftest import answer_in_words, save_noisy, tiny_model

#: Checkpoint name -> (noise scale, seed): a copy, a little noise, much noise.
CHECKPOINTS = {"zero": (0.0, 1), "one": (0.3, 1), "two": (3.0, 2)}
PAYLOADS = ("<script>window.__pwned=1</script>", "<img src=x onerror=window.__pwned=1>", "<!--")


def _noisy(folder: Path, name: str, scale: float, seed: int) -> LoadedModel:
    """A float checkpoint: the reference plus Gaussian noise in every block linear, loaded."""
    save_noisy(folder / "reference", folder / name, scale, seed)
    return load_reference(str(folder / name), "cpu", "auto", False)


@pytest.fixture(scope="module")
def subsets_run(tmp_path_factory) -> Path:
    """Two facts the reference recalls: "zero" recalls both, "one" only the first, "two" neither."""
    folder = tmp_path_factory.mktemp("report")
    loaded = tiny_model("llama", layers=2)
    tokenizer = loaded.tokenizer
    answer_in_words(loaded)
    loaded.model.save_pretrained(folder / "reference")
    tokenizer.save_pretrained(folder / "reference")
    models = {name: _noisy(folder, name, *noise) for name, noise in CHECKPOINTS.items()}
    facts = load_pararel(["P19", "P36", "P37", "P103", "P106"], 30, 0)
    # Only facts whose prompt is the template's text alone: the facts file's objects are the
    # reference's answers, which add no leading whitespace or punctuation tokens to the prompt.
    prompts = [tokenize(tokenizer, fact, i) for i, fact in enumerate(facts)]
    plain = [p is not None and len(p.ids) == len(tokenizer(f.text)["input_ids"]) for f, p in zip(facts, prompts)]
    facts = [fact for fact, keep in zip(facts, plain) if keep]
    prompts = [tokenize(tokenizer, fact, i) for i, fact in enumerate(facts)]
    answers = score_prompts(loaded, prompts, 16).predicted
    predicted = {name: score_prompts(model, prompts, 16).predicted for name, model in models.items()}
    kept = {"one": [], "two": []}
    for i, (fact, prompt, answer) in enumerate(zip(facts, prompts, answers)):
        word = tokenizer.decode([int(answer)]).strip()
        if (
            predicted["zero"][i] != answer
            or not word
            or target_token(tokenizer, fact.text, list(prompt.ids), word) != int(answer)
        ):
            continue
        row = {"subject": fact.subject, "object": word, "template": fact.template, "relation": fact.relation}
        if predicted["two"][i] != answer:
            kept["one" if predicted["one"][i] == answer else "two"].append(row)
    (folder / "facts.jsonl").write_text("\n".join(json.dumps(row) for row in (kept["one"][0], kept["two"][0])))
    config = RunConfig(
        out=str(folder / "run"),
        model=str(folder / "reference"),
        methods=(),
        bits=(),
        compare=tuple(str(folder / n) for n in models),
        preset="full",
        facts_file=str(folder / "facts.jsonl"),
        device="cpu",
        calib_samples=2,
        calib_length=32,
        robustness_facts=2,
        max_paraphrases=1,
    )
    return run(config).report


def _results(report: Path) -> dict:
    return json.loads((report.parent / "results.json").read_text())


def _small(report: Path, causal: bool = False) -> dict:
    """The run's results cut to the reference and "one" (to draw few figures): recall and the
    lens, with ``causal`` its Failure subset's patching and ablation."""
    results = _results(report)
    results["subsets"] = {"one": results["subsets"]["one"]}
    results["settings"] = [s for s in results["settings"] if s["method"] in (None, "one")]
    for setting in results["settings"]:
        for analysis in ("components", "representations", "sensitivity", "repairs"):
            setting.pop(analysis, None)
        setting["causal"] = {"one:failure": setting["causal"]["one:failure"]} if causal else {}
    return results


class _Page(HTMLParser):
    """Start tags, comments and text of an HTML page, as a browser's parser sees them."""

    def __init__(self, html: str):
        super().__init__()
        self.tags, self.comments, self.text = [], [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_comment(self, data):
        self.comments.append(data)

    def handle_data(self, data):
        self.text.append(data)


def _sections(html: str) -> dict[str, tuple[bool, str]]:
    """Section id -> (has a figure, its caption's text)."""
    found = re.findall(r'<h2 id="([^"]+)">[^<]*</h2>\s*<figure>(.*?)</figure>', html, re.DOTALL)
    return {name: ("<img" in body, re.sub(r"<[^>]+>", "", body).strip()) for name, body in found}


def _render(results: dict, folder: Path) -> tuple[Path, str]:
    run_dir = RunDir(folder)
    write_report(run_dir, results)
    return run_dir.path, run_dir.report.read_text()


def test_the_subsets_hold_0_1_and_2_prompts(subsets_run):
    results = _results(subsets_run)
    assert {m: (s["failure"], s["robust"]) for m, s in results["subsets"].items()} == {
        "zero": (0, 2),
        "one": (1, 1),
        "two": (2, 0),
    }


def test_cka_on_1_or_2_prompts_is_what_the_report_says(subsets_run):
    """Undefined (null) on one and on two prompts (the debiased CKA needs 4): the reason the report draws no CKA."""
    settings = {s["method"]: s for s in _results(subsets_run)["settings"]}
    for method in ("one", "two"):
        cka = settings[method]["representations"][f"{method}:failure"]["cka"]
        assert all(cell is None for stream in cka.values() for grid in stream.values() for row in grid for cell in row)


def test_every_section_renders_or_says_why_for_subsets_of_0_1_and_2_prompts(subsets_run):
    html = subsets_run.read_text()
    verdicts = [s["verdict"]["verdict"] for s in _results(subsets_run)["settings"][1:]]
    cards = re.findall(r'<section class="card (\w+)">\s*<h3>([^<]+)</h3>', html)
    assert cards == list(zip(verdicts, ("zero (float)", "one (float)", "two (float)")))
    assert "<th>zero (float)</th><th>one (float)</th><th>two (float)</th></tr>" in html  # the signature table
    sections = _sections(html)
    empty_failure = "The Failure subset is empty: zero (float) recalls every fact the reference recalls."
    no_repairs = "Not run: the repairs need 2 Failure prompts or more (a dev split to tune on, a test split to score); "
    no_repairs += "this subset has"
    lines = {
        "causal-zero-failure": empty_failure,
        "components-zero": empty_failure,
        "subspaces-zero": empty_failure,
        "repairs-zero": f"{no_repairs} 0.",
        "repairs-one": f"{no_repairs} 1.",
        "cka-one": "Not drawn: debiased linear CKA over 1 prompt is undefined; it needs at least 4.",
        "cka-two": "Not drawn: debiased linear CKA over 2 prompts is undefined; it needs at least 4.",
        "causal-two-robust": "The Robust subset is empty: two (float) recalls none of the facts the reference recalls.",
    }
    assert {name: sections[name] for name in lines} == {name: (False, text) for name, text in lines.items()}
    figures = {
        "causal-patching-zero-robust",
        "causal-tokens-zero",
        "sensitivity-zero",
        "components-table-zero",
        "lens-zero",
        "causal-patching-one-failure",
        "causal-patching-one-robust",
        "components-one",
        "subspaces-one",
        "sensitivity-one",
        "lens-one",
        "causal-patching-two-failure",
        "components-two",
        "subspaces-two",
        "sensitivity-two",
        "repairs-two",
        "lens-two",
    }
    assert {name for name in figures if sections[name][0]} == figures
    assert sections["lens-zero"][1] == empty_failure
    assert not any(
        name.startswith(("cka-one-", "cka-two-", "causal-patching-two-robust", "causal-patching-zero-failure"))
        for name in sections
    )
    assert "Robust accuracy (the other subset is empty)" in sections["components-table-zero"][1]
    assert "Failure accuracy (the other subset is empty)" in sections["components-table-two"][1]
    assert not re.search(r"\bnan\b", " ".join(text for _, text in sections.values()))


def _with_strings(results: dict) -> dict:
    """``results`` with the payloads in the model name, labels, calibration, notes, top
    predictions, relations and prompt tokens."""
    results = copy.deepcopy(results)
    results["model"]["name"] = PAYLOADS[0]
    results["calibration"] = PAYLOADS[1]
    results["notes"] += list(PAYLOADS)
    for i, setting in enumerate(results["settings"]):
        setting["label"] = f"m{i} {PAYLOADS[i % 3]}"
        setting["recall"]["top_predictions"] = [[payload, 0.3] for payload in PAYLOADS]
        setting["recall"]["per_relation"] = {
            payload: value for payload, value in zip(PAYLOADS, setting["recall"]["per_relation"].values())
        }
        for subset in setting.get("causal", {}).values():
            if "example" in subset:
                subset["example"]["tokens"][0] = PAYLOADS[2]
                subset["example"]["target"] = PAYLOADS[1]
    results["facts"]["relations"] = list(PAYLOADS)
    return results


def test_user_and_model_strings_are_escaped(subsets_run, tmp_path):
    _, html = _render(_with_strings(_small(subsets_run, causal=True)), tmp_path / "run")
    page = _Page(html)
    assert page.comments == []
    assert "script" not in {tag for tag, _ in page.tags}
    assert all(
        attrs["src"].startswith("data:image/png;base64,") and "onerror" not in attrs
        for tag, attrs in page.tags
        if tag == "img"
    )
    text = "".join(page.text)
    for payload in PAYLOADS:
        assert payload in text
    assert f"quantdiag report: {PAYLOADS[0]}" in text and f"calibration: {PAYLOADS[1]}" in text
    assert f"'{PAYLOADS[0]}', '{PAYLOADS[1]}', '{PAYLOADS[2]}'" in text  # top predictions
    assert f"m1 {PAYLOADS[1]}" in text and f"answer '{PAYLOADS[1]}'" in text and f"Prompt '{PAYLOADS[2]}" in text


def _glyphs(svg: str, text: str) -> list[str]:
    """The glyphs matplotlib drew for the text ``text`` in an SVG figure."""
    group = re.search(rf"<!-- {re.escape(text)} -->(.*?)</g>", svg, re.DOTALL)
    return re.findall(r'xlink:href="#([^"]+)"', group.group(1))


def test_dollar_signs_are_drawn_literally(subsets_run, tmp_path):
    """``$x$`` is three glyphs, not an italic x; ``$x_$`` (bad mathtext) does not crash."""
    results = _small(subsets_run)
    for setting, label in zip(results["settings"], ("$x$", "$x_$")):
        setting["label"] = label
        setting["recall"]["per_relation"] = {"a$b": 1.0, "r$1$": 0.0}
    folder, _ = _render(results, tmp_path / "run")
    svg = (folder / "figures" / "relations.svg").read_text()
    assert [len(_glyphs(svg, text)) for text in ("$x$", "$x_$", "a$b", "r$1$")] == [3, 4, 3, 4]
    assert not any("Oblique" in glyph for glyph in _glyphs(svg, "$x$"))


def _png_height(path: Path) -> int:
    """Pixel height from a PNG's IHDR chunk."""
    return struct.unpack(">I", path.read_bytes()[20:24])[0]


def test_a_long_prompt_and_many_relations_keep_figures_drawable(subsets_run, tmp_path):
    """2,000 prompt tokens and 500 relations: the token view draws the last 48 tokens, the
    relation heatmap the 40 relations with the largest loss, and both readings say so; heights at
    130 dpi: 1.2 + 0.28 x 48 and 1.2 + 0.24 x 40 + 0.055 x len("one (float)") inches."""
    results = _small(subsets_run, causal=True)
    tokens, layers = [f" t{i}" for i in range(2000)], results["model"]["n_layers"]
    for setting in results["settings"]:
        example = setting["causal"]["one:failure"].get("example")
        if example:
            example["tokens"] = tokens
            example["restoration"] = np.linspace(0, 1, layers * 2000).reshape(layers, 2000).round(3).tolist()
        compared = setting["method"] is not None
        setting["recall"]["per_relation"] = {f"r{i:03d}": (i / 499 if compared else 1.0) for i in range(500)}
    folder, html = _render(results, tmp_path / "run")
    sections = _sections(html)
    assert "(only its last 48 of 2000 tokens drawn)" in sections["causal-tokens-one"][1]
    assert "Only 40 of the 500 relations are drawn" in sections["relations"][1]
    assert [_png_height(folder / "figures" / f"{name}.png") for name in ("causal-tokens-one", "relations")] == [
        1903,
        1482,
    ]
    svg = (folder / "figures" / "causal-tokens-one.svg").read_text()
    drawn = set(re.findall(r"<!-- ' (t\d+)' -->", svg))
    assert drawn == {f"t{i}" for i in range(1952, 2000)}
    svg = (folder / "figures" / "relations.svg").read_text()
    assert set(re.findall(r"<!-- (r\d{3}) -->", svg)) == {f"r{i:03d}" for i in range(40)}


def test_figures_holds_only_this_reports_figures(subsets_run, tmp_path):
    run_dir = RunDir(tmp_path / "run")
    for name in ("cka-rtn-subject.png", "cka-rtn-subject.svg"):
        (run_dir.figures / name).write_text("from an earlier run")
    _, html = _render(_small(subsets_run), tmp_path / "run")
    drawn = {name for name, (figure, _) in _sections(html).items() if figure}
    assert sorted(p.name for p in run_dir.figures.iterdir()) == sorted(
        f"{name}{suffix}" for name in drawn for suffix in (".png", ".svg")
    )


def test_a_figure_id_with_dots_keeps_its_whole_name(tmp_path):
    """A GGUF checkpoint's setting key holds its fractional bits (``ckpt-w4.5-...``): its figure
    files are ``<id>.png`` and ``<id>.svg``, not the id cut at its last dot."""
    figure, _ = plt.subplots()
    _save(figure, tmp_path / "lens-ckpt-w4.5-model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens-ckpt-w4.5-model.png", "lens-ckpt-w4.5-model.svg"]


def test_the_figure_sweep_removes_only_figure_files(subsets_run, tmp_path):
    run_dir = RunDir(tmp_path / "run")
    (run_dir.figures / "notes.txt").write_text("the user's")
    (run_dir.figures / "drafts").mkdir()
    _render(_small(subsets_run), tmp_path / "run")
    assert (run_dir.figures / "notes.txt").is_file() and (run_dir.figures / "drafts").is_dir()


def test_cka_on_fewer_than_3_prompts_does_not_vote(subsets_run):
    """The "two" checkpoint's Failure subset holds 2 prompts: its CKA diagonal is 1 by
    construction, so the verdict does not count it."""
    results = _results(subsets_run)
    two = next(s for s in results["settings"] if s["method"] == "two")
    assert results["subsets"]["two"]["failure"] == 2
    assert "cka_diagonal" not in [row["name"] for row in two["verdict"]["signatures"]]
