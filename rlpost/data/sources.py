"""Where raw rows come from, besides local files: a dataset by hub id (or a local
dataset folder) through ``datasets``, and the optional ``data.row_fn`` that maps a
raw row onto ``prompt``/``answer``.

Hub datasets are memory-mapped Arrow tables in the datasets cache, so iterating
them does not load the whole set into memory. Offline (``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE``, as in CI) an id that was never downloaded cannot load; the
error says so and how to get it, instead of datasets' "Couldn't reach" message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlpost.config.schema import DataConfig
from rlpost.errors import ConfigError, DataError

RowFn = Callable[[dict], "dict | None"]


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_split(cfg: DataConfig, split: str) -> str | None:
    """The dataset split read for rlpost's ``train``/``val``; None: no val split."""
    return cfg.hf_split if split == "train" else cfg.hf_val_split


def read_hub_rows(cfg: DataConfig, split: str) -> Iterator[dict]:
    """Rows of ``data.hf_dataset`` (hub id, or a local folder: a ``save_to_disk``
    folder, or a folder of parquet/jsonl files in the hub layout) for ``split``."""
    name = hub_split(cfg, split)
    if name is None:
        return iter(())
    if cfg.hf_dataset is None:
        raise ConfigError("data.source=hf needs data.hf_dataset (a hub id or a local dataset folder)")
    return iter(load_hub_split(cfg.hf_dataset, cfg.hf_config, name))


def load_hub_split(dataset: str, config: str | None, split: str):
    """One split as a ``datasets.Dataset``; ``DataError`` saying what to change."""
    import datasets

    where = f"data.hf_dataset={dataset!r}" + (f" data.hf_config={config!r}" if config else "")
    folder = Path(dataset).expanduser()
    if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        # save_to_disk output: load_dataset refuses it, load_from_disk reads it.
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{where}: no split {split!r}; the folder has {sorted(loaded)}")
            return loaded[split]
        return loaded  # a single saved Dataset is every split
    looks_local = dataset.startswith((".", "/", "~")) or folder.exists()
    if looks_local and not folder.is_dir():
        raise DataError(f"{where}: {folder.resolve()} is not a folder (for single files use data.train_files)")
    try:
        return datasets.load_dataset(str(folder) if looks_local else dataset, config, split=split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        if offline() and not looks_local:
            raise DataError(
                f"{where} is not in the local datasets cache and the hub is off "
                f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set). Download it once with the hub on, e.g. "
                f"`HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 python -c \"import datasets; "
                f"datasets.load_dataset({dataset!r}, {config!r}, split={split!r})\"`, "
                f"or point data.hf_dataset at a local dataset folder, or use data.source=files "
                f"with data.train_files") from None
        raise DataError(f"{where}: cannot load split {split!r}: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:  # e.g. Unknown split "validation". Should be one of [...]
        raise DataError(f"{where}: {exc}") from None


def load_row_fn(spec: str | None) -> RowFn | None:
    """``data.row_fn`` (``module:fn`` or ``path.py:fn``, as ``reward.fn``): a function
    ``fn(row) -> dict | None`` returning a row with ``prompt`` and ``answer`` (extra
    scalar fields become metadata); None or an exception marks the row malformed."""
    if spec is None:
        return None
    from rlpost.errors import RewardError
    from rlpost.rewards.api import load_reward_fn  # the same module-or-file importer

    try:
        return load_reward_fn(spec)
    except RewardError as exc:
        raise ConfigError(f"data.row_fn: {exc}".replace("reward function", "row function")) from None


def map_row(row: Any, row_fn: RowFn | None) -> tuple[dict | None, str | None]:
    """``(mapped row, error)``: the row itself without a mapper; with one, its result
    (None when it returned something other than a dict or raised, with the reason)."""
    if row_fn is None:
        return (row if isinstance(row, dict) else None), None
    try:
        mapped = row_fn(dict(row))
    except Exception as exc:  # a bad row costs one row, never the run
        return None, f"data.row_fn raised {type(exc).__name__}: {exc}"
    if mapped is None:
        return None, None
    if not isinstance(mapped, dict):
        return None, f"data.row_fn returned a {type(mapped).__name__}, expected a dict or None"
    return mapped, None
