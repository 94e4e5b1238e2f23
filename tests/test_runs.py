import hashlib
import json
import logging
import os
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quantdiag import storage
from quantdiag.analysis.repairs import repair_reads
from quantdiag.config import RunConfig
from quantdiag.data.facts import Prompt
from quantdiag.model.load import LoadedModel, weights_fingerprint
from quantdiag.quant.bank import WeightBank
from quantdiag.quant.calib import Calibration
from quantdiag.quant.spec import REFERENCE, QuantSpec
from quantdiag.resolve import resolve
from quantdiag.runs import RunDir
from quantdiag.state import PromptSet, RunContext
from quantdiag.storage import atomic_dir, atomic_file, check_manifest, write_json

from conftest import tiny_model


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


# --- Broken files heal, leftovers are swept, files are published whole and readable ---------


def test_a_truncated_stage_is_recomputed_with_a_warning(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(1000.0)}

    run.cached("eval", "k", compute)
    (stage,) = run.stages.glob("eval-k.npz")
    stage.write_bytes(stage.read_bytes()[:-40])
    with caplog.at_level(logging.WARNING):
        again = run.cached("eval", "k", compute)
    assert len(calls) == 2
    np.testing.assert_array_equal(again["x"], np.arange(1000.0))
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert str(stage) in warning
    np.testing.assert_array_equal(RunDir(tmp_path / "run").cached("eval", "k", compute)["x"], np.arange(1000.0))
    assert len(calls) == 2


def test_leftovers_of_dead_processes_only_are_swept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = storage._HOST
    files = {
        "dead": tmp_path / f".w.safetensors.{dead.pid}@{host}.0a1b2c3d.tmp",
        "alive": tmp_path / f".w.safetensors.{os.getpid()}@{host}.0a1b2c3d.tmp",
        "other host": tmp_path / f".w.safetensors.{dead.pid}@elsewhere.0a1b2c3d.tmp",
        "finished": tmp_path / "w.safetensors",
    }
    for path in files.values():
        path.write_bytes(b"x" * 10)
    spill = tmp_path / "stages" / f".scratch.{dead.pid}@{host}.0a1b2c3d.tmp"
    (spill / "0").mkdir(parents=True)
    (spill / "0" / "layer0.f32").write_bytes(b"y" * 100)
    assert storage.sweep_leftovers(tmp_path) == 110
    assert {name for name, path in files.items() if path.exists()} == {"alive", "other host", "finished"}
    assert not spill.exists()


def test_a_file_is_flushed_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    target = tmp_path / "results.json"
    with atomic_file(target) as tmp:
        tmp.write_text("{}")
    assert events == [("fsync", str(tmp)), ("replace", str(target)), ("fsync", str(tmp_path))]


def test_written_files_and_folders_are_readable_by_others(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("a")
    with atomic_file(tmp_path / "w.safetensors") as tmp:
        save_file({"w": torch.ones(2)}, str(tmp))  # safetensors writes its files 0600
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "sub").mkdir()
        save_file({"w": torch.ones(2)}, str(tmp / "sub" / "b.safetensors"))
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    file, folder = 0o666 & ~umask, 0o777 & ~umask
    names = ("a.txt", "w.safetensors", "model", "model/sub", "model/sub/b.safetensors", "model/quantdiag-manifest.json")
    assert modes == {name: folder if name in ("model", "model/sub") else file for name in names}


def test_a_folder_with_a_truncated_file_fails_its_manifest(tmp_path):
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"z" * 100)
    assert check_manifest(tmp_path / "model") == tmp_path / "model"
    (tmp_path / "model" / "weights.bin").write_bytes(b"z" * 50)
    with pytest.raises(ValueError, match="weights.bin"):
        check_manifest(tmp_path / "model")


# --- Cache keys: every input a stage reads ---------------------------------------------------


def _changed(model, path: str, index: tuple[int, ...]) -> None:
    with torch.no_grad():
        model.get_parameter(path)[index] += 0.01


@pytest.mark.parametrize(
    ("path", "index"),
    [
        ("model.layers.1.post_attention_layernorm.weight", (5,)),
        ("lm_head.weight", (7, 3)),
        ("model.embed_tokens.weight", (11, 2)),
    ],
)
def test_models_differing_in_one_weight_have_different_fingerprints(tmp_path, path, index):
    original, edited = tiny_model("llama"), tiny_model("llama")
    assert weights_fingerprint(edited.adapter) == original.fingerprint
    _changed(edited.model, path, index)
    assert weights_fingerprint(edited.adapter) != original.fingerprint
    folders = {}
    for name, loaded in (("original", original), ("edited", edited)):
        loaded.model.save_pretrained(tmp_path / name)
        folders[name] = weights_fingerprint(loaded.adapter, tmp_path / name)
    assert folders["original"] != folders["edited"]


