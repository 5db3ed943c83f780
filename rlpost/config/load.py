"""Compose the Hydra config (``configs/`` + a recipe from ``recipes/``) and convert
it into a validated ``RunConfig``.

The Hydra compose API is used instead of ``@hydra.main`` so that composition errors
can be turned into messages that name the valid keys, so that no ``outputs/`` folder
is written, and so that the same function serves tests, notebooks and the CLI.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from omegaconf import OmegaConf

from rlpost.config.convert import from_dict, unknown_key_message
from rlpost.config.schema import RunConfig
from rlpost.errors import ConfigError

_PKG = Path(__file__).resolve().parents[1]


def _find_dir(name: str) -> Path:
    # An installed wheel carries the folders inside the package (rlpost/_configs);
    # a source checkout or editable install has them at the repository root.
    for candidate in (_PKG / f"_{name}", _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"cannot find the rlpost {name}/ folder next to {_PKG}; reinstall rlpost")


def config_dir() -> Path:
    return _find_dir("configs")


def recipes_dir() -> Path:
    return _find_dir("recipes")


def group_options(group: str) -> list[str]:
    """Options of a config group (``recipe`` lists the recipes folder)."""
    folder = recipes_dir() if group == "recipe" else config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _register_recipes() -> None:
    # Recipes live in their own top-level folder, so they are registered as the
    # Hydra group "recipe" (each file starts with `# @package _global_`).
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for path in sorted(recipes_dir().glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver(
            "now", lambda pattern: datetime.datetime.now().strftime(pattern), use_cache=True
        )


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(config_name="config", overrides=overrides)


def _explain_bad_override(overrides: list[str], key: str) -> str:
    """Compose without the failing override and describe the valid keys where it pointed."""
    others = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
    try:
        cfg = OmegaConf.to_container(_compose(others), resolve=False)
    except Exception:  # the other overrides are broken too; fall back to Hydra's words
        return ""
    parts = key.split(".")
    node, path = cfg, []
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            break
        node, path = node[part], path + [part]
    bad = parts[len(path)]
    valid = list(node) if isinstance(node, dict) else []
    return unknown_key_message(".".join(path), bad, valid)


# Free-form mappings: their keys are the user's (a reward function's or an environment's
# keyword arguments), so `env.kwargs.penalty=0.1` adds a key and `reward.kwargs={a:1}`
# sets the mapping, instead of failing as unknown keys (Hydra would need a `++` prefix).
_FREE_FORM = re.compile(r"^(reward|env)\.kwargs(\.[^=]+)?=")


def _add_free_form_keys(overrides: list[str]) -> list[str]:
    return [f"++{o}" if _FREE_FORM.match(o) else o for o in overrides]


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Hydra-composed config as a plain dict, interpolations resolved."""
    from hydra.errors import HydraException

    overrides = _add_free_form_keys(list(overrides))
    _register_recipes()
    _register_resolvers()
    try:
        cfg = _compose(overrides)
    except HydraException as err:
        choice = re.search(r"Could not (?:find|load) '([\w-]+)/([^']+)'", str(err))
        if choice:
            group, name = choice.groups()
            raise ConfigError(
                f"{group}={name}: no such option. Valid options for {group}: {', '.join(group_options(group))}"
            ) from None
        match = re.search(r"Could not override '([^']+)'", str(err))
        if match:
            message = _explain_bad_override(overrides, match.group(1))
            if message:
                raise ConfigError(message) from None
        raise ConfigError(str(err)) from None
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:
        raise ConfigError(f"cannot resolve the config: {err}") from None


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Compose, convert and validate. Raises ``ConfigError`` before anything starts."""
    cfg = from_dict(RunConfig, compose_config(overrides))
    cfg.check()
    return cfg
