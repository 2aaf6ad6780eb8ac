#!/usr/bin/env python3
"""PyTorch reference for the GPU throughput run of bench/gpu_check.sh (not part of the tests).

The same model and step as `strata-bench train --config configs/gpt-1.3b-h100.toml`: GPT-2
architecture (pre-LN blocks, tanh GELU, tied token embedding as the output layer), fp32 weights
with bf16 autocast, fused AdamW (weight decay 0.1), gradient clipping at 1.0, B sequences of T
tokens of random data per step, everything on one GPU. Attention is PyTorch's fused causal
`scaled_dot_product_attention` (flash attention on an H100). `--compile` wraps the model in
torch.compile.

FLOPs are counted as strata counts them: 6·params + 12·n_layer·n_embd·seq_len per token.
Prints one JSON object (tokens_per_s, tflops, ms_per_step = the median step).

    python3 bench/torch_gpt_ref.py [--compile] [--steps 10] [--warmup 3]
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, nh):
        super().__init__()
        self.nh = nh
        self.ln_1 = nn.LayerNorm(c)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.nh, c // self.nh).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, n_layer, n_embd, n_head, vocab, seq_len):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--n-embd", type=int, default=2048)
    ap.add_argument("--n-head", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()

    torch.manual_seed(0)
    dev = "cuda"
    model = Gpt(a.n_layer, a.n_embd, a.n_head, a.vocab, a.seq_len).to(dev)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    step_model = torch.compile(model) if a.compile else model

    def step():
        idx = torch.randint(0, a.vocab, (a.batch, a.seq_len), device=dev)
        tgt = torch.randint(0, a.vocab, (a.batch, a.seq_len), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(idx, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    tokens = a.batch * a.seq_len
    flops_per_token = 6 * params + 12 * a.n_layer * a.n_embd * a.seq_len
    tps = tokens / (ms / 1e3)
    print(json.dumps({
        "framework": f"torch {torch.__version__}", "compile": a.compile, "params": params,
        "ms_per_step": round(ms, 2), "tokens_per_s": round(tps, 1),
        "tflops": round(tps * flops_per_token / 1e12, 1), "loss": float(loss.detach()),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
