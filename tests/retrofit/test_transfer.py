"""Attention transfer: teacher forcing feeds the replaced layer exactly the teacher's input; only the
new parameters train; the loss falls; the original weights do not move."""
from __future__ import annotations

import torch

from newllm import create_model
from newllm.retrofit import memory_from_attention
from newllm.retrofit.transfer import attention_transfer, capture_mixer_io, new_parameters


def test_transfer_trains_only_the_new_parts_on_the_teachers_inputs():
    torch.manual_seed(0)
    teacher = create_model("llama", vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, num_hidden_layers=3).eval()
    windows = [torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    both = capture_mixer_io(teacher, [0, 1], windows)
    pairs = both[1]
    assert len(both[0]) == len(pairs) == 3
    with torch.no_grad():  # the captured input is what layer 1's mixer sees inside the teacher
        h = teacher.embed(windows[0])
        h, _ = teacher.layers[0](h)
        torch.testing.assert_close(pairs[0][0], teacher.layers[1].input_layernorm(h), atol=0, rtol=0)
    student = memory_from_attention(teacher, [1], kind="window_memory", window=8)
    layer = student.layers[1]
    names = {n for n, p in layer.mixer.named_parameters() if any(p is q for q in new_parameters(layer.mixer))}
    assert names == {"feature_map.weight", "window_factor"}
    frozen = {n: p.detach().clone() for n, p in layer.named_parameters() if n.split(".")[-2] != "feature_map"
              and not n.endswith("window_factor")}
    losses = attention_transfer(layer, pairs, steps=60, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]
    for n, p in layer.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(p.requires_grad for p in layer.parameters())  # unfrozen again afterwards
