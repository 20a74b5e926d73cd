"""Shared set-up for the pytest-benchmark suites: one thread count for every timing."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _fixed_threads():
    torch.set_num_threads(torch.get_num_threads())
    yield
