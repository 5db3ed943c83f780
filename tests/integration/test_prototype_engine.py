"""rlpost.prototype samples through the rollout engine training would pick: the same
``rollout.engine`` resolution (auto: by what is installed, the device and the model's
size), on the built-in tiny model. A named engine (vLLM) is checked in
test_vllm_rollout.py, whose in-process vLLM engines own this process's default group."""

import pytest

from rlpost import prototype
from rlpost.engines import resolve_rollout_engine
from rlpost.models.loading import resolve_model_path

pytestmark = pytest.mark.integration

QUESTIONS = [{"prompt": "What is 2 + 3?", "answer": "5"}]


def test_auto_samples_with_the_engine_training_resolves():
    training_picks = resolve_rollout_engine("auto", resolve_model_path("builtin:tiny-math"))
    samples = prototype.sample_completions("builtin:tiny-math", QUESTIONS, n=2, max_new_tokens=8)
    assert len(samples) == 2 and all(s.num_tokens <= 8 for s in samples)
    engine = prototype._engine("builtin:tiny-math", "float32", 0, "auto")
    assert type(engine).__name__ == {"hf": "HFRolloutEngine", "vllm": "VLLMRolloutEngine"}[training_picks]
