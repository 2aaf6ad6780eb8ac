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

/// The pid of the launcher's child that runs rank `rank` (found through /proc: parent pid and RANK=…).
fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
    let want = format!("RANK={rank}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The parent pid is the second field after the parenthesised command name.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let has_rank = environ.split(|&b| b == 0).any(|var| var == want.as_bytes());
            (ppid == launcher && has_rank).then_some(pid)
        })
}

#[test]
fn a_rank_killed_during_training_stops_the_job_and_is_named() {
    kill_rank_1_during_training(&[]);
}

/// At ZeRO stage 3 every unit is all-gathered before each use, so the kill lands in (or right
/// before) an all-gather.
#[test]
fn a_rank_killed_during_stage_3_all_gathers_stops_the_job_and_is_named() {
    kill_rank_1_during_training(&[
        "--set",
        "zero.stage=3",
        "--set",
        "zero.param_persistence_threshold=0",
    ]);
}

fn kill_rank_1_during_training(extra: &[&str]) {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = dir.path().join("metrics.jsonl");
    // Its own TMPDIR: the swap files of the killed rank go with the test's directory.
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .env("TMPDIR", dir.path())
        .args([
            "train",
            "--nproc",
            "2",
            "--steps",
            "100000",
            "--set",
            "model.n_layer=1",
            "--set",
            "model.seq_len=32",
        ])
        .args([
            "--set",
            "dist.timeout_s=20",
            "--set",
            "dist.backend=\"shm\"",
        ])
        .arg("--set")
        .arg(format!("train.metrics_file={}", metrics.display()))
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start strata");
    // Wait until both ranks are training (rank 0 has written a few steps).
    let start = Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|m| m.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim = rank_pid(child.id(), 1).expect("rank 1's process");
    let survivor = rank_pid(child.id(), 0).expect("rank 0's process");
    // SAFETY: kill(2) on a pid read from /proc that is our launcher's child; no memory is involved.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the job did not stop within 60 s of rank 1 dying");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "the launcher must fail when a rank dies");
    assert!(
        stderr.contains("rank 1"),
        "the error should name rank 1:\n{stderr}"
    );
    println!(
        "stopped {:.1} s after the kill; launcher said:\n{}",
        killed_at.elapsed().as_secs_f64(),
        stderr
            .lines()
            .filter(|l| l.contains("rank 1"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // No rank is left behind.
    assert!(
        !Path::new(&format!("/proc/{survivor}")).exists(),
        "rank 0 (pid {survivor}) was left running"
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
