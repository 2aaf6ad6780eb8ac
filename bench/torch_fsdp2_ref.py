#!/usr/bin/env python3
"""PyTorch FSDP2 with CPU offload: the reference for strata's ZeRO-3 offload rows of bench/gpu_check.sh.

The model is bench/torch_gpt_ref.py's GPT-2 (imported from beside this file): pre-LN blocks, tanh GELU,
SDPA causal attention, the token embedding tied as the output layer. It is built on the meta device, each
block is wrapped with `fully_shard`, then the root, with

  * `CPUOffloadPolicy(pin_memory=True)`: sharded fp32 parameters, their gradients and the optimizer states
    live in pinned host memory; each block's parameters are copied to the GPU and cast to bf16 as it runs;
  * `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: bf16 compute, fp32 gradient reduction;

then materialized on the host (`to_empty`) and initialized there (N(0, 0.02) for matrices and embeddings,
LayerNorm 1/0, biases 0). AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1 on matrices and embeddings)
steps on the host: `fused=True` when this torch supports it on CPU tensors (else `foreach=True`; the JSON's
"optimizer" says which ran), after gradient clipping at 1.0. One process, world size 1: it initializes the
process group itself when not launched by torchrun (gloo for CPU tensors, NCCL for CUDA tensors).

FLOPs are counted as strata counts them: 6·params + 12·n_layer·n_embd·seq_len per token.
Prints one JSON object: tokens_per_s, tflops, ms_per_step (the median step), params, peak GPU memory,
optimizer kind, torch version, device name.

    python3 bench/torch_fsdp2_ref.py --config configs/gpt-1.3b-offload-cpu.toml --steps 5 --warmup 2
    python3 bench/torch_fsdp2_ref.py --n-layer 32 --n-embd 4096 --n-head 32 --steps 3 --warmup 1
    python3 bench/torch_fsdp2_ref.py --device cpu --no-offload --n-layer 2 --n-embd 64 --n-head 4 \\
        --vocab 256 --seq-len 64 --batch 4 --steps 30 --warmup 0 --same-batch    # CPU smoke run

`--config FILE.toml` takes the shape from a strata config (model.n_layer, n_head, n_embd, vocab_size,
seq_len; data.micro_batch_size, grad_accum_steps); flags given on the command line win. The config's
offload, ZeRO and activation-checkpointing settings are not read: this script always runs FSDP2 as above
(`--activation-checkpointing` and `--no-offload` change it). `--time-limit S` stops after the first timed step
that ends more than S seconds after the start (model set-up included) and reports the steps timed so far.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt_ref import Gpt  # noqa: E402  (the same model as the plain PyTorch reference)

SHAPE_KEYS = {  # argparse dest: (TOML section, key)
    "n_layer": ("model", "n_layer"),
    "n_head": ("model", "n_head"),
    "n_embd": ("model", "n_embd"),
    "vocab": ("model", "vocab_size"),
    "seq_len": ("model", "seq_len"),
    "batch": ("data", "micro_batch_size"),
    "grad_accum": ("data", "grad_accum_steps"),
}
DEFAULTS = {"n_layer": 24, "n_head": 16, "n_embd": 2048, "vocab": 50304, "seq_len": 1024, "batch": 8,
            "grad_accum": 1}


def log(msg):
    print(f"torch_fsdp2_ref: {msg}", file=sys.stderr, flush=True)


def read_toml_shape(path):
    """The shape keys of a strata TOML config (tomllib on Python >= 3.11; else a minimal reader of
    `key = integer` lines under `[section]` headers, enough for these keys)."""
    try:
        import tomllib

        with open(path, "rb") as f:
            table = tomllib.load(f)
    except ImportError:
        table, section = {}, None
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line.startswith("[") and line.endswith("]"):
                    section = table.setdefault(line.strip("[] "), {})
                elif "=" in line and section is not None:
                    k, v = (s.strip() for s in line.split("=", 1))
                    try:
                        section[k] = int(v.replace("_", ""))
                    except ValueError:
                        pass
    shape = {}
    for dest, (sec, key) in SHAPE_KEYS.items():
        v = table.get(sec, {}).get(key)
        if isinstance(v, int):
            shape[dest] = v
    return shape


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="strata TOML config to read the model shape and batch from")
    ap.add_argument("--n-layer", dest="n_layer", type=int)
    ap.add_argument("--n-embd", dest="n_embd", type=int)
    ap.add_argument("--n-head", dest="n_head", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--seq-len", dest="seq_len", type=int)
    ap.add_argument("--batch", type=int, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--no-offload", dest="offload", action="store_false",
                    help="no CPUOffloadPolicy (parameters and optimizer states on --device)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="MixedPrecisionPolicy param_dtype (reduce_dtype is fp32)")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each block in backward (torch.utils.checkpoint)")
    ap.add_argument("--optimizer", choices=["auto", "fused", "foreach"], default="auto",
                    help="AdamW implementation (auto: fused if this torch supports it on the parameters' device)")
    ap.add_argument("--same-batch", action="store_true",
                    help="train on one fixed batch (the loss must fall: a smoke test) instead of fresh random tokens")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="stop after the first timed step ending more than S seconds after the start")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    shape = read_toml_shape(a.config) if a.config else {}
    for dest, default in DEFAULTS.items():
        if getattr(a, dest) is None:
            setattr(a, dest, shape.get(dest, default))
    if a.n_embd % a.n_head:
        ap.error(f"n_embd {a.n_embd} does not divide by n_head {a.n_head}")
    return a


def init_process_group(device):
    """World size 1 unless launched by torchrun; the gloo backend serves CPU tensors (the gradients of
    CPU-offloaded parameters, clip_grad_norm_'s reduction), NCCL CUDA tensors."""
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def init_weights(model):
    """N(0, 0.02) for matrices and embeddings (as torch_gpt_ref.py), LayerNorm weight 1 and bias 0, Linear
    bias 0; on each rank's local shard (at world size 1, the whole tensor)."""
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if p.dim() >= 2:
            local.normal_(0.0, 0.02)
        elif name.endswith("weight"):  # LayerNorm
            local.fill_(1.0)
        else:
            local.zero_()


def fused_adamw_supported(device_type):
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device_type in _get_fused_kernels_supported_devices()
    except ImportError:
        return device_type == "cuda"


def make_adamw(model, kind):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    flag = {"fused": True} if kind == "fused" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, **flag)


