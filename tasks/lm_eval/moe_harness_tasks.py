"""Data loaders and the local-file task class behind the YAMLs in this directory.

lm-eval loads this file by path (``!function moe_harness_tasks.<name>`` in a YAML
next to it), so nothing here depends on the working directory or on how
moe-harness was installed.

Shakespeare tasks (``shakespeare_ppl``, ``shakespeare_cloze``, ``shakespeare_order``)
    read the JSONL files shipped in ``data/`` (built by
    ``scripts/make_shakespeare_cloze.py`` from the held-out test split).

Standard tasks (``local_lambada_openai``, ``local_hellaswag``, ``local_arc_easy``,
``local_piqa``, ``local_wikitext``)
    are lm-eval's own task YAMLs -- prompt, ``process_docs``/``process_results``
    functions, metrics -- read from the installed ``lm_eval/tasks/`` at load
    time (``base:``), with the data switched to local files (``dataset_path:
    json`` or ``parquet``, ``dataset_kwargs.data_files``)::

        <data_dir>/<data_subdir>/<split>.jsonl     (or .json, .parquet, <split>-*.parquet)

    ``data_dir`` is, first found: the task metadata key ``data_dir``
    (``TaskManager(metadata={"data_dir": ...})``, lm-eval's ``--metadata
    '{"data_dir": ...}'``, ``harness eval --data-dir``, spec ``eval.data_dir``),
    then ``$HARNESS_LMEVAL_DATA``, then ``~/.cache/moe-harness/lm_eval_data``.
    The split lm-eval evaluates on must exist; a missing one fails with one line
    naming the path looked for. Other splits (few-shot sources) are optional.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from lm_eval.api.task import ConfigurableTask

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
DATA_ENV = "HARNESS_LMEVAL_DATA"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
_REGENERATE = "regenerate it with: python scripts/make_shakespeare_cloze.py"


def default_data_dir() -> Path:
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe-harness" / "lm_eval_data"


# -- shipped Shakespeare data ------------------------------------------------------------

def _jsonl_dataset(path: Path, split: str = "test"):
    import datasets

    if not path.is_file():
        raise FileNotFoundError(f"missing task data {path}; {_REGENERATE}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def shakespeare_ppl(**_: Any):
    """Held-out works in ~3 KB chunks (fields text, work, offset); see scripts/make_shakespeare_cloze.py."""
    return _jsonl_dataset(DATA / "shakespeare_ppl.jsonl")


def shakespeare_cloze(**_: Any):
    """4-way next-line choice (fields context, choices, label, work, line)."""
    return _jsonl_dataset(DATA / "shakespeare_cloze.jsonl")


def shakespeare_order(**_: Any):
    """4-way word-order choice: the true line among 3 reorderings of its words (fields as the cloze's)."""
    return _jsonl_dataset(DATA / "shakespeare_order.jsonl")


# -- lm-eval's standard tasks on local files -----------------------------------------------

def find_split_files(directory: Path, split: str) -> tuple[str, list[str]] | None:
    """(builder, files) for one split, or None: <split>.jsonl | .json | .parquet | <split>-*.parquet."""
    for pattern, builder in ((f"{split}.jsonl", "json"), (f"{split}.json", "json"), (f"{split}.parquet", "parquet"),
                             (f"{split}-*.parquet", "parquet"), (f"{split}-*.jsonl", "json")):
        files = sorted(str(p) for p in directory.glob(pattern) if p.is_file())
        if files:
            return builder, files
    return None


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _local_config(config: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's task config from ``base``, overridden by this YAML, data pointed at local files."""
    from lm_eval.config.task import TaskConfig
    from lm_eval.tasks._yaml_loader import load_yaml

    own = dict(config)
    own.pop("class", None)
    base_rel = own.pop("base")
    subdir = own.pop("data_subdir")
    fields_ = own.pop("data_fields", None)
    base_path = _lm_eval_tasks_dir() / base_rel
    if not base_path.is_file():
        raise FileNotFoundError(f"{own.get('task')}: lm-eval task config {base_path} not found "
                                f"(lm-eval version without this task?)")
    cfg = load_yaml(base_path, resolve_func=True)
    meta = {**(cfg.get("metadata") or {}), **(own.pop("metadata", None) or {})}
    cfg.update(own)
    cfg["metadata"] = meta
    for k in ("tag", "group", "task_list", "include"):
        cfg.pop(k, None)

    data_dir = Path(meta["data_dir"]).expanduser() if meta.get("data_dir") else default_data_dir()
    directory = data_dir / subdir
    eval_key = "test_split" if cfg.get("test_split") else "validation_split"
    data_files: dict[str, list[str]] = {}
    builders = set()
    for key in SPLIT_KEYS:
        split = cfg.get(key)
        if not split or split in data_files:
            continue
        found = find_split_files(directory, split)
        if found is None:
            if key == eval_key:
                what = f" with fields {fields_}" if fields_ else ""
                raise FileNotFoundError(
                    f"{cfg['task']}: no '{split}' data: looked for {directory / (split + '.jsonl')} "
                    f"(or .json, .parquet, {split}-*.parquet){what}; set the data directory with --data-dir, "
                    f"eval.data_dir, metadata data_dir or ${DATA_ENV}"
                )
            cfg[key] = None  # optional split (few-shot source) not provided
            continue
        builders.add(found[0])
        data_files[split] = found[1]
    if len(builders) > 1:
        raise ValueError(f"{cfg['task']}: mixed json and parquet files in {directory}; use one format")
    cfg["custom_dataset"] = None
    cfg["dataset_path"] = builders.pop()
    cfg["dataset_name"] = None
    cfg["dataset_kwargs"] = {"data_files": data_files}
    known = {f.name for f in dataclasses.fields(TaskConfig)}
    return {k: v for k, v in cfg.items() if k in known}


class LocalTask(ConfigurableTask):
    """A built-in lm-eval task (``base:``) whose data come from local files (see module docstring)."""

    def __init__(self, data_dir=None, cache_dir=None, download_mode=None, config: dict | None = None) -> None:
        super().__init__(data_dir=data_dir, cache_dir=cache_dir, download_mode=download_mode,
                         config=_local_config(config or {}))
