"""Ops tests run tiny tensors: one intra-op thread (two threads on a loaded machine make every small
op wait on the other)."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
