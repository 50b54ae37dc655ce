"""Fixtures shared by the stage tests."""

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The micro Llama (seed 0) with its tokenizer, built offline once per session; tests only read it."""
    from parallel.tiny import build_tiny_model

    return build_tiny_model("micro-llama", tmp_path_factory.mktemp("micro"), seed=0)
