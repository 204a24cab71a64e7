"""Shared fixtures: tiny random models saved once per session, calibration data,
and the warnings loguru printed.

``tests/unit`` holds the fast tests of pure pieces (no ``oneshot``);
``tests/integration`` runs ``oneshot`` on the tiny models and the applications.
"""

from __future__ import annotations

import pytest
import torch
from loguru import logger

from tests.models import save_tiny_llama, save_tiny_qwen3_moe, token_dataset

NUM_SAMPLES, SEQ_LEN = 8, 32


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random 3-layer Llama (hidden 128) with a tokenizer, saved to a folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def one_layer_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama1", num_hidden_layers=1)


@pytest.fixture(scope="session")
def two_layer_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama2", num_hidden_layers=2)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """A random 2-layer Qwen3-MoE with 4 experts."""
    return save_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny") / "moe")


@pytest.fixture(scope="session")
def calibration():
    """``NUM_SAMPLES`` sequences of ``SEQ_LEN`` random tokens."""
    return token_dataset(NUM_SAMPLES, SEQ_LEN, seed=1)


@pytest.fixture(scope="session")
def held_out():
    return torch.tensor(token_dataset(4, 48, seed=2)["input_ids"])


@pytest.fixture
def warnings():
    """The WARNING messages loguru prints while the test runs (not the
    toolkit's METRIC records, whose level number is higher)."""
    messages: list[str] = []
    handle = logger.add(
        lambda message: messages.append(str(message)),
        filter=lambda record: record["level"].name == "WARNING",
    )
    yield messages
    logger.remove(handle)
