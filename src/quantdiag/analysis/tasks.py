"""Task accuracy through lm-evaluation-harness (docs/methods.md, Tasks): lm-eval's ``HFLM`` wrapped
around the loaded model, whose weights the bank sets per setting (no second copy of the model),
with lm-eval's own task definitions. Two small local tasks ship with the package for machines
without a hub (``data/tasks``); any lm-eval task name or task YAML file works where its data is
reachable. lm-eval is the optional extra ``quantdiag[tasks]``."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

import yaml

from quantdiag.data.facts import Prompt
from quantdiag.errors import QuantdiagError
from quantdiag.model.load import LoadedModel

LOCAL_TASKS = files("quantdiag") / "data" / "tasks"
#: The local tasks shipped with the package (``scripts/make_local_tasks.py``).
SHIPPED = ("quantdiag_languages", "quantdiag_arithmetic")
#: What a task's score records: its first metric's name and value, and the items scored.
TASK_FIELDS = ("metric", "value", "items")


def _lm_eval():
    """lm-eval, imported lazily (it is an optional extra and slow to import)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise QuantdiagError("--tasks needs lm-evaluation-harness: pip install 'quantdiag[tasks]'") from exc
    return lm_eval, HFLM


@cache
def _task_manager():
    """lm-eval's index of its registered tasks (seconds to build: once a process)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR")


def checked_tasks(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` with task files made absolute; raises QuantdiagError, before any work, for a
    missing lm-eval, a task file that is missing or unreadable, or a name lm-eval's registry does
    not know."""
    checked = []
    for name in names:
        if name in SHIPPED:
            checked.append(name)
        elif Path(name).suffix in (".yaml", ".yml"):
            task_config(name)  # found and readable as an lm-eval task
            checked.append(str(Path(name).resolve()))
        elif name not in _task_manager().all_tasks:
            raise QuantdiagError(f"unknown lm-eval task '{name}' (a task name lm-eval knows, or a task YAML file)")
        else:
            checked.append(name)
    return tuple(checked)


def task_config(name: str) -> str | dict:
    """What lm-eval is given for ``name``: a shipped task or a task YAML file as its configuration,
    with its JSONL ``data_files`` made absolute (lm-eval reads them from the working directory);
    any other name as is, for lm-eval's registry."""
    path = Path(str(LOCAL_TASKS / f"{name}.yaml")) if name in SHIPPED else Path(name)
    if path.suffix not in (".yaml", ".yml"):
        return name
    if not path.is_file():
        raise QuantdiagError(f"task file not found: {path}")
    _lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader: !function tags, includes

    try:
        config = load_yaml(path)
    except (yaml.YAMLError, ValueError, ImportError, AttributeError) as exc:
        raise QuantdiagError(f"task file {path} cannot be read as an lm-eval task: {exc}") from exc
    data_files = config.get("dataset_kwargs", {}).get("data_files", {})
    for split, data in data_files.items():
        data_files[split] = str((path.parent / data).resolve()) if not Path(data).is_absolute() else data
    return config


def task_model(loaded: LoadedModel, batch_size: int):
    """lm-eval's ``HFLM`` around ``loaded``'s model and tokenizer (the weights it holds when asked)."""
    _, hflm = _lm_eval()
    return hflm(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=str(loaded.device))


def task_scores(lm, tasks: tuple[str, ...], limit: int | None) -> dict[str, dict]:
    """Per task: its first metric's ``value``, the ``metric``'s name and the ``items`` scored, from
    one ``lm_eval.simple_evaluate`` call (zero-shot unless the task says otherwise, seeded)."""
    lm_eval, _ = _lm_eval()
    try:
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task_config(name) for name in tasks],
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            task_manager=_task_manager(),
            verbosity="ERROR",
        )
    except (KeyError, ValueError, FileNotFoundError, ConnectionError) as exc:
        raise QuantdiagError(f"lm-eval could not run the tasks {', '.join(tasks)}: {exc}") from exc
    scores = {}
    for task, values in output["results"].items():
        metric = next(key for key in values if "," in key and "_stderr" not in key)
        items = output["n-samples"][task]["effective"]
        scores[task] = {"metric": metric.split(",")[0], "value": float(values[metric]), "items": int(items)}
    return scores


def task_prompts(loaded: LoadedModel, name: str, limit: int | None) -> list[Prompt]:
    """The first ``limit`` items of task ``name`` (of each of its tasks, for a group) as lm-eval
    scores them: each item's context (its few-shot examples and question, with
    ``simple_evaluate``'s defaults), tokenized. A task item has no answer token or subject: their
    fields are -1 and an empty span, and only the last token is read."""
    _lm_eval()
    from lm_eval.defaults import DEFAULT_OTHER_SEED  # simple_evaluate's few-shot seed

    contexts = []
    for task in _task_manager().load([task_config(name)])["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        task.build_all_requests(limit=limit)
        by_item: dict[int, str] = {}
        for instance in task.instances:  # a multiple-choice item has one request per choice, one context
            by_item.setdefault(instance.doc_id, instance.arguments[0])
        contexts += [by_item[item] for item in sorted(by_item)]
    tokenizer = loaded.tokenizer
    return [Prompt(i, tuple(tokenizer(text).input_ids), -1, (0, 0)) for i, text in enumerate(contexts)]
