"""Faults a run survives: killed with SIGKILL while quantizing, while writing weights, while
evaluating and while drawing the report, then run again; a truncated file in each cache; two runs
at once on one cache. Each ends with the results of an uninterrupted run.

A run is ``quantdiag run`` on a tiny random model saved to a folder, in a child process forked
from a server that imported quantdiag once (a fresh interpreter per run would cost more than the
run). A fault is a function patched in the child only, to SIGKILL its own process at its Nth call:
production code has no fault injection. ``config.out`` (each run's own folder) is the one field of
results.json that legitimately differs between runs; it is left out of the comparisons.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pkgutil
import signal
import time
from multiprocessing import forkserver as server
from pathlib import Path

import numpy as np
import pytest
import torch

from quantdiag.model.load import builtin_gguf, converted_gguf
from quantdiag.quant.calib import load_calibration
from quantdiag.storage import file_digest

from conftest import tiny_model, tiny_tokenizer

QUICK = "--methods rtn --bits 4,2 --analyses none --preset quick".split()
QUICK += "--relations P103,P37,P19 --facts 4 --device cpu".split()
RTN = "quantdiag.quant.bank:rtn_dequantized"
#: Each fault of the resumed run: (function, call at which the process kills itself). The tiny
#: model has 28 linears: call 31 of RTN is inside the 2-bit setting (the 4-bit one is saved); the
#: next run is killed as it writes the 2-bit setting's second block (its first is written); the
#: next when the 4-bit evaluation is half done (reference saved; primary prompts scored,
#: robustness ones not); the next while the report's second figure is being saved (results.json
#: written); the last run finishes.
KILLS = [
    (RTN, 31),
    ("quantdiag.quant.bank:save_file", 2),
    ("quantdiag.pipeline:robustness_correct", 2),
    ("matplotlib.figure:Figure.savefig", 4),
]
UNREADABLE = "is unreadable"


def _child(args: list[str], cache: str, log: str, kill: tuple[str, int] | None, slow: float) -> None:
    """In a forked child: output to ``log``, one CPU thread, the fault (or RTN slowed by ``slow``
    seconds a call), then the CLI, whose exit code becomes the process's."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["QUANTDIAG_CACHE"] = cache
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    if kill is not None:
        _patch(kill[0], lambda real, count: os.kill(os.getpid(), signal.SIGKILL) if count == kill[1] else None)
    if slow:
        _patch(RTN, lambda real, count: time.sleep(slow))
    from quantdiag.cli import app

    app(args, prog_name="quantdiag")


