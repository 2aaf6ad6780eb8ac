//! `bench/gpu_check.sh` without a GPU: stand-ins for `strata`, `strata-bench` and Python print canned rows, so
//! that the script's table (ratios, targets, verdicts, "-" for null rates), its JSON lines and summary, the
//! arguments it passes, its per-phase time limits under one deadline ("TIMEOUT", then "skipped (time)") and its
//! skips (no torch, no config) are checked here, where the real runs cannot happen.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const STRATA: &str = r#"#!/usr/bin/env bash
echo "strata $*" >> "$STUB_LOG"
case "$1" in
    doctor) echo "status: ok" ;;
    selftest)
        echo "pinned/h2d 256 MiB                                    54.2 GB/s        >= 10 GB/s  PASS"
        echo "pinned/d2h 256 MiB                                    55.0 GB/s        >= 10 GB/s  PASS"
        echo "selftest: 217 passed, 0 failed in 8.2s" ;;
esac
"#;

const STRATA_BENCH: &str = r#"#!/usr/bin/env bash
echo "strata-bench $*" >> "$STUB_LOG"
cfg=""; prev=""
for a in "$@"; do [ "$prev" = --config ] && cfg="$(basename "$a" .toml)"; prev="$a"; done
case " ${STUB_HANG:-} " in *" $cfg "*) echo "step 0: (hangs)" >&2; exec sleep 1000 ;; esac
echo "step 0: loss 10.9 1.0 ms 1.0 tokens/s" >&2
case "$cfg" in
    gpt-1.3b-h100) echo '{"params":1313722368,"tflops":410.0,"ms_per_step":170.0,"step_ms_median":170.0,"h2d_gbps":null,"d2h_gbps":null,"compute_wait_fraction":null,"nvme_read_gbps":null,"nvme_write_gbps":null,"profile":[{"op":"gemm: matmul_forward","calls":97,"ms":27.2}]}' ;;
    gpt-1.3b-offload-cpu) echo '{"device":"NVIDIA H100 80GB HBM3 (sm_90)","params":1313722368,"tflops":170.0,"ms_per_step":430.0,"step_ms_median":410.0,"h2d_gbps":40.5,"d2h_gbps":38.25,"compute_wait_fraction":0.12,"nvme_read_gbps":null,"nvme_write_gbps":null,"tier_bytes_per_rank":{"device":1,"host":2,"nvme":0}}' ;;
    gpt-6.7b-offload-cpu) echo '{"params":6654402560,"tflops":150.0,"ms_per_step":2100.0,"step_ms_median":2100.0,"h2d_gbps":null,"d2h_gbps":null,"compute_wait_fraction":null}' ;;
    gpt-10b-h100-nvme) echo '{"params":12000000000,"tflops":20.0,"ms_per_step":30000.0,"step_ms_median":30000.0,"h2d_gbps":null,"d2h_gbps":null,"compute_wait_fraction":null,"nvme_read_gbps":1.4,"nvme_write_gbps":1.9}' ;;
    *) echo "no canned row for $cfg" >&2; exit 3 ;;
esac
"#;

const PYTHON: &str = r#"#!/usr/bin/env bash
echo "python $*" >> "$STUB_LOG"
if [ "$1" = -c ]; then
    [ -n "${STUB_NO_TORCH:-}" ] && { echo "ModuleNotFoundError: No module named 'torch'" >&2; exit 1; }
    case "$2" in *print*) echo "2.11.0-stub" ;; esac
    exit 0
fi
cfg=""; prev=""
for a in "$@"; do [ "$prev" = --config ] && cfg="$(basename "$a" .toml)"; prev="$a"; done
case "$(basename "$1"):$cfg" in
    torch_fsdp2_ref.py:gpt-1.3b-offload-cpu) echo '{"framework": "torch 2.11 fsdp2", "params": 1313722368, "ms_per_step": 695.0, "tflops": 100.0, "h2d_gbps": 99.0}' ;;
    torch_fsdp2_ref.py:gpt-6.7b-offload-cpu) echo '{"framework": "torch 2.11 fsdp2", "params": 6654402560, "ms_per_step": 3200.0, "tflops": 106.0}' ;;
    torch_gpt_ref.py:) echo '{"framework": "torch 2.11", "params": 1313722368, "ms_per_step": 164.7, "tflops": 420.0}' ;;
    *) echo "no canned row for $*" >&2; exit 3 ;;
esac
"#;

struct Run {
    ok: bool,
    stdout: String,
    summary: String,
    rows: Vec<serde_json::Value>,
    calls: String,
    out: PathBuf,
    secs: f64,
    _dir: tempfile::TempDir,
}

