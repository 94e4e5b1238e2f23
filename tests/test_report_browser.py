"""The report as a user sees it: a real run on a tiny model (RTN 4- and 2-bit, quick preset),
opened in headless Chromium: no console errors, every figure loaded, a card per setting, and a
screenshot saved beside the report."""

from __future__ import annotations

from browser import needs_chromium, open_report
from conftest import tiny_model

from quantdiag.config import RunConfig
from quantdiag.pipeline import run


@needs_chromium
def test_the_report_opens_cleanly_in_chromium(tmp_path):
    loaded = tiny_model("llama")
    loaded.model.save_pretrained(tmp_path / "model")
    loaded.tokenizer.save_pretrained(tmp_path / "model")
    config = RunConfig(out=str(tmp_path / "run"), model=str(tmp_path / "model"), methods=("rtn",), bits=(4, 2), preset="quick", relations=("P19", "P36"), device="cpu")
    report = run(config)
    errors, page = open_report(report, report.with_suffix(".png"))
    assert errors == []
    figures = len(list((report.parent / "figures").glob("*.png")))
    assert figures >= 4 and page["images"] == figures and page["broken"] == [] and page["cards"] == 2
    assert report.with_suffix(".png").stat().st_size > 10_000
