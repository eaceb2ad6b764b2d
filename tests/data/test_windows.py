"""TokenWindows: item i is tokens[i*stride : i*stride+seq_len], full windows only, stable indices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from newllm import NewLLMError
from newllm.data.windows import TokenWindows


@pytest.mark.parametrize("n,seq_len,stride,count", [(100, 10, None, 10), (105, 10, None, 10), (100, 10, 3, 31),
                                                    (10, 10, 4, 1), (11, 10, 1, 2)])
def test_windows_cover_the_stream(n, seq_len, stride, count):
    tokens = np.arange(n, dtype=np.int32) * 7
    ds = TokenWindows(tokens, seq_len, stride)
    step = stride or seq_len
    assert len(ds) == count
    for i in range(count):
        item = ds[i]
        assert item.dtype == torch.long and item.shape == (seq_len,)
        assert item.tolist() == tokens[i * step:i * step + seq_len].tolist()
    last_end = (count - 1) * step + seq_len
    assert last_end <= n < last_end + step  # the incomplete tail (shorter than a step) is dropped
    assert ds[-1].tolist() == ds[count - 1].tolist()
    with pytest.raises(IndexError):
        ds[count]


def test_inputs_of_every_kind_and_no_copy():
    base = np.arange(50, dtype=np.int64)
    for tokens in (base, base.astype(np.int32), torch.arange(50), list(range(50))):
        assert TokenWindows(tokens, 8, 5)[3].tolist() == list(range(15, 23))
    ds = TokenWindows(base, 8)
    assert ds.tokens is base  # a memory-mapped cache is read window by window, not loaded
    item = ds[0]
    item[0] = -1  # items are copies
    assert base[0] == 0


def test_dataloader_batches():
    ds = TokenWindows(np.arange(64), 8)
    batches = list(DataLoader(ds, batch_size=4))
    assert [b.shape for b in batches] == [(4, 8), (4, 8)]
    assert torch.equal(torch.cat(batches).flatten(), torch.arange(64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(tokens=np.arange(5), seq_len=8), "5 tokens are fewer than one window of seq_len=8"),
    (dict(tokens=np.arange(5), seq_len=0), "seq_len must be >= 1"),
    (dict(tokens=np.arange(5), seq_len=2, stride=0), "stride must be >= 1"),
    (dict(tokens=np.zeros((2, 5), dtype=np.int64), seq_len=2), "must be 1-D"),
    (dict(tokens=np.zeros(5), seq_len=2), "integer ids"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(NewLLMError, match=match):
        TokenWindows(**kwargs)