impl Run {
    /// The table line of `row`.
    fn row(&self, row: &str) -> &str {
        let prefix = format!("| {row} ");
        self.summary
            .lines()
            .find(|l| l.starts_with(&prefix) && l.matches('|').count() > 10)
            .unwrap_or_else(|| panic!("no table row {row} in\n{}", self.summary))
    }
    fn status(&self, phase: &str) -> &str {
        let prefix = format!("| {phase} | ");
        self.summary
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no phase {phase} in\n{}", self.summary))
            .trim_end_matches(" |")
    }
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write stub");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// gpu_check.sh copied into a fresh folder with the stand-ins and the configs (and a stand-in 10B config
/// with `nvme_config`), run with `env`.
fn run(env: &[(&str, &str)], nvme_config: bool) -> Run {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::copy(repo.join("bench/gpu_check.sh"), d.join("gpu_check.sh")).expect("copy script");
    for c in [
        "gpt-1.3b-h100",
        "gpt-1.3b-offload-cpu",
        "gpt-6.7b-offload-cpu",
    ] {
        std::fs::copy(
            repo.join(format!("configs/{c}.toml")),
            d.join(format!("{c}.toml")),
        )
        .expect("copy config");
    }
    if nvme_config {
        std::fs::copy(
            repo.join("configs/gpt-13b-nvme.toml"),
            d.join("gpt-10b-h100-nvme.toml"),
        )
        .expect("copy config");
    }
    // Stand-ins for the torch scripts: the Python stand-in answers by their names.
    for s in ["torch_fsdp2_ref.py", "torch_gpt_ref.py"] {
        std::fs::write(d.join(s), "").expect("write");
    }
    write_exec(&d.join("strata"), STRATA);
    write_exec(&d.join("strata-bench"), STRATA_BENCH);
    write_exec(&d.join("python-stub"), PYTHON);
    let out = d.join("out");
    let log = d.join("calls.log");
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(d.join("gpu_check.sh"))
        .env("STRATA_GPU_CHECK_OUT", &out)
        .env("PYTHON", d.join("python-stub"))
        .env("STUB_LOG", &log)
        .envs(env.iter().copied())
        .output()
        .expect("run gpu_check.sh");
    let secs = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary = std::fs::read_to_string(out.join("summary.md"))
        .unwrap_or_else(|_| panic!("no summary.md:\n{stdout}\n{stderr}"));
    let rows = std::fs::read_to_string(out.join("rows.jsonl"))
        .expect("rows.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        stdout.contains(&summary),
        "the summary is printed last:\n{stdout}"
    );
    Run {
        ok: output.status.success(),
        stdout,
        summary,
        rows,
        calls: std::fs::read_to_string(&log).unwrap_or_default(),
        out,
        secs,
        _dir: dir,
    }
}

#[test]
fn every_row_with_ratio_target_and_verdict_and_the_json_lines() {
    let r = run(&[], false);
    // 6.65B: 150 / 106 = 1.42x, below 1.5x: the exit status says so.
    assert!(!r.ok, "{}", r.stdout);
    let gpu = r.row("gpu-1.3b");
    for want in [
        "410.0",
        "420.0",
        "0.98x",
        ">= 300 TFLOP/s",
        "PASS",
        "170",
        "165",
    ] {
        assert!(gpu.contains(want), "{want} in {gpu}");
    }
    // Strata's TFLOP/s at the median step: 170 × 430 / 410.
    let off = r.row("offload-1.3b");
    for want in [
        "178.3",
        "100.0",
        "1.78x",
        ">= 1.5x FSDP2",
        "PASS",
        "40.5 / 38.2",
        "12%",
        "410",
        "695",
    ] {
        assert!(off.contains(want), "{want} in {off}");
    }
    let big = r.row("offload-6.7b");
    for want in ["150.0", "106.0", "1.42x", "BELOW", "6.65e+09"] {
        assert!(big.contains(want), "{want} in {big}");
    }
    // Null rates are "-".
    let cells: Vec<&str> = big.split('|').map(str::trim).collect();
    assert_eq!((cells[7], cells[8], cells[9]), ("-", "-", "-"), "{big}");
    assert!(
        r.row("nvme-10b")
            .contains("skipped (no config gpt-10b-h100-nvme.toml)"),
        "{}",
        r.summary
    );
    for phase in [
        "doctor",
        "selftest",
        "gpu-1.3b_strata",
        "offload-1.3b_strata",
        "offload-1.3b_torch",
        "offload-6.7b_strata",
        "offload-6.7b_torch",
        "torch-1.3b_torch",
    ] {
        assert_eq!(r.status(phase), "ok", "{phase}:\n{}", r.summary);
    }
    assert!(
        r.summary
            .contains("pinned copies (selftest): H2D 54.2 GB/s, D2H 55.0 GB/s"),
        "{}",
        r.summary
    );
    // One JSON line per result, named by row and tool.
    let names: Vec<String> = r
        .rows
        .iter()
        .map(|v| {
            format!(
                "{}/{}",
                v["row"].as_str().unwrap(),
                v["tool"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "gpu-1.3b/strata",
            "offload-1.3b/strata",
            "offload-1.3b/torch",
            "offload-6.7b/strata",
            "offload-6.7b/torch",
            "trace-1.3b/strata",
            "torch-1.3b/torch"
        ]
    );
    assert_eq!(r.rows[1]["tier_bytes_per_rank"]["host"], 2);
    // What ran, with which arguments.
    assert!(r.calls.contains("strata selftest --gpu"), "{}", r.calls);
    let fsdp_67 = r
        .calls
        .lines()
        .find(|l| l.contains("torch_fsdp2_ref.py") && l.contains("gpt-6.7b-offload-cpu.toml"))
        .expect("FSDP2 6.7B call");
    assert!(
        fsdp_67.contains("--steps 3 --warmup 1 --time-limit "),
        "{fsdp_67}"
    );
    let strata_13 = r
        .calls
        .lines()
        .find(|l| l.starts_with("strata-bench") && l.contains("gpt-1.3b-offload-cpu.toml"))
        .expect("strata 1.3B offload call");
    assert!(
        strata_13.contains("--steps 5 --warmup 1 --json --time-limit ")
            && strata_13.contains("--profile"),
        "{strata_13}"
    );
    assert!(r.stdout.contains("profile of one step") || !has_python3());
}

fn has_python3() -> bool {
    Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_phase_past_its_time_is_stopped_and_the_rest_skipped_within_the_deadline() {
    let r = run(
        &[
            ("STUB_HANG", "gpt-1.3b-offload-cpu"),
            ("STRATA_GPU_CHECK_DEADLINE_S", "14"),
            ("STRATA_GPU_CHECK_RESERVE_S", "2"),
            ("STRATA_GPU_CHECK_MIN_S", "3"),
        ],
        false,
    );
    assert!(!r.ok, "{}", r.stdout);
    assert!(r.secs < 14.0 + 3.0, "{} s", r.secs);
    assert_eq!(r.status("gpu-1.3b_strata"), "ok", "{}", r.summary);
    assert!(
        r.status("offload-1.3b_strata").starts_with("TIMEOUT ("),
        "{}",
        r.summary
    );
    for phase in [
        "offload-1.3b_torch",
        "offload-6.7b_strata",
        "offload-6.7b_torch",
        "torch-1.3b_torch",
    ] {
        assert_eq!(r.status(phase), "skipped (time)", "{phase}:\n{}", r.summary);
    }
    assert!(r.row("offload-1.3b").contains("no result"), "{}", r.summary);
    assert!(
        r.row("offload-6.7b").contains("skipped (time)"),
        "{}",
        r.summary
    );
    assert_eq!(r.rows.len(), 1, "only gpu-1.3b has a result");
}

#[test]
fn without_torch_the_offload_rows_compare_with_the_reference_figures_and_the_nvme_row_runs() {
    let r = run(
        &[
            ("STUB_NO_TORCH", "1"),
            ("STRATA_OFFLOAD_RATIO_TARGET", "1.4"),
        ],
        true,
    );
    // 178.3 >= 1.4 × 100 and 150 >= 1.4 × 106; 410 >= 300; nothing failed.
    assert!(r.ok, "{}", r.stdout);
    for phase in [
        "offload-1.3b_torch",
        "offload-6.7b_torch",
        "torch-1.3b_torch",
    ] {
        assert_eq!(r.status(phase), "skipped (no torch)", "{}", r.summary);
    }
    assert!(
        r.row("offload-1.3b").contains("PASS (vs ref 100)"),
        "{}",
        r.summary
    );
    assert!(
        r.row("offload-6.7b").contains("PASS (vs ref 106)"),
        "{}",
        r.summary
    );
    let nvme = r.row("nvme-10b");
    for want in [
        "20.0",
        "PASS",
        "1.40 / 1.90",
        "1.2e+10",
        "runs, >= 10B params",
    ] {
        assert!(nvme.contains(want), "{want} in {nvme}");
    }
    // The swap folder is on this machine's disk under the output folder, and removed afterwards.
    let swap = r.out.join("nvme");
    let call = r
        .calls
        .lines()
        .find(|l| l.contains("gpt-10b-h100-nvme.toml"))
        .expect("nvme call");
    for key in ["offload_param", "offload_optimizer"] {
        let want = format!("--set {key}.nvme_path=\"{}\"", swap.display());
        assert!(call.contains(&want), "{want} in {call}");
    }
    assert!(call.contains("--steps 1 --warmup 1"), "{call}");
    assert!(!swap.exists());
    assert!(!r.calls.contains("torch_"), "{}", r.calls);
}
