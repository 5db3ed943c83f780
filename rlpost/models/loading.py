"""Resolve ``model.path`` to a local HF folder, and load its tokenizer.

    builtin:tiny-math      built locally (rlpost.models.tiny), cached
    builtin:tiny-math-tool the same, also taught the tool-call format (multi-turn recipes)
    /a/local/folder        used as is
    Org/name               downloaded from the hub (or taken from the HF cache)

Hub access fails fast: these machines often have no route to the hub, and the
default hub client retries and waits tens of seconds per request before giving up.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlpost.errors import ModelError

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-math", "tiny-math-tool")
HUB_TIMEOUT_S = 5.0  # per metadata request


def resolve_model_path(path: str, seed: int = 0) -> str:
    """A local folder holding config.json and tokenizer files for ``path``."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ModelError(f"unknown built-in model {path!r}; built-in models: "
                             f"{[BUILTIN_PREFIX + m for m in BUILTIN_MODELS]}")
        from rlpost.models.tiny import TOOL_SPEC, build_tiny_model

        if name == "tiny-math-tool":
            return str(build_tiny_model(seed=seed, spec=TOOL_SPEC))
        return str(build_tiny_model(seed=seed))
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelError(f"model folder {path!r} has no config.json; it must be a Hugging Face model folder")
        return str(local)
    if _looks_like_local_path(path):
        raise ModelError(f"model folder {path!r} does not exist")
    return _download(path)


def _looks_like_local_path(path: str) -> bool:
    # A hub id is exactly "name" or "org/name"; anything else can only mean a folder.
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        # A copy already in the HF cache works offline and costs no request.
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    if _hub_offline():
        raise ModelError(f"cannot download {repo_id!r}: HF_HUB_OFFLINE is set and it is not in the HF cache; "
                         "pass a local folder to model.path or use builtin:tiny-math")
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT_S)
    except Exception as exc:
        raise ModelError(f"cannot download {repo_id!r}: no network/hub access or no such repo "
                         f"({type(exc).__name__}: {str(exc)[:200]}); pass a local folder to model.path "
                         "or use builtin:tiny-math") from exc


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The folder's tokenizer; without a pad token it pads with EOS (padding side is
    the caller's choice: left for generation, right for training)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer at {path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
