"""Training throughput: newllm's training step vs transformers' GPTNeoXForCausalLM, same process.

    python benchmarks/bench_train.py                     # CPU size: d=256, 4 layers, vocab 8192, 8 x 256 tokens
    python benchmarks/bench_train.py --full --batch 8 --seq 512 --steps 5    # the `pythia` preset (Pythia-70m)
    python benchmarks/bench_train.py --device cuda --full --amp bf16 --batch 16 --seq 2048

Both models have the same GPT-NeoX config and the same weights (the transformers model is built
first, saved, and loaded into newllm with `newllm.checkpoints.hf`), see the same batches of real
text (tiny-shakespeare through a byte-level BPE of the model's vocabulary size) and use the same
optimizer (AdamW, same lr / betas / weight decay, grad clipping at 1.0). newllm's step is
`Trainer.train_step` (the real loop: batch sampling, loss, backward, clipping, schedule, AdamW);
transformers' step is the same sequence written around `GPTNeoXForCausalLM` (sdpa attention,
dropout 0). The first-step losses are compared before anything is timed, so a fast wrong model
cannot report a ratio.

Timing: after --warmup steps each, the two alternate in --rounds rounds of --steps steps (so load
from other jobs hits both alike); the best round of each is reported, as tokens/s, and the ratio
newllm / transformers (> 1: newllm faster). Nothing is asserted about time.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWLLM_DATA_DIR", ROOT.parent / "shared"))

SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=8192)


def neox_config(args):
    from transformers import GPTNeoXConfig

    from newllm.models.presets import PRESETS

    p = dict(PRESETS["pythia"])
    if not args.full:
        p.update(SMALL)
    return GPTNeoXConfig(
        vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"], intermediate_size=p["intermediate_size"],
        rotary_pct=p["rotary_pct"], rotary_emb_base=p["rotary_emb_base"],
        max_position_embeddings=p["max_position_embeddings"], use_parallel_residual=p["use_parallel_residual"],
        layer_norm_eps=p["layer_norm_eps"], hidden_act="gelu", tie_word_embeddings=False,
        attention_dropout=0.0, hidden_dropout=0.0, classifier_dropout=0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full `pythia` preset (Pythia-70m dims, vocab 50304)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16", "auto"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPTNeoXForCausalLM

    from newllm.checkpoints.hf import load_hf_model
    from newllm.data.bpe import train_bpe
    from newllm.train import TrainConfig, Trainer
    from newllm.train.loop import WindowSampler

    cfg_hf = neox_config(args)
    text = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text()
    tok = train_bpe([text], min(cfg_hf.vocab_size, 8192))
    tokens = tok.encode(text)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(cfg_hf)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf_model(d)
    dev = torch.device(args.device)
    hf.to(dev).train()

    tcfg = TrainConfig.from_dict(dict(
        device=args.device, seq_len=args.seq, batch_size=args.batch, grad_accum=1, max_steps=10**9, lr=1e-4,
        min_lr=1e-4, warmup_steps=0, weight_decay=0.1, grad_clip=1.0, amp=args.amp, progress=False,
        data={"tokenizer": "unused"}, run_dir=tempfile.mkdtemp(prefix="bench_train-")))
    trainer = Trainer(tcfg, ours, tokens)
    # transformers gets AdamW with the same settings and the same (decay / no-decay) groups
    names = {id(p): n for n, p in hf.named_parameters()}
    decay = [p for p in hf.parameters() if p.dim() >= 2 and "embed_in" not in names[id(p)]]
    no_decay = [p for p in hf.parameters() if not (p.dim() >= 2 and "embed_in" not in names[id(p)])]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=tuple(tcfg.betas), eps=tcfg.eps, fused=dev.type == "cuda" or None)
    data = WindowSampler(trainer.windows, args.batch, tcfg.seed, dev)  # the same batches, in the same order

    def autocast():
        return trainer.autocast()

    scaler = torch.amp.GradScaler(dev.type, enabled=args.amp == "fp16")

    def hf_step():
        x = data.next_batch()
        with autocast():
            logits = hf(input_ids=x[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def ours_step():
        return trainer.train_step().loss

    l_ours, l_hf = ours_step(), hf_step()
    print(f"first-step loss: newllm {l_ours:.6f}  transformers {l_hf:.6f}  |diff| {abs(l_ours - l_hf):.2e}")
    if abs(l_ours - l_hf) > (1e-4 if trainer.amp == "none" else 5e-2):
        raise SystemExit("first-step losses differ: the two models are not the same; no timing reported")
    for _ in range(args.warmup - 1):
        ours_step(), hf_step()

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    best = {"newllm": float("inf"), "transformers": float("inf")}
    for _ in range(args.rounds):
        best["newllm"] = min(best["newllm"], timed(ours_step))
        best["transformers"] = min(best["transformers"], timed(hf_step))
    ntok = args.steps * args.batch * args.seq
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"model: d={cfg_hf.hidden_size} layers={cfg_hf.num_hidden_layers} heads={cfg_hf.num_attention_heads} "
          f"vocab={cfg_hf.vocab_size} ({n_params / 1e6:.1f}M params); batch {args.batch} x {args.seq} tokens; "
          f"device {args.device}, amp {args.amp}, threads {torch.get_num_threads()}")
    for k, t in best.items():
        print(f"{k:>13}: {ntok / t:10.0f} tokens/s  (best of {args.rounds} rounds of {args.steps} steps)")
    print(f"ratio newllm / transformers: {best['transformers'] / best['newllm']:.2f}x")
    if dev.type == "cpu":  # MFU: 6 N tokens/s over the measured matmul peak of the dtype in use
        from bench_amp import matmul_params, matmul_peak

        used = trainer.amp
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(used, torch.float32)
        peak = matmul_peak(dtype)
        for k, t in best.items():
            print(f"{k:>13}: MFU {6 * matmul_params(ours) * ntok / t / (peak * 1e9):.1%} of the measured {dtype} matmul peak "
                  f"({peak:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
