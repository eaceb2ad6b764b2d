"""Fixed-length training windows over one long token stream.

Documents are joined with a separator token (`newllm.data.corpora.load_tokens`) and the stream is
cut into windows of `seq_len` tokens, `stride` apart: item i is ``tokens[i*stride : i*stride+seq_len]``.
There is no padding: the incomplete tail is dropped (the seeds padded short texts with EOS and 94 %
of their training tokens were EOS). The index of a window is a stable sample id, so a sampler's
order, a resumed run and a logged sample all name the same tokens.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from newllm.errors import NewLLMError


class TokenWindows(Dataset):
    """Dataset of LongTensor windows (seq_len,) over a 1-D token array (numpy, memmap, tensor or list).

    ``len(ds) = (N - seq_len) // stride + 1`` full windows; stride defaults to seq_len (no overlap).
    The token array is not copied (a memory-mapped cache stays on disk); each item is copied out.
    """

    def __init__(self, tokens, seq_len: int, stride: int | None = None):
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        elif not isinstance(tokens, np.ndarray):
            tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1:
            raise NewLLMError(f"TokenWindows: tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise NewLLMError(f"TokenWindows: tokens must be integer ids, got dtype {tokens.dtype}")
        stride = seq_len if stride is None else stride
        if int(seq_len) < 1:
            raise NewLLMError(f"TokenWindows: seq_len must be >= 1, got {seq_len}")
        if int(stride) < 1:
            raise NewLLMError(f"TokenWindows: stride must be >= 1, got {stride}")
        if len(tokens) < seq_len:
            raise NewLLMError(f"TokenWindows: {len(tokens)} tokens are fewer than one window of seq_len={seq_len}")
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.stride = int(stride)

    def __len__(self) -> int:
        return (len(self.tokens) - self.seq_len) // self.stride + 1

    def span(self, i: int) -> tuple[int, int]:
        """(start, end) token positions of window i."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"TokenWindows: window {i} out of range for {n} windows")
        i %= n
        return i * self.stride, i * self.stride + self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        a, b = self.span(int(i))
        return torch.from_numpy(np.array(self.tokens[a:b], dtype=np.int64))  # (seq_len,)

    def __repr__(self) -> str:
        return f"TokenWindows({len(self)} windows of {self.seq_len}, stride {self.stride}, {len(self.tokens)} tokens)"
