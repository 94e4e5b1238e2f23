"""The self-contained ``report.html``: figures embedded as PNG (also saved as PNG and SVG in
``figures/``), the verdict cards and their evidence first, then a summary table and the evidence
with a one-line reading under each figure (a list of them under multi-panel causal figures). Every
string is HTML-escaped and drawn without mathtext: names, labels and decoded tokens are the user's
and the model's, not markup."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
from jinja2 import Environment, PackageLoader
from matplotlib.figure import Figure

from quantdiag.report import plots
from quantdiag.report.causal import causal_sections
from quantdiag.report.components import component_sections
from quantdiag.report.distribution import distribution_sections
from quantdiag.report.plots import Section
from quantdiag.report.profile import profile_sections
from quantdiag.report.readings import cliff_reading, lens_reading, rank_reading, summary_rows
from quantdiag.report.repairs import repair_sections
from quantdiag.report.representations import representation_sections
from quantdiag.report.sensitivity import sensitivity_sections
from quantdiag.report.verdict import signature_table, verdict_cards
from quantdiag.runs import RunDir
from quantdiag.storage import atomic_file

_ENV = Environment(loader=PackageLoader("quantdiag", "report/templates"), autoescape=True)
#: Drawn text is literal: a ``$`` in a label or a relation is not mathtext.
LITERAL_TEXT = {"text.parse_math": False}
#: Each figure is saved in these formats (the PNG is also embedded in the report).
FIGURE_SUFFIXES = (".png", ".svg")


def write_report(run_dir: RunDir, results: dict) -> Path:
    """Draw every figure, save it, remove the figure files an earlier report left in ``figures/``,
    and render the report atomically."""
    with plt.rc_context(LITERAL_TEXT):
        figures = [
            {"id": name, "title": title, "png": figure and _save(figure, run_dir.figures / name), "reading": reading}
            for name, title, figure, reading in _sections(results)
        ]
    written = {f"{figure['id']}{suffix}" for figure in figures if figure["png"] for suffix in FIGURE_SUFFIXES}
    for stale in run_dir.figures.iterdir():
        if stale.is_file() and stale.suffix in FIGURE_SUFFIXES and stale.name not in written:
            stale.unlink()
    html = _ENV.get_template("report.html.j2").render(
        results=results,
        cards=verdict_cards(results),
        signatures=signature_table(results),
        summary=summary_rows(results),
        figures=figures,
    )
    with atomic_file(run_dir.report) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return run_dir.report


def _sections(results: dict) -> Iterator[Section]:
    """The report's sections in order, each figure drawn only when its turn comes (and closed
    once saved), so only one is open at a time."""
    yield ("cliff", "Performance cliff", plots.performance_cliff(results), cliff_reading(results))
    yield ("ranks", "Where the answer went", plots.rank_histograms(results), rank_reading(results))
    for method in results["subsets"]:
        yield (
            f"lens-{method}",
            f"Logit lens, {method.upper()}",
            plots.lens_curves(results, method),
            lens_reading(results, method),
        )
    yield from causal_sections(results)
    yield from component_sections(results)
    yield from representation_sections(results)
    yield from sensitivity_sections(results)
    yield from repair_sections(results)
    yield from distribution_sections(results)
    yield ("relations", "Accuracy per relation", *plots.relation_heatmap(results))
    yield from profile_sections(results)


def _save(figure: Figure, stem: Path) -> str:
    """Write ``stem``.png and .svg; return the PNG as base64 for embedding."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=130)
    for suffix in FIGURE_SUFFIXES:
        with atomic_file(stem.with_name(stem.name + suffix)) as tmp:  # ids may hold dots (4.5-bit)
            if suffix == ".png":
                tmp.write_bytes(buffer.getvalue())
            else:
                figure.savefig(tmp, format="svg")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()
