"""The evaluator tests run tiny models (d 32): one intra-op thread. Splitting ops that small over
threads gains nothing, and on a shared machine every op then waits for a descheduled sibling thread
(measured here: ~8 ms per op with 2 threads under load, 30x the work itself)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
