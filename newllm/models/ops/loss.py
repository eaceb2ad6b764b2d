"""Next-token cross-entropy straight from the hidden states, by chunks of rows (the logits never exist whole).

    loss = mean over scored rows i of  logsumexp_v(h_i W_v) - h_i W_{t_i}          h: (N, d), W: (V, d)

`linear_cross_entropy(h, weight, targets, chunk_rows)` computes, for `chunk_rows` rows at a time,
the logits z = h W^T in the compute dtype (bf16 under autocast, else the weights' dtype), their
log-sum-exp in fp32, and at once the gradient of the loss with respect to them, softmax(z) -
onehot(t), which it keeps in the compute dtype for the backward (two matmuls: dL/dh = G W,
dL/dW = G^T h, each scaled by 1 / rows scored). Rows whose target is `ignore_index` (-100) score
nothing and get no gradient.

What it saves against `F.cross_entropy(logits.float(), t)` on (N, V) logits: the fp32 copy of the
logits, log_softmax's output and its backward's separate passes over (N, V), and the zero-filled
gradient NLL's backward writes; each chunk's fp32 work stays small enough to live in cache. At a
vocabulary of 50K and d 512 the LM head and its loss are about half of a Pythia-70m step.

Numerics: the same logits (the matmul rounds them to the compute dtype exactly as `lm_head(x)`
does), the same fp32 log-sum-exp; in fp32 the loss equals F.cross_entropy's to rounding (tested,
1e-6 relative) and the gradients to 1e-5. The gradient of the logits is rounded to the compute
dtype before its matmuls, as autocast's backward does.
"""
from __future__ import annotations

import torch

from newllm.errors import NewLLMError


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                ignore_index: int) -> torch.Tensor:
        N, V = h.shape[0], weight.shape[0]
        grad_logits = torch.empty(N, V, dtype=h.dtype, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        valid_all = targets != ignore_index
        scored = valid_all.sum()
        # reading back whether any row is ignored is a graph break under torch.compile: there, always mask
        masked = torch.compiler.is_compiling() or not bool(valid_all.all())
        wt = weight.t()
        in_place = h.dtype == torch.float32
        for a in range(0, N, chunk_rows):
            b = min(a + chunk_rows, N)
            if in_place:  # fp32: the logits are written where their gradient will be
                z = torch.mm(h[a:b], wt, out=grad_logits[a:b])
            else:  # rounded to the compute dtype exactly as lm_head(x) rounds them, then fp32
                z = (h[a:b] @ wt).float()
            t = targets[a:b]
            valid = valid_all[a:b]
            tc = torch.where(valid, t, 0).unsqueeze(1)
            zt = z.gather(1, tc)  # the target's logit, before z is overwritten
            m = z.amax(dim=1, keepdim=True)
            z.sub_(m).exp_()
            s = z.sum(dim=1, keepdim=True)
            total += ((m + s.log() - zt).squeeze(1) * valid).sum()  # logsumexp(z) - z_t per scored row
            z.div_(s)  # softmax(z)
            z.scatter_add_(1, tc, -valid.to(z.dtype).unsqueeze(1))  # - onehot(t) on scored rows
            if masked:
                z.masked_fill_(~valid.unsqueeze(1), 0.0)  # ignored rows: no gradient
            if not in_place:
                grad_logits[a:b] = z
        ctx.save_for_backward(h, weight, grad_logits, scored)
        return total / scored

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight, grad_logits, scored = ctx.saved_tensors
        scale = (grad_out / scored).to(h.dtype)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_logits @ weight) * scale  # the scale on the small side of each product: (N, d)
        if ctx.needs_input_grad[1]:
            grad_w = grad_logits.t() @ (h * scale)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean CE of the logits h @ weight.T against targets (module doc). h: (..., d), weight: (V, d),
    targets: (...) int64 with `ignore_index` for unscored rows. Under autocast the matmuls run in the
    autocast dtype (as `F.linear` would), the softmax in fp32; gradients flow to h and weight."""
    if targets.shape != h.shape[:-1]:
        raise NewLLMError(f"linear_cross_entropy: targets {tuple(targets.shape)} must be hidden states' "
                          f"{tuple(h.shape[:-1])}")
    if chunk_rows <= 0:
        raise NewLLMError(f"linear_cross_entropy: chunk_rows must be > 0, got {chunk_rows}")
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if not torch.compiler.is_compiling() and not bool((targets != ignore_index).any()):  # (compiled: a NaN loss)
        raise NewLLMError(f"linear_cross_entropy: every target is {ignore_index} (ignored); a loss over nothing "
                          "would be NaN")
    dtype = weight.dtype
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h.to(dtype), weight.to(dtype), targets, chunk_rows, ignore_index)
