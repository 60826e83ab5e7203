"""Shared fixtures. The hub is switched off for the whole suite: nothing here may reach it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of smollm2-135m, loaded once per session. Do not modify it in place:
    tests that change weights work on ``copy.deepcopy(model)``."""
    from edgellm import load_model

    torch.manual_seed(0)
    return load_model(quiet=True)


@pytest.fixture()
def tiny():
    """A tiny randomly initialised Llama (fresh for each test)."""
    from edgellm import tiny_llama

    return tiny_llama()
