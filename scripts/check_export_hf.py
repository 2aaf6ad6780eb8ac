#!/usr/bin/env python3
"""Checks `strata export` against Hugging Face transformers (where PyTorch and transformers are
installed; CI runs the Rust side of this check in runtime/tests/checkpoint.rs).

Loads the exported directory (model.safetensors + config.json) with
`transformers.GPT2LMHeadModel.from_pretrained` in fp32, computes the mean cross-entropy of the
first micro-batch of a token file (llm.c format; rows by the README's data rule), and compares it
with the loss `strata train` logs for its first step on the same weights (model.init_from) and
the same file: they must agree within 1e-4 relative.

    scripts/check_export_hf.py --strata target/release/strata --model DIR --tokens FILE \
        [--batch 8] [--seq 128]
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import GPT2LMHeadModel


def read_tokens(path):
    data = pathlib.Path(path).read_bytes()
    header = np.frombuffer(data[: 256 * 4], dtype="<i4")
    if header[0] != 20240520:
        sys.exit(f"{path}: not an llm.c token file (magic {header[0]})")
    n = int(header[2])
    return np.frombuffer(data[256 * 4 : 256 * 4 + 2 * n], dtype="<u2").astype(np.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strata", required=True)
    ap.add_argument("--model", required=True, help="directory with model.safetensors and config.json")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    model_dir = pathlib.Path(args.model)
    config = json.loads((model_dir / "config.json").read_text())

    # strata: the loss of step 1 (computed before the update) from the exported weights.
    with tempfile.TemporaryDirectory() as tmp:
        metrics = pathlib.Path(tmp) / "m.jsonl"
        cmd = [
            args.strata, "train", "--steps", "1",
            "--set", f'model.init_from="{model_dir / "model.safetensors"}"',
            "--set", f'data.train="{args.tokens}"',
            "--set", f"data.micro_batch_size={args.batch}",
            "--set", f"model.seq_len={args.seq}",
            "--set", f"model.n_layer={config['n_layer']}",
            "--set", f"model.n_head={config['n_head']}",
            "--set", f"model.n_embd={config['n_embd']}",
            "--set", f"model.vocab_size={config['vocab_size']}",
            "--set", "zero.stage=0",
            "--set", 'offload_param.device="none"',
            "--set", 'offload_optimizer.device="none"',
            "--set", f'train.metrics_file="{metrics}"',
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        strata_loss = json.loads(metrics.read_text().splitlines()[0])["loss"]

    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tokens = read_tokens(args.tokens)
    b, t = args.batch, args.seq
    rows = np.stack([tokens[r * t : r * t + t + 1] for r in range(b)])
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
    with torch.no_grad():
        logits = model(x).logits
        hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    rel = abs(hf_loss - strata_loss) / abs(hf_loss)
    print(f"transformers {hf_loss:.6f}, strata {strata_loss:.6f}, relative difference {rel:.2e}")
    sys.exit(0 if rel <= 1e-4 else 1)


if __name__ == "__main__":
    main()
