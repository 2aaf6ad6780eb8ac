#!/usr/bin/env python3
"""Writes a Hugging Face model directory of random bf16 weights for the memory benchmark
(bench/memory.sh): `config.json` and `model-0000K-of-0000N.safetensors` shards with
`model.safetensors.index.json`, in the layout transformers' `save_pretrained` writes, without
PyTorch (numpy only). The default shape is Qwen/Qwen2.5-1.5B's config.json (1.54 B parameters,
q/k/v biases, 12 query and 2 key/value heads, tied 151,936-token embedding): 3.09 GB of bf16.

The values are normal(0, 0.02) rounded to bf16 (norm weights 1): incompressible, since this
machine's disk detects zeros. Written tensor by tensor, in pieces, so the script holds little.

    python3 bench/make_hf_model.py OUT_DIR [--layers 28] [--max-shard-size 1GB] [--seed 0]
"""
import argparse
import json
import os
import struct

import numpy as np

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 1536, 8960, 12, 2, 151936
PIECE = 1 << 24  # elements generated at once


def tensors(layers):
    """(name, shape, kind) in the order transformers' state dict has them."""
    head_dim = HIDDEN // HEADS
    kv = KV_HEADS * head_dim
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN), "normal")]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), "normal"),
            (p + "self_attn.q_proj.bias", (HIDDEN,), "normal"),
            (p + "self_attn.k_proj.weight", (kv, HIDDEN), "normal"),
            (p + "self_attn.k_proj.bias", (kv,), "normal"),
            (p + "self_attn.v_proj.weight", (kv, HIDDEN), "normal"),
            (p + "self_attn.v_proj.bias", (kv,), "normal"),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN), "normal"),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN), "normal"),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN), "normal"),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER), "normal"),
            (p + "input_layernorm.weight", (HIDDEN,), "ones"),
            (p + "post_attention_layernorm.weight", (HIDDEN,), "ones"),
        ]
    out.append(("model.norm.weight", (HIDDEN,), "ones"))
    return out


def size_bytes(text):
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for suffix, scale in units.items():
        if text.upper().endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def bf16_pieces(n, kind, rng):
    """n bf16 values as little-endian bytes, a piece at a time."""
    for start in range(0, n, PIECE):
        k = min(PIECE, n - start)
        if kind == "ones":
            x = np.ones(k, np.float32)
        else:
            x = rng.standard_normal(k, dtype=np.float32) * np.float32(0.02)
        # Round to nearest even into the top 16 bits.
        u = x.view(np.uint32)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        yield u.astype("<u2").tobytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--max-shard-size", default="1GB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    limit = size_bytes(args.max_shard_size)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    # transformers' rule: tensors in order, a new shard when the next would pass the limit.
    shards, current, used = [], [], 0
    for name, shape, kind in tensors(args.layers):
        nbytes = 2 * int(np.prod(shape))
        if current and used + nbytes > limit:
            shards.append(current)
            current, used = [], 0
        current.append((name, shape, kind))
        used += nbytes
    shards.append(current)

    weight_map, total, params = {}, 0, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shard:
            nbytes = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
            params += nbytes // 2
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(os.path.join(args.out, file), "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name, shape, kind in shard:
                for piece in bf16_pieces(int(np.prod(shape)), kind, rng):
                    f.write(piece)
        total += offset
        print(f"{file}: {offset / 1e9:.2f} GB", flush=True)

    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": args.layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 21,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"{args.out}: {params / 1e9:.3f} B parameters, {total / 1e9:.2f} GB of bf16 in {len(shards)} shards")


if __name__ == "__main__":
    main()
