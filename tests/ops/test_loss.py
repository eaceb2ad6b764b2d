"""The chunked LM-head cross-entropy (newllm.models.ops.loss) against F.cross_entropy on whole logits,
and the models' `targets=` path against `model(x).logits` + F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

from newllm import create_model
from newllm.errors import NewLLMError
from newllm.models.ops.loss import linear_cross_entropy


def reference(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)


def grads(fn, h, w):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("chunk", [1, 7, 40, 64, 1000])
@pytest.mark.parametrize("ignored", [False, True])
def test_fp32_equals_cross_entropy(chunk, ignored):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(40, 16, generator=g), torch.randn(97, 16, generator=g) * 0.3
    t = torch.randint(0, 97, (40,), generator=g)
    if ignored:
        t[::3] = -100
    l_ref, gh_ref, gw_ref = grads(lambda h, w: reference(h, w, t), h, w)
    l, gh, gw = grads(lambda h, w: linear_cross_entropy(h, w, t, chunk), h, w)
    assert abs(float(l) - float(l_ref)) <= 1e-6 * abs(float(l_ref))
    assert rel(gh, gh_ref) <= 1e-5 and rel(gw, gw_ref) <= 1e-5
    if ignored:  # an ignored row gets no gradient at all
        assert torch.equal(gh[::3], torch.zeros_like(gh[::3]))


def test_bf16_autocast_matches_autocast_reference():
    """Under autocast the logits are the bf16 matmul's, as lm_head's; the softmax is fp32."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(64, 32, generator=g), torch.randn(300, 32, generator=g) * 0.2
    t = torch.randint(0, 300, (64,), generator=g)

    def under_autocast(fn):
        def run(h, w):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h, w)
        return run
    l_ref, gh_ref, gw_ref = grads(under_autocast(lambda h, w: reference(h, w, t)), h, w)
    l, gh, gw = grads(under_autocast(lambda h, w: linear_cross_entropy(h, w, t, 16)), h, w)
    assert l.dtype == torch.float32
    assert abs(float(l) - float(l_ref)) <= 1e-5 * abs(float(l_ref))
    # the gradients pass through bf16 on both sides (rounded at different points): bf16's 2^-8
    assert rel(gh, gh_ref) <= 1e-2 and rel(gw, gw_ref) <= 1e-2
    assert gh.dtype == gw.dtype == torch.float32


def test_bad_input_is_one_line():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(NewLLMError, match="every target is -100"):
        linear_cross_entropy(h, w, torch.full((4,), -100), 2)
    with pytest.raises(NewLLMError, match="targets"):
        linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(NewLLMError, match="chunk_rows"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), 0)


TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


@pytest.mark.parametrize("preset", ["pythia", "llama", "infini_all", "context_pythia"])
def test_model_targets_equal_logits_loss(preset):
    """model(x[:, :-1], targets=x[:, 1:]) is the Trainer's loss F.cross_entropy(model(x[:, :-1]).logits, x[:, 1:]):
    the same value (1e-6 relative) and the same gradient of every parameter (1e-5 of its largest)."""
    torch.manual_seed(0)
    extra = {"segment_length": 8} if preset == "infini_all" else {"num_key_value_heads": 2} if preset == "llama" else {}
    model = create_model(preset, **TINY, **extra)
    x = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(3))
    loss_ref = F.cross_entropy(model(x[:, :-1]).logits.float().flatten(0, 1), x[:, 1:].flatten())
    loss_ref.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model(x[:, :-1], targets=x[:, 1:], loss_chunk=7)
    assert out.logits is None
    out.loss.backward()
    assert abs(float(out.loss.detach()) - float(loss_ref.detach())) <= 1e-6 * float(loss_ref.detach())
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for n in ref:
        assert rel(got[n], ref[n]) <= 1e-5, n


def test_model_loss_arguments_are_checked():
    model = create_model("pythia", **TINY)
    x = torch.randint(0, 128, (2, 9))
    with pytest.raises(NewLLMError, match="not both"):
        model(x, labels=x, targets=x)
    with pytest.raises(NewLLMError, match="logits_to_keep"):
        model(x, targets=x, logits_to_keep=1)
    with pytest.raises(NewLLMError, match="loss_chunk"):
        model(x, targets=x, loss_chunk=0)
    with pytest.raises(NewLLMError, match="targets"):
        model(x, targets=x[:, 1:])
