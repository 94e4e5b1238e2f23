import numpy as np
import pytest

from quantdiag.runs import RunDir
from quantdiag.storage import atomic_file, write_json


def test_a_stage_is_computed_once(tmp_path):
    run = RunDir(tmp_path / "run")
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3)}

    first = run.cached("eval", "abc", compute)
    second = RunDir(tmp_path / "run").cached("eval", "abc", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first["x"], second["x"])
    run.cached("eval", "other-inputs", compute)
    assert len(calls) == 2


def test_an_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"v": 1})
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text().strip().endswith("}")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_an_interrupted_stage_is_not_saved(tmp_path):
    run = RunDir(tmp_path / "run")

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.cached("eval", "k", interrupted)
    assert list(run.stages.iterdir()) == []