def test_a_weight_file_rewritten_in_place_is_hashed_again(tmp_path):
    loaded, folder = tiny_model("llama"), tmp_path / "model"
    loaded.model.save_pretrained(folder)
    first = weights_fingerprint(loaded.adapter, folder)
    _changed(loaded.model, "model.norm.weight", (0,))
    stat = (folder / "model.safetensors").stat()
    loaded.model.save_pretrained(folder)
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time
    copy = shutil.copytree(folder, tmp_path / "copy")  # never hashed before
    assert weights_fingerprint(loaded.adapter, folder) == weights_fingerprint(loaded.adapter, copy) != first


def test_a_library_version_is_part_of_every_key(llama, monkeypatch):
    bank, key = WeightBank(llama).path(REFERENCE), storage.cache_key("stage inputs")
    real = storage.metadata.version
    monkeypatch.setattr(storage.metadata, "version", lambda name: "99.0" if name == "transformers" else real(name))
    storage.code_versions.cache_clear()
    try:
        assert WeightBank(llama).path(REFERENCE) != bank
        assert storage.cache_key("stage inputs") != key
    finally:
        storage.code_versions.cache_clear()


def test_the_prompt_digest_covers_the_subject_span():
    first = PromptSet([Prompt(0, (1, 2, 3, 4), 5, (0, 2))], [], [], 0)
    other = PromptSet([Prompt(0, (1, 2, 3, 4), 5, (1, 3))], [], [], 0)
    assert first.digest != other.digest


def test_the_repairs_of_an_rtn_setting_depend_on_the_calibration(llama):
    """EoRA, one of the repairs, is calibrated even when the repaired setting is not."""
    spec, options = QuantSpec("rtn", 2, 32), RunConfig(eora_rank=4).checked().repair_options()
    keys = set()
    for fill in (0, 1):
        calibration = Calibration(torch.full((2, 8), fill, dtype=torch.long), f"{fill}s")
        context = RunContext(None, llama, WeightBank(llama, calibration), PromptSet([], [], [], 0), None)
        keys.add(context.stage_key(repair_reads(spec, replace(spec, bits=8), options)))
    assert len(keys) == 2


def test_config_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fact = {"subject": "Paris", "object": "France", "template": "[X] is in [Y]"}
    (tmp_path / "facts.jsonl").write_text(json.dumps(fact) + "\n")
    (tmp_path / "calib.txt").write_text("text")
    (tmp_path / "model").mkdir()
    given = RunConfig(out="runs/x", model="model", facts_file="facts.jsonl", calib="calib.txt", methods=("rtn",))
    config = resolve(given).config
    assert (config.out, config.model, config.facts_file, config.calib) == tuple(
        os.path.join(str(tmp_path), name) for name in ("runs/x", "model", "facts.jsonl", "calib.txt")
    )
    assert resolve(RunConfig(model="smollm2", methods=("rtn",), out="o")).config.model == "smollm2"


def test_an_entry_that_cannot_be_read_for_the_machine_s_reasons_is_kept(tmp_path):
    """A permission or I/O error is not a damaged entry: it reaches the user and the entry stays."""
    entry = tmp_path / "entry.npz"
    entry.write_bytes(b"hours of work")

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(PermissionError):
        storage.read_entry(entry, denied)
    assert entry.read_bytes() == b"hours of work"


def test_a_stage_run_on_another_device_kind_is_another_stage(llama, monkeypatch):
    """A `quantdiag patch` on a GPU of a run made on the CPU computes its stages again."""
    context = RunContext(None, llama, WeightBank(llama), PromptSet([], [], [], 0), None)
    on_cpu = context.stage_key(REFERENCE)
    monkeypatch.setattr(LoadedModel, "device", property(lambda self: torch.device("cuda")))
    assert context.stage_key(REFERENCE) != on_cpu


def test_a_folder_s_fingerprint_is_its_files_sha256(tmp_path):
    """Loaded from a folder holding every weight, the fingerprint hashes the files' bytes (read
    once, then cached), not the tensors in memory."""
    loaded, folder = tiny_model("llama"), tmp_path / "model"
    loaded.model.save_pretrained(folder)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    config = loaded.model.config.to_diff_dict()
    expected = storage.content_hash(config, str(loaded.model.dtype), [["model.safetensors", digest]])
    assert weights_fingerprint(loaded.adapter, folder) == expected


def test_a_hub_model_is_fingerprinted_from_its_snapshot_folder(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from quantdiag.model.load import hub_snapshot

    def snapshot(repo_id, local_files_only):
        assert local_files_only  # never a download
        if repo_id != "org/tiny":
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert hub_snapshot("org/tiny") == tmp_path
    assert hub_snapshot("org/other") is None