def _patch(target: str, before) -> None:
    """Wrap ``module:attribute`` (or ``module:Class.method``) so that ``before(real, call)``
    runs before each call."""
    module, _, path = target.partition(":")
    within, _, attribute = path.rpartition(".")
    owner = pkgutil.resolve_name(f"{module}:{within}" if within else module)
    real = getattr(owner, attribute)
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        before(real, count[0])
        return real(*args, **kwargs)

    setattr(owner, attribute, wrapper)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread here too: on a busy machine, threads of tiny matmuls wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def forkserver():
    """A forkserver context whose server has imported quantdiag (and uses one thread)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["quantdiag.cli", "quantdiag.pipeline", "matplotlib.figure"])
        server.ensure_running()  # while the variable is set
        yield context


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_model("llama").model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _start(forkserver, model_dir: Path, out: Path, cache: Path, kill=None, slow=0.0):
    args = ["run", "--model", str(model_dir), *QUICK, "--out", str(out)]
    process = forkserver.Process(target=_child, args=(args, str(cache), f"{out}.log", kill, slow))
    process.start()
    return process


def _run(forkserver, model_dir: Path, out: Path, cache: Path, kill=None) -> tuple[int, str]:
    """Exit code (negative: killed by that signal) and output of one run."""
    process = _start(forkserver, model_dir, out, cache, kill)
    process.join()
    return process.exitcode, Path(f"{out}.log").read_text()


def _results(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    del results["config"]["out"]  # the run folder: the one field that differs between runs
    return results


def _arrays(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "arrays.npz") as stored:
        return dict(stored)


def _assert_same_arrays(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def _leftovers(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob("*.tmp")]


@pytest.fixture(scope="module")
def concurrent(forkserver, model_dir, tmp_path_factory):
    """Two runs started together on one empty cache (RTN slowed to 0.1 s a linear, so that each
    setting takes 3 s and the runs overlap): their exit codes, outputs and folders."""
    root = tmp_path_factory.mktemp("concurrent")
    outs = [root / "a", root / "b"]
    processes = [_start(forkserver, model_dir, out, root / "cache", slow=0.1) for out in outs]
    for process in processes:
        process.join()
    return [p.exitcode for p in processes], [Path(f"{out}.log").read_text() for out in outs], outs, root / "cache"


@pytest.fixture(scope="module")
def resumed(forkserver, model_dir, tmp_path_factory):
    """One run killed at each of ``KILLS`` in turn, each time run again: the exit codes, the
    temporary files found after the kills while writing, the run folder and the cache."""
    root = tmp_path_factory.mktemp("resumed")
    out, cache = root / "run", root / "cache"
    codes, leftovers = [], []
    for kill in [*KILLS, None]:
        codes.append(_run(forkserver, model_dir, out, cache, kill)[0])
        leftovers.append(_leftovers(out, cache))
    return codes, leftovers, out, cache


def test_two_runs_on_one_cache_wait_for_each_other(concurrent):
    codes, logs, outs, cache = concurrent
    assert codes == [0, 0], logs
    assert _results(outs[0]) == _results(outs[1])
    _assert_same_arrays(_arrays(outs[0]), _arrays(outs[1]))
    # Each setting was quantized by one run; the other waited for its file.
    for setting in ("reference", "rtn-w4-g128-sym", "rtn-w2-g128-sym"):
        assert sum(log.count(f"caching {setting} weights") for log in logs) == 1, setting


def test_files_are_readable_by_others(concurrent):
    """Results and cache entries are readable by all (umask permitting); lock files are writable
    by all, so every user of a shared cache can take them."""
    _, _, outs, cache = concurrent
    umask = os.umask(0)
    os.umask(umask)
    for path in [*outs[0].rglob("*"), *cache.rglob("*")]:
        expected = 0o666 if path.parent.name == "locks" else (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, path


def test_a_killed_run_resumes_to_the_same_results(resumed, concurrent):
    codes, leftovers, out, cache = resumed
    assert codes == [-signal.SIGKILL] * len(KILLS) + [0]
    # Each kill left the temporary folder or file it was writing (weights and stages are written as they
    # are computed); the next run swept it away before writing its own.
    expected = [".rtn-w2-g128-sym."] * 2 + [".eval-rtn-w4-g128-sym-", ".ranks.svg."]
    assert [len(found) for found in leftovers] == [1, 1, 1, 1, 0]
    assert all(found[0].name.startswith(prefix) for found, prefix in zip(leftovers, expected)), leftovers
    assert _results(out) == _results(concurrent[2][0])
    _assert_same_arrays(_arrays(out), _arrays(concurrent[2][0]))
    assert (out / "report.html").read_text().rstrip().endswith("</html>")


def test_truncated_weights_and_stage_are_rebuilt(resumed, forkserver, model_dir, concurrent):
    _, _, out, cache = resumed
    weights = next(cache.glob("weights/*/rtn-w2-g128-sym"))
    stage = next(out.glob("stages/eval-rtn-w4-*.npz"))
    for path in (weights / "block-001.safetensors", stage):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, log = _run(forkserver, model_dir, out, cache)
    assert code == 0
    warnings = [line for line in log.splitlines() if UNREADABLE in line]
    assert len(warnings) == 2 and str(weights) in warnings[0] and str(stage) in warnings[1], warnings
    assert _results(out) == _results(concurrent[2][0])
    _assert_same_arrays(_arrays(out), _arrays(concurrent[2][0]))


def test_truncated_calibration_is_rebuilt(caplog):
    loaded = tiny_model("llama")
    first = load_calibration(loaded, None, 2, 8, seed=0)
    (stored,) = Path(os.environ["QUANTDIAG_CACHE"]).glob("calibration/*.pt")
    stored.write_bytes(stored.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again = load_calibration(loaded, None, 2, 8, seed=0)
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert UNREADABLE in warning and str(stored) in warning
    torch.testing.assert_close(again.ids, first.ids, rtol=0, atol=0)
    torch.testing.assert_close(torch.load(stored), first.ids, rtol=0, atol=0)


@pytest.mark.e2e
def test_truncated_converted_gguf_is_converted_again(caplog):
    folder = converted_gguf(builtin_gguf())
    (weights,) = folder.glob("*.safetensors")
    digest = file_digest(weights)
    weights.write_bytes(weights.read_bytes()[:4096])
    with caplog.at_level(logging.WARNING):
        assert converted_gguf(builtin_gguf()) == folder
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert UNREADABLE in warning and str(folder) in warning
    assert file_digest(weights) == digest
