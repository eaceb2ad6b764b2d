"""Our GGML dequantizers equal `gguf.quants.dequantize` bit for bit: on blocks that
`gguf.quants.quantize` makes from real-valued data, on hand-built raw blocks (random bytes with
finite fp16 scales: every bit pattern of the quants and packed scales is exercised), and on every
tensor type present in the real SmolLM2 GGUF file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFReader
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from newllm.checkpoints.gguf_dequant import DEQUANTIZERS, SUPPORTED, dequantize

REQUIRED = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # the list
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]  # gguf.quants can make these
#: byte offsets of the fp16 scale fields in one block (ggml-common.h block_* structs)
FP16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
               Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
RAW_TYPES = [t for t in DEQUANTIZERS if t in FP16_FIELDS]


def assert_bit_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    ref = np.ascontiguousarray(ref, dtype=np.float32).reshape(-1)
    assert ours.dtype == torch.float32 and ours.numel() == ref.size
    # compare bit patterns: equal values with different signs of zero or NaN payloads would show
    mismatch = np.flatnonzero(ours.numpy().view(np.uint32) != ref.view(np.uint32))
    assert mismatch.size == 0, f"{mismatch.size} values differ, first at {mismatch[0]}: {ours[mismatch[0]]} vs {ref[mismatch[0]]}"


def test_supports_at_least_the_required_types():
    assert set(REQUIRED) <= set(SUPPORTED)
    assert {"BF16", "Q5_0", "Q5_1", "Q2_K", "Q3_K"} <= set(SUPPORTED)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_equals_gguf_on_quantized_real_valued_data(qtype):
    rng = np.random.default_rng(int(qtype))
    # rows of 256 values with mixed scales, plus rows that stress edge cases (zeros, constants, one spike)
    data = rng.standard_normal((12, 256)).astype(np.float32) * np.logspace(-3, 2, 12, dtype=np.float32)[:, None]
    data[0] = 0.0
    data[1] = 0.75
    data[2, 17] = 1e4
    q = gguf_quantize(data, qtype)
    assert_bit_equal(dequantize(q, qtype), gguf_dequantize(q, qtype))


@pytest.mark.parametrize("qtype", RAW_TYPES, ids=lambda t: t.name)
def test_equals_gguf_on_raw_blocks(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(100 + int(qtype))
    raw = rng.integers(0, 256, size=(300, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:  # random finite scales, positive and negative, large and tiny
        scale = (rng.standard_normal(300) * 10.0 ** rng.integers(-4, 3, 300)).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(300, 2)
    raw = raw.reshape(6, 50 * type_size)  # 6 rows of 50 blocks, as a tensor would hold them
    ours = dequantize(raw, qtype)
    assert ours.numel() == 300 * block_size
    assert_bit_equal(ours, gguf_dequantize(raw, qtype))


def test_bf16_keeps_special_values():
    bits = np.array([0x0000, 0x8000, 0x3F80, 0x7F80, 0xFF80, 0x7FC1, 0x0001], dtype=np.uint16)  # 0, -0, 1, inf, -inf, NaN, subnormal
    raw = bits.view(np.uint8)
    assert_bit_equal(dequantize(raw, Q.BF16), gguf_dequantize(raw, Q.BF16))


def test_accepts_torch_bytes_and_rejects_partial_blocks():
    q = gguf_quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64), Q.Q8_0)
    assert_bit_equal(dequantize(torch.from_numpy(q.copy()), Q.Q8_0), gguf_dequantize(q, Q.Q8_0))
    with pytest.raises(ValueError, match="Q8_0 blocks of 34 bytes"):
        dequantize(q.reshape(-1)[:-1], Q.Q8_0)
    with pytest.raises(KeyError):
        dequantize(np.zeros(18, np.uint8), Q.IQ4_NL)


@pytest.fixture(scope="module")
def smollm_reader(shared_dir):
    return GGUFReader(shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_equals_gguf_on_every_type_in_the_real_file(smollm_reader):
    by_type: dict[str, list] = {}
    for t in smollm_reader.tensors:
        by_type.setdefault(Q(int(t.tensor_type)).name, []).append(t)
    assert set(by_type) == {"F32", "Q4_1", "Q8_0"}  # what SmolLM2-135M-Instruct.Q4_1.gguf holds
    for name, tensors in by_type.items():
        # the largest tensor of each type (the Q8_0 token embedding is 28M weights) and a few more
        picked = sorted(tensors, key=lambda t: -int(t.n_elements))[:4]
        for t in picked:
            ours = dequantize(t.data, t.tensor_type)
            assert ours.numel() == int(t.n_elements), t.name
            assert_bit_equal(ours, gguf_dequantize(t.data, t.tensor_type))
