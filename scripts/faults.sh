#!/usr/bin/env bash
# Fault probes for issues 16 and 27 ("nothing a user gives strata is destroyed"; a second sweep: outputs,
# checkpoints, resume, leftovers), run against the release binary.
# Each probe gives strata a bad input or a fault, then records the exit code, the error message, whether every
# input file is byte-for-byte as it was (sha256 before and after), and whether any temporary or lock file of
# strata's is left in the work directory. Prints a Markdown table.
#
#   cargo build --release -p strata -p strata-bench && scripts/faults.sh [path/to/strata]
#
# The full-disk probes mount a small tmpfs in a private mount namespace (`unshare -m`, needs root); where that
# is not possible they are reported as skipped. Takes about a minute and a half. Every strata process runs with
# TMPDIR inside the work directory, so the scratch directories of the processes it kills stay there.

set -u
STRATA=${1:-$(dirname "$0")/../target/release/strata}
STRATA=$(realpath "$STRATA") || { echo "no strata binary at $STRATA: cargo build --release -p strata" >&2; exit 2; }
W=$(mktemp -d /tmp/strata-faults.XXXXXX)
trap 'rm -rf "$W"' EXIT
cd "$W" || exit 2
mkdir -p "$W/tmp" && export TMPDIR="$W/tmp"
BENCH="$(dirname "$STRATA")/strata-bench"
TINY=(--set model.n_layer=1 --set model.n_embd=32 --set model.n_head=2 --set model.seq_len=16
      --set data.micro_batch_size=2 --set train.log_every=100000)
LIMIT_S=60

# --- inputs ---------------------------------------------------------------------------------------------
python3 - <<'EOF' || { echo "python3 is needed to write the fixtures" >&2; exit 2; }
import struct
def tokens(path, n):
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, n, *([0] * 253)))
        f.write(struct.pack(f"<{n}H", *[(i * 7) % 256 for i in range(n)]))
tokens("train.bin", 4096)
tokens("big.bin", 200000)
open("huge.safetensors", "wb").write(struct.pack("<Q", 1 << 40) + b"{}{}{}{}")
open("short.safetensors", "wb").write(struct.pack("<Q", 1000) + b'{"a":1}     ')
open("text.txt", "w").write("hello strata " * 100)
open("run.toml", "w").write("[train]\nsteps = 3\n")
EOF
"$STRATA" train "${TINY[@]}" --steps 1 --set train.export_to="$W/init.safetensors" >/dev/null 2>&1
python3 - <<'EOF'
import json, struct
b = bytearray(open("init.safetensors", "rb").read())
n = struct.unpack("<Q", b[:8])[0]
start = json.loads(b[8:8 + n])["transformer.h.0.ln_1.weight"]["data_offsets"][0]
at = 8 + n + start + 4 * 3
b[at:at + 4] = struct.pack("<f", float("nan"))
open("nan.safetensors", "wb").write(b)
EOF
mkfifo fifo
mkdir -p sub adir
# As root, a private device node (the null device, 1:3): a strata that wrongly renamed over its export
# target must not replace the machine's /dev/null. Others cannot replace /dev/null.
if [ "$(id -u)" = 0 ] && mknod "$W/null-device" c 1 3 2>/dev/null; then DEV="$W/null-device"; else DEV=/dev/null; fi
ln -s "$DEV" link-to-device
ln -s init.safetensors link.safetensors
INPUTS=(train.bin init.safetensors run.toml text.txt huge.safetensors short.safetensors nan.safetensors)

