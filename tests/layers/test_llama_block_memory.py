"""Memory layers in a Llama block: a SmolLM2-shaped stack whose layer 0 is a Llama-block Infini layer
generates, and it takes SmolLM2-135M's real weights by name (every tensor but the memory gate)."""
from __future__ import annotations

import pytest
import torch

from newllm import create_model
from newllm.models.layers import InfiniLayer, LlamaLayer

TINY = dict(vocab_size=97, hidden_size=36, num_attention_heads=6, num_key_value_heads=2, intermediate_size=48,
            num_hidden_layers=3, segment_length=8)


def test_llama_infini_preset_is_a_llama_stack_with_a_llama_block_memory_layer():
    torch.manual_seed(0)
    model = create_model("llama_infini", **TINY).eval()
    first, rest = model.layers[0], model.layers[1:]
    assert isinstance(first, InfiniLayer) and all(isinstance(layer, LlamaLayer) for layer in rest)
    assert first.config.block == "llama" and first.config.num_key_value_heads == 2
    # the same module names as a LlamaLayer, apart from the memory's own parameter (the gate beta)
    llama_names = {n for n, _ in rest[0].named_parameters()}
    assert {n for n, _ in first.named_parameters()} - llama_names == {"self_attn.beta"}
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=12)  # crosses a segment boundary while decoding
    ref = ids
    with torch.no_grad():
        for _ in range(12):
            ref = torch.cat((ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_smollm2_weights_load_into_a_llama_block_memory_stack_which_generates(shared_dir):
    from newllm import load_pretrained, load_tokenizer
    from newllm.models.presets import preset_config
    from newllm.models.context import build_model

    gguf = shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    smol = load_pretrained(gguf)
    c = smol.config
    torch.manual_seed(0)
    layer = c.layers[0]
    model = build_model(preset_config(
        "llama_infini", vocab_size=c.vocab_size, num_hidden_layers=len(c.layers), hidden_size=layer["hidden_size"],
        num_attention_heads=layer["num_attention_heads"], num_key_value_heads=layer["num_key_value_heads"],
        intermediate_size=layer["intermediate_size"], rope_theta=layer["rope_theta"],
        rms_norm_eps=layer["rms_norm_eps"], norm_eps=c.norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=c.max_position_embeddings, segment_length=64)).eval()
    missing, unexpected = model.load_state_dict(smol.state_dict(), strict=False)
    assert missing == ["layers.0.self_attn.beta"] and unexpected == []
    tok = load_tokenizer(gguf)
    prompt = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8)
        logits = model(out).logits
    assert out.shape == (1, prompt.shape[1] + 8) and torch.isfinite(logits).all()
    # layers 1.. are SmolLM2's own layers, weights and all
    with torch.no_grad():
        torch.testing.assert_close(model.layers[5](torch.ones(1, 3, 576))[0], smol.layers[5](torch.ones(1, 3, 576))[0],
                                   atol=0, rtol=0)
