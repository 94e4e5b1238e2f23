"""``--profile``: each stage's wall and CPU time and peak memory, checked against what the test
itself does (a sleep, a busy loop, an allocation), and a profiled run's results and report."""

from __future__ import annotations

import json
import mmap
import time

import numpy as np
import psutil
import pytest
from typer.testing import CliRunner

from quantdiag.cli import app
from quantdiag.profiling import GIB, Profiler
from quantdiag.report.profile import profile_reading, stage_totals
from quantdiag.runs import RunDir

from conftest import save_model


def test_a_sleep_takes_wall_time_and_no_cpu_time_a_busy_loop_both():
    profiler = Profiler(enabled=True)
    with profiler.stage("sleep"):
        time.sleep(0.3)
    with profiler.stage("busy", "rtn-w4-g128-sym"):
        start = time.thread_time()
        while time.thread_time() - start < 0.3:  # 0.3 s of this thread's CPU, however loaded the machine
            pass
    sleep, busy = profiler.stages
    assert sleep.wall_s == pytest.approx(0.3, abs=0.1) and sleep.cpu_s < 0.05
    assert busy.wall_s >= 0.3 and busy.cpu_s == pytest.approx(0.3, abs=0.05)
    assert (busy.stage, busy.subject, sleep.subject) == ("busy", "rtn-w4-g128-sym", None)
    assert sleep.device_s is None and sleep.peak_device_gib is None


def test_peak_memory_sees_an_allocation_freed_before_the_stage_ends():
    profiler = Profiler(enabled=True)
    with profiler.stage("small"):
        pass
    with profiler.stage("allocate"):
        # Fresh anonymous pages, written, so resident whatever the allocator kept from earlier tests.
        block, page = mmap.mmap(-1, GIB // 2), b"\1" * mmap.PAGESIZE
        for _ in range(GIB // 2 // mmap.PAGESIZE):
            block.write(page)
        seen_while_allocated = psutil.Process().memory_info().rss / GIB
        time.sleep(0.4)  # twenty sampling intervals: the sampler reads it at least once
        block.close()
    small, allocated = profiler.stages
    assert allocated.peak_rss_gib >= seen_while_allocated - 0.01
    assert allocated.peak_rss_gib - small.peak_rss_gib == pytest.approx(0.5, abs=0.1)


def test_a_disabled_profiler_records_nothing():
    profiler = Profiler(enabled=False)
    with profiler.stage("x") as marks:
        marks["cached"] = True
    assert profiler.stages == [] and profiler.to_json() is None


def test_a_stage_read_from_the_stage_cache_is_marked_cached(tmp_path):
    profiler = Profiler(enabled=True)
    run = RunDir(tmp_path / "run", profiler)
    for _ in range(2):
        run.cached("eval", "k", lambda: {"x": np.arange(3)}, "reference")
    assert [(c.stage, c.subject, c.cached) for c in profiler.stages] == [
        ("eval", "reference", False),
        ("eval", "reference", True),
    ]


def test_totals_and_reading_sum_each_stage_kind():
    profile = {
        "total_s": 10.0,
        "stages": [
            {"stage": "load", "wall_s": 1.0, "cached": False, "peak_rss_gib": 1.0},
            {"stage": "eval", "wall_s": 3.0, "cached": False, "peak_rss_gib": 2.0},
            {"stage": "eval", "wall_s": 2.0, "cached": True, "peak_rss_gib": 2.5},
        ],
    }
    assert stage_totals(profile) == {
        "load": {"computed": 1.0, "cached": 0.0, "peak_rss_gib": 1.0},
        "eval": {"computed": 3.0, "cached": 2.0, "peak_rss_gib": 2.5},
    }
    assert profile_reading(profile) == (
        "The run took 10 s; eval took the most, 5 s (50%). Peak resident memory 2.5 GiB (in eval)."
    )


def test_a_profiled_run_writes_every_stage_to_results_and_the_report(tmp_path, llama):
    save_model(llama, tmp_path / "ref")
    out = tmp_path / "run"
    args = ["run", "--model", str(tmp_path / "ref"), "--methods", "rtn", "--bits", "4", "--relations", "P19"]
    args += ["--facts", "2", "--preset", "quick", "--analyses", "none", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--profile"])
    assert result.exit_code == 0, result.output
    profile = json.loads((out / "results.json").read_text())["profile"]
    stages = [(cost["stage"], cost["subject"]) for cost in profile["stages"]]
    assert stages == [
        ("load", None),
        ("quantize", "rtn-w4-g128-sym"),
        ("eval", "reference"),
        ("eval", "rtn-w4-g128-sym"),
    ]
    assert sum(cost["wall_s"] for cost in profile["stages"]) <= profile["total_s"]
    assert "Appendix: where the run" in (out / "report.html").read_text()
    plain = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0 and json.loads((tmp_path / "plain" / "results.json").read_text())["profile"] is None