# --- probes ---------------------------------------------------------------------------------------------
rows=()
sums() { sha256sum "${INPUTS[@]}" 2>/dev/null; }
leftovers() {  # strata's temporary and lock files, and unfinished saves (tmpck holds a probe's own .tmp copy)
    find "$W" -path "$W/tmpck" -prune -o \( -name '*.strata-tmp' -o -name '*.strata-lock' -o -name '*.safetensors.tmp' \
        -o -name 'step-*.tmp' \) -print | wc -l
}
message() {  # the error line, with the work directory shortened to $W
    grep -E '^(\[rank [0-9]+\] )?(error|Error|rank [0-9]+: error)' "$1" | tail -n 1 | sed "s|$W|\$W|g" | cut -c1-330
}
record() {  # probe rc errfile intact
    local msg; msg=$(message "$3"); msg=${msg//|/\\|}
    rows+=("| $1 | $2 | ${msg:-(no error line)} | $4 | $(leftovers) |")
}
probe() {  # probe-name command-or-function args...: runs it with a bound of LIMIT_S seconds
    local name=$1; shift
    local before; before=$(sums)
    ( "$@" ) >"$W/out" 2>"$W/err" </dev/null &
    local pid=$! ticks=0 rc
    while kill -0 "$pid" 2>/dev/null && [ $ticks -lt $((LIMIT_S * 20)) ]; do sleep 0.05; ticks=$((ticks + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
        pkill -KILL -P "$pid"; kill -KILL "$pid"; wait "$pid" 2>/dev/null; rc="hung: killed after ${LIMIT_S}s"
    else
        wait "$pid"; rc=$?
    fi
    local intact=yes; [ "$before" == "$(sums)" ] || intact=NO
    record "$name" "$rc" "$W/err" "$intact"
}
train() { "$STRATA" train "${TINY[@]}" "$@"; }

probe "metrics_file = data.train" train --steps 3 --set data.train="$W/train.bin" --set train.metrics_file="$W/train.bin"
probe "export_to = data.train" train --steps 3 --set data.train="$W/train.bin" --set train.export_to="$W/train.bin"
probe "metrics_file = init_from" train --steps 3 --set model.init_from="$W/init.safetensors" --set train.metrics_file="$W/init.safetensors"
probe "export_to = symlink to init_from" train --steps 3 --set model.init_from="$W/init.safetensors" --set train.export_to="$W/link.safetensors"
probe "metrics_file = config (via ..)" train "$W/run.toml" --set train.metrics_file="$W/sub/../run.toml"
probe "metrics_file = export_to" train --steps 3 --set train.metrics_file="$W/o" --set train.export_to="$W/sub/../o"
probe "prepare -o = its input" "$STRATA" prepare --tokenizer bytes "$W/text.txt" -o "$W/text.txt"
probe "export_to = a character device" train --steps 3 --set train.export_to="$DEV"
probe "export_to = symlink to a device" train --steps 3 --set train.export_to="$W/link-to-device"
probe "export_to = a directory" train --steps 3 --set train.export_to="$W/adir"
probe "export_to in a missing directory" train --steps 3 --set train.export_to="$W/no/such/w.safetensors"

if unshare -m sh -c "mount -t tmpfs -o size=64k tmpfs '$W/adir'" 2>/dev/null; then
    probe "export_to on a full disk" unshare -m sh -c 'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"' \
        "$W/adir" "$STRATA" train "${TINY[@]}" --steps 3 --set train.export_to="$W/adir/w.safetensors"
    probe "disk fills under metrics_file mid-run" unshare -m sh -c 'mount -t tmpfs -o size=256k tmpfs "$0" || exit 99
m="$0/metrics.jsonl"
"$@" --steps 700 --set train.metrics_file="$m" & pid=$!
i=0; while [ ! -s "$m" ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done
dd if=/dev/zero of="$0/filler" bs=4k 2>/dev/null; wait $pid' \
        "$W/adir" "$STRATA" train "${TINY[@]}" --set train.export_to="$W/mid.safetensors"
    rows+=("| ↳ the weights that run exported | - | \$W/mid.safetensors: $(stat -c %s "$W/mid.safetensors" 2>/dev/null || echo missing) bytes | - | - |")
else
    rows+=("| export_to on a full disk | skipped | needs root and unshare -m to mount a tmpfs | - | - |")
fi

rank_dependent() { # the same command on two ranks, with keys set from $RANK
    "$STRATA" launch --nproc-per-node 2 --grace-s 2 -- sh -c "exec \"\$0\" train \"\$@\" $1" "$STRATA" \
        "${TINY[@]}" --steps 3 --set dist.timeout_s=30 --set train.export_to="$W/ranks.safetensors"
}
probe "ranks with different model.n_layer" rank_dependent '--set model.n_layer=$((RANK + 1))'
probe "ranks with different optim.lr" rank_dependent '--set optim.lr=0.00$((RANK + 1))'

"$STRATA" train "${TINY[@]}" --steps 1000000 --set train.metrics_file="$W/m.jsonl" \
    --set train.export_to="$W/w.safetensors" >/dev/null 2>&1 &
first=$!
for _ in $(seq 300); do [ -s "$W/m.jsonl" ] && break; sleep 0.05; done
probe "second run on the same metrics_file" train --steps 2 --set train.metrics_file="$W/m.jsonl"
probe "second run on the same export_to" train --steps 2 --set train.export_to="$W/w.safetensors"
kill -TERM "$first"; wait "$first" 2>/dev/null
rows+=("| first run, after SIGTERM | $(kill -0 "$first" 2>/dev/null && echo running || echo ended) | (its lock files are removed by its signal handler) | - | $(leftovers) |")

probe "model.n_embd = 1000000000" train --set model.n_embd=1000000000
probe "model.n_layer = 100000" train --set model.n_layer=100000
probe "model beyond the machine's memory" train --set model.n_layer=1000 --set model.n_embd=8192 --set model.n_head=64
probe "train.threads = 100000" train --set train.threads=100000
probe "dist.timeout_s = 10^12" train --set dist.timeout_s=1000000000000
probe "--nproc 100000" train --nproc 100000
probe "--nproc 0" train --nproc 0
probe "config = /dev/zero" "$STRATA" train /dev/zero
probe "config = a FIFO" "$STRATA" train "$W/fifo"
probe "data.train = a FIFO" train --set data.train="$W/fifo"
probe "model.init_from = a FIFO" train --set model.init_from="$W/fifo"
probe "prepare input = a FIFO" "$STRATA" prepare "$W/fifo" -o "$W/out.bin"
probe "data.train = a directory" train --set data.train="$W/adir"
probe "init_from header length 2^40" train --set model.init_from="$W/huge.safetensors"
probe "init_from header beyond the file" train --set model.init_from="$W/short.safetensors"
probe "init_from holds a NaN" train --set model.init_from="$W/nan.safetensors"

truncated_under_run() {
    "$STRATA" train "${TINY[@]}" --steps 1000000 --set data.train="$W/big.bin" --set train.metrics_file="$W/t.jsonl" &
    local pid=$!
    trap 'kill -KILL $pid 2>/dev/null' EXIT
    for _ in $(seq 300); do [ -s "$W/t.jsonl" ] && break; sleep 0.05; done
    truncate -s 1088 "$W/big.bin"
    wait $pid
}
probe "token file truncated under a running job" truncated_under_run

tcp_rank0_stopped() {
    "$STRATA" train "${TINY[@]}" --nproc 2 --steps 1000000 --set dist.backend=tcp --set dist.timeout_s=3 &
    local launcher=$! rank0=""
    trap 'kill -KILL $launcher 2>/dev/null' EXIT
    for _ in $(seq 200); do
        for c in $(pgrep -P $launcher); do grep -qz '^RANK=0$' "/proc/$c/environ" 2>/dev/null && rank0=$c; done
        [ -n "$rank0" ] && break; sleep 0.05
    done
    sleep 1; kill -STOP "$rank0"; wait $launcher
}
probe "tcp: rank 0 SIGSTOPped" tcp_rank0_stopped

# --- front door: config, command line, DeepSpeed JSON, rendezvous, strata-bench -----------------------------
# Each error names the input it is about (the --set, the JSON key, the variable, the path), once; nothing given
# is silently dropped; strata-bench refuses what it cannot measure and leaves nothing behind.
BENCH=$(dirname "$STRATA")/strata-bench
printf '{"stage": 3,}' > ds-comma.json
printf '{"train_micro_batch_size_per_gpu": 18446744073709551615}' > ds-huge.json
printf '{"bf16": {"enabled": true}}' > ds-bf16.json
printf '{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}, "offload_optimizer": {"device": "cpu"}}}' > ds-nvme.json
printf '{"zero_optimization": {"stage": "auto"}, "scheduler": {"type": "WarmupLR"}}' > ds-auto.json
printf '{"zero_optimization": {"offload_parm": {}}}' > ds-unknown.json
printf '[zero]\nstage = 3\n[offload_param]\ndevice = "cpu"\n[offload_optimizer]\ndevice = "cpu"\n' > zero3.toml
printf '[model]\nn_layer = 1\n' > plain.toml
INPUTS+=(ds-comma.json ds-huge.json ds-bf16.json ds-nvme.json ds-auto.json ds-unknown.json zero3.toml plain.toml)
echo x > afile

probe "--steps 2 --set train.steps=1e3" train --steps 2 --set train.steps=1e3
probe "--set \"model\".n_layr=2 (a quoted key)" train --set '"model".n_layr=2'
probe "--set train.steps=2^64+" train --set train.steps=99999999999999999999
probe "launch -- strata train --nproc 2" "$STRATA" launch --nproc-per-node 2 --grace-s 1 -- "$STRATA" train "${TINY[@]}" --nproc 2 --steps 1
probe "WORLD_SIZE=0" env RANK=0 WORLD_SIZE=0 "$STRATA" train "${TINY[@]}" --steps 1
probe "DeepSpeed JSON with a trailing comma" train --deepspeed "$W/ds-comma.json"
probe "DeepSpeed integer beyond i64" train --deepspeed "$W/ds-huge.json"
probe "DeepSpeed bf16 on the CPU" train --steps 1 --deepspeed "$W/ds-bf16.json"
probe "DeepSpeed nvme without nvme_path" "$STRATA" train "$W/plain.toml" --deepspeed "$W/ds-nvme.json"
probe "DeepSpeed unknown key" train --deepspeed "$W/ds-unknown.json"
resolved=$("$STRATA" train "$W/zero3.toml" --deepspeed "$W/ds-auto.json" --print-config 2>/dev/null |
    awk '/^\[zero\]/{z=1} z&&/^stage/{print "zero.stage " $3; exit}')
rows+=("| DeepSpeed \"stage\": \"auto\" over a stage-3 TOML | - | resolves to ${resolved:-nothing} | - | - |")
probe "strata-bench io --path missing" "$BENCH" io --path "$W/mnt/nvme0" --size 4MiB
rows+=("| ↳ the missing path afterwards | - | $([ -e "$W/mnt" ] && echo created || echo 'not created') | - | - |")
probe "strata-bench io --path a file" "$BENCH" io --path "$W/afile" --size 4MiB
probe "strata-bench train --steps 0" "$BENCH" train --steps 0
probe "strata-bench error, RUST_BACKTRACE=1" env RUST_BACKTRACE=1 "$BENCH" train --set model.n_layr=1
rows+=("| ↳ its stderr | - | $(env RUST_BACKTRACE=1 "$BENCH" train --set model.n_layr=1 2>&1 | wc -l) line(s) | - | - |")
if unshare -m sh -c "mount -t tmpfs -o size=1M tmpfs '$W/adir'" 2>/dev/null; then
    probe "strata-bench io on a full disk" unshare -m sh -c 'mount -t tmpfs -o size=1M tmpfs "$0" && "$1" io --path "$0" --size 8MiB --block-size 1MiB --queue-depth 4 --buffered; rc=$?; ls -A "$0" > "$0.left"; exit $rc' "$W/adir" "$BENCH"
    rows+=("| ↳ files left on that disk | - | $(wc -l < "$W/adir.left") | - | - |")
else
    rows+=("| strata-bench io on a full disk | skipped | needs root and unshare -m to mount a tmpfs | - | - |")
fi
store_address() {  # the address rank 0's store listens on, under strata train --nproc 2
    "$STRATA" train "${TINY[@]}" --nproc 2 --steps 1000000 --set train.metrics_file="$W/s.jsonl" >/dev/null 2>&1 &
    local launcher=$!
    for _ in $(seq 600); do [ -s "$W/s.jsonl" ] && break; sleep 0.05; done
    python3 - "$launcher" <<'PY'
import os, sys
launcher = sys.argv[1]
kids = [p for p in os.listdir("/proc") if p.isdigit() and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == launcher]
inodes = set()
for k in kids:
    for fd in os.listdir(f"/proc/{k}/fd"):
        try:
            link = os.readlink(f"/proc/{k}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
out = []
for line in open("/proc/net/tcp").read().splitlines()[1:]:
    f = line.split()
    if f[3] == "0A" and f[9] in inodes:
        ip, port = f[1].split(":")
        out.append(".".join(str(b) for b in bytes.fromhex(ip)[::-1]) + ":" + str(int(port, 16)))
print(" ".join(out) or "none")
PY
    kill -KILL "$launcher" 2>/dev/null; wait "$launcher" 2>/dev/null
}
rows+=("| rendezvous store of strata train --nproc 2 | - | listens on $(store_address) | - | - |")

# --- issue 27: outputs, checkpoints, resume, leftovers ---------------------------------------------------
echo '{"train_micro_batch_size_per_gpu": 2}' > ds.json
train --steps 4 --set train.checkpoint_dir="$W/ck" --set train.checkpoint_every=2 --set train.keep_last=0 >/dev/null 2>&1
INPUTS+=(ds.json ck/step-00000002/rank0.bin ck/step-00000002/manifest.json ck/step-00000004/rank0.bin ck/step-00000004/manifest.json)
probe "--trace = the config" train "$W/run.toml" --trace "$W/run.toml"
probe "--trace = data.train" train --steps 2 --set data.train="$W/train.bin" --trace "$W/train.bin"
probe "--trace = model.init_from" train --steps 2 --set model.init_from="$W/init.safetensors" --trace "$W/init.safetensors"
probe "--trace = the --deepspeed JSON" train --steps 2 --deepspeed "$W/ds.json" --trace "$W/ds.json"
probe "--trace = train.metrics_file" train --steps 2 --set train.metrics_file="$W/tm.jsonl" --trace "$W/tm.jsonl"
probe "--trace = train.export_to" train --steps 2 --set train.export_to="$W/te.safetensors" --trace "$W/sub/../te.safetensors"
probe "--trace = rank0.bin of the checkpoint resumed" train --steps 6 --set data.micro_batch_size=2 \
    --resume "$W/ck/step-00000004" --trace "$W/ck/step-00000004/rank0.bin"
probe "--trace at 2 ranks: rank 1's file = metrics_file" train --nproc 2 --steps 2 \
    --set train.metrics_file="$W/tr.rank1.json" --trace "$W/tr.json"
if [ -x "$BENCH" ]; then
    probe "strata-bench train --trace = its config" "$BENCH" train --config "$W/run.toml" --steps 1 --warmup 0 --trace "$W/run.toml"
else
    rows+=("| strata-bench train --trace = its config | skipped | no strata-bench beside $STRATA | - | - |")
fi

# A resume at another split of the same global batch (2 rows: 1 rank × 2 → 2 ranks × 1) continues on the rows the
# uninterrupted run reads next; another global batch is refused.
train --steps 4 --set train.log_every=1 --set train.metrics_file="$W/straight.jsonl" >/dev/null 2>&1
train --steps 2 --set train.checkpoint_dir="$W/ck2" >/dev/null 2>&1
train --nproc 2 --steps 4 --set data.micro_batch_size=1 --set train.metrics_file="$W/split.jsonl" \
    --resume "$W/ck2/step-00000002" >/dev/null 2>"$W/err"
rc=$?
same=$(python3 -c 'import json,sys; a=[json.loads(l)["loss"] for l in open(sys.argv[1])][2:]; b=[json.loads(l)["loss"] for l in open(sys.argv[2])]
print("same losses as the uninterrupted run" if len(a)==len(b)==2 and all(abs(x-y)<=1e-5*abs(y) for x,y in zip(a,b)) else f"DIFFERENT: {b} vs {a}")' \
    "$W/straight.jsonl" "$W/split.jsonl" 2>&1)
rows+=("| resume: 1 rank × 2 rows → 2 ranks × 1 row | $rc | steps 3-4: $same | - | $(leftovers) |")
probe "resume with another global batch" train --steps 4 --set data.micro_batch_size=4 --resume "$W/ck2/step-00000002"

# Rank files and manifests of another checkpoint; a save in progress.
mkdir -p "$W/mix/step-00000004" "$W/edit/step-00000002" "$W/tmpck"
cp "$W"/ck/step-00000004/* "$W/mix/step-00000004/" && cp "$W"/ck/step-00000002/rank0.* "$W/mix/step-00000004/"
cp "$W"/ck/step-00000002/* "$W/edit/step-00000002/"
sed -i 's/"step": 2,/"step": 3,/' "$W/edit/step-00000002/manifest.json"
cp -r "$W/ck/step-00000004" "$W/tmpck/step-00000004.tmp"
probe "rank0.* of step 2 copied into step 4" train --steps 6 --resume "$W/mix/step-00000004"
probe "manifest of step 2 edited to say 3" train --steps 6 --resume "$W/edit/step-00000002"
probe "--resume a .tmp directory" train --steps 6 --resume "$W/tmpck/step-00000004.tmp"

# latest after going back: the newest save, not the highest step.
train --steps 4 --set train.checkpoint_dir="$W/ck3" --set train.checkpoint_every=2 >/dev/null 2>&1
train --steps 3 --set train.checkpoint_dir="$W/ck3" --resume "$W/ck3/step-00000002" >/dev/null 2>&1
train --steps 5 --set train.checkpoint_dir="$W/ck3" --set train.log_every=1 --resume latest >"$W/out" 2>"$W/err"
rc=$?
rows+=("| --resume latest after resuming step 2 and saving step 3 (step 4 abandoned) | $rc | $(grep -o 'resumed from [^ ]*' "$W/err" | sed "s|$W|\$W|g") | - | $(leftovers) |")

# Two runs on one checkpoint_dir; checkpoint_dir a file, or read-only.
"$STRATA" train "${TINY[@]}" --steps 1000000 --set train.checkpoint_dir="$W/ck4" --set train.metrics_file="$W/first4.jsonl" \
    >/dev/null 2>&1 &
first=$!
for _ in $(seq 300); do [ -s "$W/first4.jsonl" ] && break; sleep 0.05; done
probe "second run on the same checkpoint_dir" train --steps 2 --set train.checkpoint_dir="$W/sub/../ck4"
kill -TERM "$first"; wait "$first"; rc=$?
rows+=("| first run, after SIGTERM | $rc | $(ls "$W/ck4" | tr '\n' ' ') | - | $(leftovers) |")
echo "not a directory" > "$W/afile"
INPUTS+=(afile)
probe "checkpoint_dir = a regular file" train --steps 3 --set train.checkpoint_dir="$W/afile"
probe "checkpoint_dir below a regular file" train --steps 3 --set train.checkpoint_dir="$W/afile/ck"
if unshare -m sh -c "mount -t tmpfs -o ro,size=8m tmpfs '$W/adir'" 2>/dev/null; then
    probe "checkpoint_dir on a read-only file system" unshare -m sh -c 'mount -t tmpfs -o ro,size=8m tmpfs "$0" && exec "$@"' \
        "$W/adir" "$STRATA" train "${TINY[@]}" --steps 3 --set train.checkpoint_dir="$W/adir/ck"
fi

# One tensor under two names; a shape beyond its bytes.
python3 - <<'PY'
import json, struct
def st(path, tensors):  # tensors: [(name, shape, floats)]
    header, data = {}, b""
    for name, shape, values in tensors:
        b = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    h = json.dumps(header).encode(); h += b" " * (-len(h) % 8)
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + data)
b = bytearray(open("init.safetensors", "rb").read()); n = struct.unpack("<Q", b[:8])[0]
head = json.loads(b[8:8 + n]); head.pop("__metadata__", None)
tensors = []
for name, t in head.items():
    s, e = t["data_offsets"]; tensors.append((name, t["shape"], list(struct.unpack(f"<{(e - s) // 4}f", b[8 + n + s:8 + n + e]))))
c = [t for t in tensors if t[0] == "transformer.h.0.attn.c_attn.weight"][0]
st("twice.safetensors", tensors + [("h.0.attn.c_attn.weight", c[1], [v + 1 for v in c[2]])])
st("badshape.safetensors", [("a", [2], [0.0, 0.0]), ("b", [2, 2], [0.0, 0.0])])
PY
INPUTS+=(twice.safetensors badshape.safetensors)
probe "init_from: one tensor under two names" train --steps 1 --set model.init_from="$W/twice.safetensors"
probe "init_from: shape [2,2] over 8 bytes" train --steps 1 --set model.init_from="$W/badshape.safetensors"

# strata export into the checkpoint it reads, beside it, and with config.json a directory.
probe "export -o its checkpoint's rank0.bin" "$STRATA" export "$W/ck" -o "$W/ck/step-00000004/rank0.bin"
probe "export -o another checkpoint's rank0.bin" "$STRATA" export "$W/ck/step-00000004" -o "$W/ck/step-00000002/rank0.bin"
mkdir -p "$W/hf/config.json"
probe "export: config.json is a directory" "$STRATA" export "$W/ck" -o "$W/hf/m.safetensors"
rows+=("| ↳ left in \$W/hf | - | $(ls -A "$W/hf" | tr '\n' ' ') | - | - |")

# A resumed run's metrics file; a signal stop at 2 ranks.
train --steps 5 --set train.log_every=1 --set train.checkpoint_dir="$W/ck5" --set train.checkpoint_every=3 \
    --set train.keep_last=0 --set train.metrics_file="$W/m5.jsonl" >/dev/null 2>&1
train --steps 6 --set train.checkpoint_dir="$W/ck5" --set train.metrics_file="$W/m5.jsonl" \
    --resume "$W/ck5/step-00000003" >/dev/null 2>&1
rows+=("| metrics_file after a resume from step 3 of a 5-step run | - | steps $(grep -o '"step":[0-9]*' "$W/m5.jsonl" | cut -d: -f2 | tr '\n' ' ') | - | $(leftovers) |")
"$STRATA" train "${TINY[@]}" --nproc 2 --steps 1000000 --set train.checkpoint_dir="$W/ck6" --set train.metrics_file="$W/m6.jsonl" \
    >"$W/out" 2>"$W/err" &
launcher=$!
for _ in $(seq 400); do [ -s "$W/m6.jsonl" ] && break; sleep 0.05; done
kill -TERM "$launcher"; wait "$launcher"; rc=$?
rows+=("| SIGTERM to a 2-rank run that saves checkpoints | $rc | $(grep -c 'error' "$W/err") lines say error; $(grep -o 'stopped by SIGTERM after step [0-9]*' "$W/out" | head -1) | - | $(leftovers) |")

# Scratch directories of killed processes (TMPDIR is $W/tmp); then strata doctor.
rm -rf "$W/tmp"/*
# The embedded default keeps its swap files in a fresh directory under $TMPDIR ("@tmp").
"$STRATA" train "${TINY[@]}" --nproc 2 --steps 1000000 --set train.metrics_file="$W/m7.jsonl" >/dev/null 2>&1 &
launcher=$!
for _ in $(seq 400); do [ -s "$W/m7.jsonl" ] && break; sleep 0.05; done
kill -KILL "$launcher"; wait "$launcher" 2>/dev/null; sleep 1
left=$(ls "$W/tmp" | tr '\n' ' ')
probe "strata doctor after SIGKILL of a launcher" "$STRATA" doctor
rows+=("| ↳ in \$TMPDIR before / after | - | before: $left / after: $(ls "$W/tmp" | tr '\n' ' ') | - | - |")

# Messages.
probe "optim.lr = 1e30 (a non-finite loss)" train --steps 5 --set optim.lr=1e30 --set optim.warmup_steps=0
probe "doctor: a regular file as offload path" "$STRATA" doctor "$W/afile"
rows+=("| ↳ its line | - | $(grep O_DIRECT "$W/out" | sed "s|$W|\$W|g;s/  */ /g") | - | - |")
probe "doctor: a missing offload path" "$STRATA" doctor "$W/no/such/dir"
rows+=("| ↳ its line | - | $(grep O_DIRECT "$W/out" | sed "s|$W|\$W|g;s/  */ /g") | - | - |")
mkdir -p "$W/swap"
"$STRATA" train "${TINY[@]}" --steps 1000000 --set offload_param.nvme_path="\"$W/swap\"" \
    --set offload_optimizer.nvme_path="\"$W/swap\"" --set train.metrics_file="$W/m8.jsonl" >/dev/null 2>&1 &
first=$!
for _ in $(seq 300); do [ -s "$W/m8.jsonl" ] && break; sleep 0.05; done
probe "second run on the same nvme_path" train --steps 2 \
    --set offload_param.nvme_path="\"$W/swap\"" --set offload_optimizer.nvme_path="\"$W/swap\""
kill -KILL "$first"; wait "$first" 2>/dev/null

# --- table ----------------------------------------------------------------------------------------------
echo "strata fault probes, $(date -u +%Y-%m-%dT%H:%MZ), $("$STRATA" --version), $(uname -sr)"
echo
echo "| probe | rc | message | inputs intact | strata temp/lock files left |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
