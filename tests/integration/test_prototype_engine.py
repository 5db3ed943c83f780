"""rlpost.prototype samples through the rollout engine training would pick: the same
``rollout.engine`` resolution (auto: by what is installed, the device and the model's
size), on the built-in tiny model."""

import importlib.util

import pytest

from rlpost import prototype
from rlpost.engines import resolve_rollout_engine
from rlpost.engines.hf_rollout import HFRolloutEngine
from rlpost.models.loading import resolve_model_path

pytestmark = pytest.mark.integration

QUESTIONS = [{"prompt": "What is 2 + 3?", "answer": "5"}]


def test_auto_samples_with_the_engine_training_resolves():
    training_picks = resolve_rollout_engine("auto", resolve_model_path("builtin:tiny-math"))
    samples = prototype.sample_completions("builtin:tiny-math", QUESTIONS, n=2, max_new_tokens=8)
    assert len(samples) == 2 and all(s.num_tokens <= 8 for s in samples)
    engine = prototype._engine("builtin:tiny-math", "float32", 0, "auto")
    assert type(engine).__name__ == {"hf": "HFRolloutEngine", "vllm": "VLLMRolloutEngine"}[training_picks]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_a_named_engine_is_the_one_used():
    hf = prototype.sample_completions("builtin:tiny-math", QUESTIONS, n=2, max_new_tokens=8, engine="hf")
    vllm = prototype.sample_completions("builtin:tiny-math", QUESTIONS, n=2, max_new_tokens=8, engine="vllm")
    assert isinstance(prototype._engine("builtin:tiny-math", "float32", 0, "hf"), HFRolloutEngine)
    assert type(prototype._engine("builtin:tiny-math", "float32", 0, "vllm")).__name__ == "VLLMRolloutEngine"
    assert len(hf) == len(vllm) == 2
