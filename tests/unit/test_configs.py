"""Every shipped config and recipe loads; YAML and dataclasses stay in step; bad
input fails with a message that names the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from rlpost.config.load import compose_config, config_dir, group_options, load_config, recipes_dir
from rlpost.config.schema import RunConfig
from rlpost.errors import ConfigError


@pytest.mark.parametrize("recipe", group_options("recipe"))
def test_every_recipe_loads(recipe):
    cfg = load_config([f"+recipe={recipe}"])
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("group", [p.name for p in config_dir().iterdir() if p.is_dir()])
def test_every_group_option_loads(group):
    for option in group_options(group):
        load_config([f"{group}={option}"] if group != "logger" else [f"logger=[{option}]"])


def _dataclass_keys(cls, prefix=""):
    keys = set()
    for f in dataclasses.fields(cls):
        tp = f.type if not isinstance(f.type, str) else eval(f.type, vars(__import__("rlpost.config.schema", fromlist=["x"])))
        if dataclasses.is_dataclass(tp) and f.name != "logger":
            keys |= _dataclass_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def _dict_keys(d, prefix=""):
    keys = set()
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("logger", "kwargs"):
            keys |= _dict_keys(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def test_yaml_defaults_name_every_schema_key():
    # Drift guard: a key in the schema but not in YAML could not be overridden on the
    # command line; a key in YAML but not in the schema would fail every run.
    composed = compose_config([])
    assert _dict_keys(composed) == _dataclass_keys(RunConfig)


def test_yaml_defaults_equal_dataclass_defaults():
    cfg = load_config([])
    defaults = RunConfig()
    for section in ("model", "data", "rollout", "trainer", "algorithm", "reward", "eval", "weight_sync", "ray", "critic"):
        assert getattr(cfg, section) == getattr(defaults, section), section


def test_recipes_start_with_the_global_package_header():
    for path in recipes_dir().glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path
        yaml.safe_load(path.read_text())


def test_misspelt_key_names_it_and_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(["+recipe=grpo_math", "trainer.totl_steps=5"])
    msg = str(err.value)
    assert "trainer.totl_steps" in msg and "trainer.total_steps" in msg and "world_size" in msg


def test_appended_unknown_key_is_caught_by_the_schema():
    with pytest.raises(ConfigError, match="Unknown config key 'rollout.nn'"):
        load_config(["+rollout.nn=3"])


@pytest.mark.parametrize("override,key", [
    ("trainer.lr=-1", "trainer.lr"),
    ("rollout.n=0", "rollout.n"),
    ("rollout.n=abc", "rollout.n"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("trainer.world_size=3", "data.train_batch_size"),  # 16 * 4 rows do not split over 3 ranks
    ("algorithm.adv_estimator=nope", "algorithm.adv_estimator"),
    ("data.source=hf", "data.hf_dataset"),  # hf without a dataset
    ("data.hf_dataset=openai/gsm8k", "data.hf_dataset"),  # a dataset while source=builtin: add data.source=hf
    ("data.row_fn=nocolon", "data.row_fn"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([override])


def test_unknown_group_option_lists_the_options():
    with pytest.raises(ConfigError, match="Valid options for recipe: .*grpo_math"):
        load_config(["+recipe=grpo_mth"])
    with pytest.raises(ConfigError, match="Valid options for logger: console, jsonl, "):
        load_config(["logger=[console,foo]"])


def test_logger_multi_select():
    cfg = load_config(["logger=[console,jsonl,wandb]", "logger.wandb.project=p"])
    assert cfg.logger.wandb.project == "p" and cfg.logger.jsonl is not None
    assert load_config(["logger=[jsonl]"]).logger.console is None


def test_configuration_doc_names_every_key():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    flat = {k for k in _dataclass_keys(RunConfig) if not k.startswith("logger")}
    missing = sorted(k for k in flat if k.split(".")[-1] not in doc)
    assert not missing, f"docs/configuration.md does not mention {missing}"


def test_kwargs_mappings_take_new_keys_without_a_plus():
    """reward.kwargs / env.kwargs are the user's keyword arguments: new keys need no `+`."""
    from rlpost.config.load import load_config

    cfg = load_config(["env.kwargs.penalty_per_call=0.05", "reward.kwargs={format_weight:0.1}"])
    assert cfg.env.kwargs == {"penalty_per_call": 0.05} and cfg.reward.kwargs == {"format_weight": 0.1}
    cfg = load_config(["reward.kwargs.a=1", "+reward.kwargs.b=2", "++reward.kwargs.c=3"])
    assert cfg.reward.kwargs == {"a": 1, "b": 2, "c": 3}
