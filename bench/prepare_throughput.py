#!/usr/bin/env python3
"""`strata prepare` throughput against Hugging Face tokenizers' `encode_batch`, on the same documents, in one run.

    /work/venv-ref/bin/python bench/prepare_throughput.py [--strata target/release/strata] [--mb 64] [--runs 3]

Needs Python with `tokenizers` (not CI). The corpus is the text of Python source files under this Python's
site-packages (English prose and code), cut to --mb megabytes, one document per file. The tokenizer is a byte-level
BPE with Llama 3's split pattern and a 32,000-token vocabulary, trained here on the corpus's first 8 MB (a real
model's tokenizer.json cannot be downloaded on this machine). Both sides encode every document and append EOS:
- strata: `strata prepare corpus.jsonl --tokenizer DIR -o out.bin` (reads JSON lines, tokenizes in parallel over
  the cores, writes the token file), timed as a whole process;
- Python: `Tokenizer.encode_batch(documents)` (Rust, parallel over the cores) on the documents already in memory.
Each row alternates the two, takes the best of --runs, and checks that both produced the same ids (`wrong` counts
differing ids). `--tokenizer gpt2` also times strata's built-in GPT-2 BPE (tiktoken) on the same text.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def corpus(limit_bytes):
    root = os.path.dirname(os.path.dirname(np.__file__))
    docs, total = [], 0
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            docs.append(text)
            total += len(text.encode())
            if total >= limit_bytes:
                return docs
    return docs


def train_tokenizer(docs, out_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    sample, size = [], 0
    for d in docs:
        sample.append(d)
        size += len(d)
        if size > 8 << 20:
            break
    trainer = trainers.BpeTrainer(
        vocab_size=32000,
        special_tokens=["<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|end_of_text|>"}, f)
    return tok


def read_tokens(path):
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(1024), dtype="<i4")
        count = int(header[2])
        width = 2 if header[1] == 1 else int(header[3])
        return np.frombuffer(f.read(count * width), dtype="<u2" if width == 2 else "<u4").astype(np.int64)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strata", default="target/release/strata")
    p.add_argument("--mb", type=float, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="strata-prepare-bench-")
    docs = corpus(int(args.mb * 1e6))
    text_bytes = sum(len(d.encode()) for d in docs)
    tok_dir = os.path.join(work, "tok")
    tok = train_tokenizer(docs, tok_dir)
    eos = tok.token_to_id("<|end_of_text|>")
    jsonl = os.path.join(work, "corpus.jsonl")
    with open(jsonl, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    out = os.path.join(work, "out.bin")

    best_strata, best_python, python_ids = float("inf"), float("inf"), None
    for _ in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run([args.strata, "prepare", jsonl, "--tokenizer", tok_dir, "-o", out], check=True,
                       stdout=subprocess.DEVNULL)
        best_strata = min(best_strata, time.perf_counter() - t0)
        t0 = time.perf_counter()
        encodings = tok.encode_batch(docs, add_special_tokens=True)
        best_python = min(best_python, time.perf_counter() - t0)
        python_ids = encodings
    want = np.concatenate([np.array(e.ids + [eos], dtype=np.int64) for e in python_ids])
    got = read_tokens(out)
    wrong = int(np.count_nonzero(got != want)) if len(got) == len(want) else max(len(got), len(want))
    rows = [
        {"what": "strata prepare (JSONL in, token file out)", "seconds": best_strata},
        {"what": "tokenizers encode_batch (in memory)", "seconds": best_python},
    ]
    for r in rows:
        r.update(mb=text_bytes / 1e6, mb_per_s=text_bytes / 1e6 / r["seconds"], tokens=len(want), wrong=wrong)
    print(f"{len(docs)} documents, {text_bytes / 1e6:.1f} MB, {len(want)} tokens, vocab 32000, {os.cpu_count()} cores")
    print(f"{'what':45} {'s':>8} {'MB/s':>8} {'wrong':>6}")
    for r in rows:
        print(f"{r['what']:45} {r['seconds']:8.2f} {r['mb_per_s']:8.2f} {r['wrong']:6d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    subprocess.run(["rm", "-rf", work], check=True)
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