def main(argv=None):
    a = parse_args(argv)
    t_start = time.perf_counter()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_fsdp2_ref: no CUDA device (use --device cpu --no-offload for a CPU smoke run)")
    if a.offload and a.device == "cpu":
        log("--device cpu: CPU offload is meaningless there, running without it")
        a.offload = False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    rank, world = init_process_group(a.device)
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.manual_seed(a.seed + rank)
    mesh = init_device_mesh(a.device, (world,))
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=True) if a.offload else OffloadPolicy()

    with torch.device("meta"):
        model = Gpt(a.n_layer, a.n_embd, a.n_head, a.vocab, a.seq_len)
    if a.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        for block in model.blocks:
            block.forward = (lambda f: lambda x: checkpoint(f, x, use_reentrant=False))(block.forward)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    # With CPU offload the sharded parameters live (pinned) on the host: materialize them there.
    model.to_empty(device="cpu" if a.offload else a.device)
    init_weights(model)
    params = sum(p.numel() for p in model.parameters())
    param_device = next(model.parameters()).device.type

    if a.optimizer == "auto":
        kind = "fused" if fused_adamw_supported(param_device) else "foreach"
    else:
        kind = a.optimizer
    opt = make_adamw(model, kind)
    opt_note = f"{kind} ({param_device})"
    init_s = time.perf_counter() - t_start
    log(f"{params} parameters on {param_device} (offload={a.offload}), AdamW {opt_note}, set-up {init_s:.1f} s")

    dev = torch.device(a.device)
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)

    def batch():
        idx = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), generator=gen)
        idx = idx.to(dev, non_blocking=True)
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    fixed = [batch() for _ in range(a.grad_accum)] if a.same_batch else None

    def step():
        total = 0.0
        for m in range(a.grad_accum):
            idx, tgt = fixed[m] if fixed else batch()
            loss = model(idx, tgt) / a.grad_accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    times, losses, stopped_early = [], [], False
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        try:
            loss = step()
        except RuntimeError as e:
            # A fused optimizer this torch refuses for these (DTensor, host) parameters: fall back once.
            if i == 0 and kind == "fused" and "fused" in str(e).lower():
                log(f"fused AdamW failed ({str(e).splitlines()[0]}); falling back to foreach")
                opt.zero_grad(set_to_none=True)
                kind = "foreach"
                opt = make_adamw(model, kind)
                opt_note = f"foreach ({param_device}; fused failed)"
                loss = step()
            else:
                raise
        sync()
        dt = time.perf_counter() - t0
        lv = float(loss)
        losses.append(lv)
        log(f"step {i}: loss {lv:.4f} {dt * 1e3:.1f} ms" + (" (warm-up)" if i < a.warmup else ""))
        if i >= a.warmup:
            times.append(dt)
        if (a.time_limit is not None and times and time.perf_counter() - t_start > a.time_limit
                and i + 1 < a.warmup + a.steps):
            stopped_early = True
            log(f"--time-limit {a.time_limit:g} s reached after {i + 1} steps")
            break

    tokens = a.batch * a.seq_len * a.grad_accum
    flops_per_token = 6 * params + 12 * a.n_layer * a.n_embd * a.seq_len
    ms = statistics.median(times) * 1e3 if times else None
    tps = tokens / (ms / 1e3) if ms else None
    on_gpu = a.device == "cuda"
    try:
        import resource

        peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:
        peak_rss_gib = None
    row = {
        "framework": f"torch {torch.__version__} fsdp2",
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "offload": "cpu" if a.offload else "none",
        "precision": a.precision,
        "activation_checkpointing": a.activation_checkpointing,
        "optimizer": f"AdamW {opt_note}",
        "world_size": world,
        "n_layer": a.n_layer, "n_embd": a.n_embd, "n_head": a.n_head, "vocab": a.vocab, "seq_len": a.seq_len,
        "params": params,
        "tokens_per_step": tokens,
        "init_s": round(init_s, 2),
        "steps_timed": len(times),
        "stopped_early": stopped_early,
        "ms_per_step": round(ms, 2) if ms else None,
        "step_ms_min": round(min(times) * 1e3, 2) if times else None,
        "step_ms_max": round(max(times) * 1e3, 2) if times else None,
        "tokens_per_s": round(tps, 1) if tps else None,
        "tflops": round(tps * flops_per_token / 1e12, 1) if tps else None,
        "first_loss": losses[0] if losses else None,
        "loss": losses[-1] if losses else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if on_gpu else None,
        "peak_rss_gib": round(peak_rss_gib, 1) if peak_rss_gib is not None else None,
    }
    if rank == 0:
        print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
