"""Templated prompts kept between runs, so a start with the same data and tokenizer
loads no tokenizer at all on the driver.

Why: templating and encoding 4,200 built-in prompts takes about 1.75 s of CPU, and
loading the tokenizer imports transformers' modeling stack (about 2.3 s more), on
a driver that shares two cores with Ray and the actors starting up
(docs/performance.md, "Start-up on the tiny model"). A cache hit costs one pickle
load.

What a cached entry depends on (the key hashes all of it; anything else means a
miss and a rebuild, never a stale hit):
- the ``data`` config as a whole, the run seed and the split;
- every input file's path, size and modification time (built-in files are named by
  their generator version and parameters; ``source=files`` by the user's paths);
- every non-weight file of the model folder, by content (tokenizer, template,
  special tokens);
- the installed transformers version and the source of ``rlpost.data.dataset``
  (how templating is done).
Sources whose input is code or remote (``source=hf``, ``source=generator``,
``data.row_fn``) and models named by hub id are not cached: their identity is not
in any file the cache could check. Entries are written atomically (a run killed
mid-write leaves no entry) and are this machine's own files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import pickle
from pathlib import Path
from typing import Any

from rlpost.config.convert import to_dict
from rlpost.config.schema import DataConfig
from rlpost.utils.files import write_atomic

CACHE_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def cache_key(cfg: DataConfig, model_path: str, seed: int, data_dir: Path) -> str | None:
    """The key of this data + tokenizer, or None when it cannot be cached (above)."""
    if cfg.source not in ("builtin", "files") or cfg.row_fn or not Path(model_path).is_dir():
        return None
    if cfg.source == "builtin":
        from rlpost.data.math_gen import write_builtin_math

        inputs = list(write_builtin_math(Path(data_dir), cfg.builtin_train_size, cfg.builtin_val_size,
                                         cfg.builtin_max_level, seed))
    else:
        inputs = [Path(f) for f in (*cfg.train_files, *cfg.val_files)]
    digest = hashlib.sha256()
    parts: dict[str, Any] = {"version": CACHE_VERSION, "data": to_dict(cfg), "seed": seed}
    try:
        parts["inputs"] = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in inputs]
        parts["transformers"] = importlib.metadata.version("transformers")
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None  # a missing file is load_prompts' error to report
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(Path(__file__).with_name("dataset.py").read_bytes())
    for f in sorted(Path(model_path).iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:32]


def load(root: Path, key: str | None) -> Any | None:
    """The object saved under ``key``, or None (no key, no entry, or an unreadable one)."""
    if key is None:
        return None
    try:
        with open(root / f"{key}.pkl", "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError):
        return None


def save(root: Path, key: str | None, value: Any) -> None:
    if key is not None:
        write_atomic(root / f"{key}.pkl", pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
