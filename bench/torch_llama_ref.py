#!/usr/bin/env python3
"""PyTorch reference for strata's Llama-family runs (not part of the tests): transformers' own
`LlamaForCausalLM` (or Qwen2/Qwen3/Mistral, by the config's keys) built from a strata TOML config's [model]
section, trained as `strata-bench train --config CONFIG` trains it: B sequences of T random tokens per step,
AdamW (weight decay 0.1 on matrices), gradient clipping at 1.0, no activation recompute.

  --device cpu   fp32, eager PyTorch, `torch.set_num_threads(--threads)`: the CPU comparison of the README
                 (a Llama-shaped model of GPT-2 124M's size against strata on the same shape, same work).
  --device cuda  fp32 weights with bf16 autocast, fused AdamW, SDPA attention: gpu_check.sh's Llama rows.

FLOPs are counted as strata counts them: 6 per parameter of a matrix product (an untied input embedding is a
lookup) plus 12·n_layer·n_head·head_dim·seq_len per token. Prints one JSON object (tokens_per_s, tflops,
ms_per_step = the median step).

    python3 bench/torch_llama_ref.py --config configs/llama-124m-cpu.toml --device cpu --steps 3 --warmup 1
"""

import argparse
import json
import statistics
import time
import tomllib

import torch
import torch.nn.functional as F


def hf_model(m, attn):
    """The transformers class and config for strata's [model] keys (see the README's config reference)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    rope = {"rope_type": "default", "rope_theta": m.get("rope_theta", 10000.0)}
    if "rope_scaling" in m:
        rope.update(m["rope_scaling"])
    common = dict(
        vocab_size=m["vocab_size"], hidden_size=m["n_embd"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["n_layer"], num_attention_heads=m["n_head"],
        num_key_value_heads=m.get("n_kv_head", m["n_head"]), max_position_embeddings=max(m["seq_len"], 8192),
        rms_norm_eps=m.get("rms_norm_eps", 1e-6), tie_word_embeddings=m.get("tie_word_embeddings", False),
        rope_parameters=rope)
    if "head_dim" in m:
        common["head_dim"] = m["head_dim"]
    if m.get("qk_norm"):
        cls, cfg = Qwen3ForCausalLM, Qwen3Config(attention_bias=m.get("attention_bias", False), **common)
    elif m.get("qkv_bias"):
        cls, cfg = Qwen2ForCausalLM, Qwen2Config(**common)
    elif "sliding_window" in m:
        cls, cfg = MistralForCausalLM, MistralConfig(sliding_window=m["sliding_window"], **common)
    else:
        cls, cfg = LlamaForCausalLM, LlamaConfig(attention_bias=m.get("attention_bias", False),
                                                 mlp_bias=m.get("mlp_bias", False), **common)
    cfg._attn_implementation = attn
    return cls(cfg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="a strata TOML config with arch = \"llama\"")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    ap.add_argument("--batch", type=int, default=0, help="micro-batch (default: the config's)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    with open(a.config, "rb") as f:
        toml = tomllib.load(f)
    m = toml["model"]
    assert m.get("arch") == "llama", "the config's model.arch must be \"llama\""
    batch = a.batch or toml.get("data", {}).get("micro_batch_size", 8)
    t = m["seq_len"]
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(0)
    gpu = a.device == "cuda"
    model = hf_model(m, "sdpa" if gpu else "eager").to(a.device).float().train()
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    matmul_params = params - (0 if tied else embed.numel())
    hd = m.get("head_dim", m["n_embd"] // m["n_head"])
    flops_per_token = 6 * matmul_params + 12 * m["n_layer"] * m["n_head"] * hd * t
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=gpu)

    def step():
        idx = torch.randint(0, m["vocab_size"], (batch, t), device=a.device)
        tgt = torch.randint(0, m["vocab_size"], (batch, t), device=a.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            logits = model(input_ids=idx).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(a.warmup):
        step()
    sync()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    tps = batch * t / (ms / 1e3)
    row = {
        "framework": f"torch {torch.__version__}", "model": type(model).__name__, "params": params,
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "ms_per_step": round(ms, 2), "tokens_per_s": round(tps, 1),
        "tflops": round(tps * flops_per_token / 1e12, 4), "loss": float(loss.detach()),
    }
    if gpu:
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
