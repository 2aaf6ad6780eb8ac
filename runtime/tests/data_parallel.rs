//! Data parallelism across real processes: `strata train --nproc N` (ranks exchanging gradients over shared
//! memory or TCP) must reproduce a single process that accumulates N times as many micro-batches — the same
//! micro-batches, by the loader's rule — step for step.

use std::path::Path;
use std::process::Command;

fn train(dir: &Path, name: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let metrics = dir.join(format!("{name}.jsonl"));
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "train",
            "--steps",
            "12",
            "--set",
            "model.n_layer=2",
            "--set",
            "model.seq_len=32",
        ])
        .args(["--set", "dist.timeout_s=60"])
        .arg("--set")
        .arg(format!("train.metrics_file={}", metrics.display()))
        .args(extra)
        .output()
        .expect("run strata");
    assert!(
        out.status.success(),
        "{name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&metrics)
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn assert_same_run(single: &[serde_json::Value], parallel: &[serde_json::Value], what: &str) {
    assert_eq!(single.len(), parallel.len());
    for (s, p) in single.iter().zip(parallel) {
        for key in ["loss", "grad_norm"] {
            let (a, b) = (
                s[key].as_f64().expect("number"),
                p[key].as_f64().expect("number"),
            );
            let rel = (a - b).abs() / a.abs().max(1e-12);
            assert!(
                rel <= 1e-5,
                "{what}, step {}: {key} {a} (one rank) vs {b} (ranks)",
                s["step"]
            );
        }
        assert_eq!(s["tokens"], p["tokens"], "{what}: tokens per step");
    }
}

#[test]
fn two_ranks_over_shm_match_one_rank_with_double_accumulation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let single = train(dir.path(), "single", &["--set", "data.grad_accum_steps=2"]);
    let parallel = train(
        dir.path(),
        "shm",
        &["--nproc", "2", "--set", "dist.backend=\"shm\""],
    );
    assert_same_run(&single, &parallel, "shm, 2 ranks");
    let first = single[0]["loss"].as_f64().expect("loss");
    let last = single[single.len() - 1]["loss"].as_f64().expect("loss");
    assert!(
        last < first - 0.5,
        "the run should learn: {first} -> {last}"
    );
}

#[test]
fn three_ranks_over_tcp_match_one_rank_with_triple_accumulation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let single = train(dir.path(), "single", &["--set", "data.grad_accum_steps=3"]);
    let parallel = train(
        dir.path(),
        "tcp",
        &["--nproc", "3", "--set", "dist.backend=\"tcp\""],
    );
    assert_same_run(&single, &parallel, "tcp, 3 ranks");
}
