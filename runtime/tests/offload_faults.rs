//! Offload faults against the real binary, real file systems and real limits: a missing or
//! read-only nvme_path, a disk too small (a 4 MiB tmpfs), too little locked memory, a staging
//! buffer smaller than the largest shard — each fails before step 1 naming the setting — and a
//! swap file corrupted or truncated while the run reads it stops the run naming the file and
//! the offset, never with a wrong loss.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A stage-3 run of 8 layers of width 128 with parameters and optimizer states on NVMe in `swap`.
fn command(swap: &Path, metrics: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--steps", &steps.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for set in [
        "model.n_layer=8".to_string(),
        "model.n_embd=128".into(),
        "model.n_head=4".into(),
        "model.vocab_size=512".into(),
        "model.seq_len=16".into(),
        "data.micro_batch_size=2".into(),
        "zero.stage=3".into(),
        "offload_optimizer.sub_group_size=65536".into(),
        "offload_param.device=\"nvme\"".into(),
        "offload_optimizer.device=\"nvme\"".into(),
        format!("offload_param.nvme_path=\"{}\"", swap.display()),
        format!("offload_optimizer.nvme_path=\"{}\"", swap.display()),
        format!("train.metrics_file=\"{}\"", metrics.display()),
        "train.log_every=1".into(),
        "dist.timeout_s=20".into(),
    ] {
        args.push("--set".into());
        args.push(set);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strata() -> &'static str {
    env!("CARGO_BIN_EXE_strata")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs `sh -c script` (with `$STRATA` and the arguments as "$@") in a new mount namespace:
/// as root directly, otherwise as root of a new user namespace.
fn in_mount_namespace(script: &str, args: &[String]) -> Output {
    let mut cmd = Command::new("unshare");
    cmd.arg(if is_root() { "-m" } else { "-rm" });
    cmd.args(["sh", "-c", script, "sh"])
        .args(args)
        .env("STRATA", strata());
    cmd.output().expect("run unshare")
}

/// The run failed before step 1 (no step line, no metrics) and stderr has every needle.
fn assert_refused_before_step_1(out: &Output, metrics: &Path, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded:\n{stderr}");
    assert!(!stderr.contains("step     1/"), "a step ran:\n{stderr}");
    assert!(
        std::fs::read_to_string(metrics).map_or(true, |m| m.is_empty()),
        "metrics were written:\n{stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "{n:?} missing:\n{stderr}");
    }
}

#[test]
fn a_missing_nvme_path_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let swap = dir.path().join("not-mounted");
    let metrics = dir.path().join("m.jsonl");
    let out = Command::new(strata())
        .args(command(&swap, &metrics, 2, &[]))
        .output()
        .expect("run");
    assert_refused_before_step_1(
        &out,
        &metrics,
        &[
            "offload_param.nvme_path and offload_optimizer.nvme_path",
            &format!("{} is not a directory", swap.display()),
        ],
    );
    assert!(!swap.exists(), "the path was created");
}

#[test]
fn a_read_only_nvme_path_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let swap = dir.path().join("ro");
    std::fs::create_dir(&swap).expect("mkdir");
    let metrics = dir.path().join("m.jsonl");
    // A read-only bind mount: EROFS for root as for anyone.
    let script = format!(
        "mount --bind '{p}' '{p}' && mount -o remount,bind,ro '{p}' && exec \"$STRATA\" \"$@\"",
        p = swap.display()
    );
    let out = in_mount_namespace(&script, &command(&swap, &metrics, 2, &[]));
    assert_refused_before_step_1(
        &out,
        &metrics,
        &["offload_param.nvme_path", "Read-only file system"],
    );
}

#[test]
fn a_disk_too_small_is_refused_naming_the_setting_and_the_sizes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let swap = dir.path().join("small");
    std::fs::create_dir(&swap).expect("mkdir");
    let metrics = dir.path().join("m.jsonl");
    let script = format!(
        "mount -t tmpfs -o size=4m tmpfs '{}' && exec \"$STRATA\" \"$@\"",
        swap.display()
    );
    let out = in_mount_namespace(&script, &command(&swap, &metrics, 2, &[]));
    assert_refused_before_step_1(
        &out,
        &metrics,
        &[
            &format!(
                "NVMe: {} has 0.00 GiB free, the plan writes",
                swap.display()
            ),
            "(offload_param.nvme_path and offload_optimizer.nvme_path)",
        ],
    );
}

#[test]
fn too_little_locked_memory_is_refused_naming_pin_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let swap = dir.path().join("swap");
    std::fs::create_dir(&swap).expect("mkdir");
    let metrics = dir.path().join("m.jsonl");
    // 1 MiB of RLIMIT_MEMLOCK, and no CAP_IPC_LOCK to exceed it.
    let out = Command::new("prlimit")
        .args([
            "--memlock=1048576:1048576",
            "setpriv",
            "--bounding-set=-ipc_lock",
            strata(),
        ])
        .args(command(
            &swap,
            &metrics,
            2,
            &["--set", "offload_optimizer.pin_memory=true"],
        ))
        .output()
        .expect("run prlimit");
    assert_refused_before_step_1(
        &out,
        &metrics,
        &[
            "locked memory",
            "RLIMIT_MEMLOCK allows 0.00 GiB",
            "pin_memory",
        ],
    );
}

#[test]
fn a_staging_buffer_smaller_than_a_shard_is_refused_naming_buffer_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let swap = dir.path().join("swap");
    std::fs::create_dir(&swap).expect("mkdir");
    let metrics = dir.path().join("m.jsonl");
    let out = Command::new(strata())
        .args(command(
            &swap,
            &metrics,
            2,
            &["--set", "offload_param.buffer_size=\"64KiB\""],
        ))
        .output()
        .expect("run");
    assert_refused_before_step_1(
        &out,
        &metrics,
        &["offload_param.buffer_size = 64KiB is smaller than the largest parameter sub-group"],
    );
}

/// The swap file of `swap` (parameters or optimizer states) once it exists.
fn swap_file(swap: &Path, which: &str) -> Option<PathBuf> {
    let p = swap.join(format!("strata-{which}.rank0.swap"));
    p.exists().then_some(p)
}

/// Starts a long run, damages the optimizer's swap file once step 1 is in the metrics, and
/// returns the run's output.
fn damage_mid_run(damage: impl FnOnce(&Path)) -> (Output, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let swap = dir.path().join("swap");
    std::fs::create_dir(&swap).expect("mkdir");
    let metrics = dir.path().join("m.jsonl");
    let child = Command::new(strata())
        .args(command(&swap, &metrics, 400, &[]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    let file = loop {
        let stepped = std::fs::read_to_string(&metrics).is_ok_and(|m| m.lines().count() >= 1);
        if let (true, Some(f)) = (stepped, swap_file(&swap, "optim")) {
            break f;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "step 1 never came"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    damage(&file);
    let out = child.wait_with_output().expect("wait");
    let losses = std::fs::read_to_string(&metrics).unwrap_or_default();
    (out, losses)
}

fn assert_stopped_naming_file_and_offset(out: &Output, losses: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{what}: {}", stderr.lines().last().unwrap_or_default());
    assert!(!out.status.success(), "{what}: the run went on:\n{stderr}");
    assert!(
        stderr.contains("strata-optim.rank0.swap") && stderr.contains("at offset"),
        "{what}: file and offset not named:\n{stderr}"
    );
    // Every loss written is a number: nothing computed from damaged states was reported.
    for line in losses.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        assert!(
            v["loss"].as_f64().is_some_and(f64::is_finite),
            "{what}: {line}"
        );
    }
    assert!(
        losses.lines().count() < 400,
        "{what}: all steps ran on a damaged file"
    );
}

#[test]
fn a_swap_file_corrupted_mid_run_stops_the_run_naming_file_and_offset() {
    let (out, losses) = damage_mid_run(|file| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .expect("open swap file");
        // Incompressible bytes over the whole file (every key's blocks).
        let len = f.metadata().expect("metadata").len() as usize;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.write_all_at(&noise, 0).expect("corrupt");
    });
    assert_stopped_naming_file_and_offset(&out, &losses, "corrupted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_swap_file_truncated_mid_run_stops_the_run_naming_file_and_offset() {
    let (out, losses) = damage_mid_run(|file| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .expect("open swap file");
        f.set_len(0).expect("truncate");
    });
    assert_stopped_naming_file_and_offset(&out, &losses, "truncated");
}

/// Issue 27: two runs on one nvme_path — the second is refused before step 1, naming the setting
/// and what to do (not an `aio` key that does not exist).
#[test]
fn a_second_run_on_the_same_nvme_path_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let swap = dir.path().join("swap");
    std::fs::create_dir(&swap).expect("mkdir");
    let (first_metrics, metrics) = (dir.path().join("first.jsonl"), dir.path().join("m.jsonl"));
    let mut first = Command::new(strata())
        .args(command(&swap, &first_metrics, 100_000, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while std::fs::read_to_string(&first_metrics).map_or(true, |m| m.is_empty()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "step 1 never came"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(strata())
        .args(command(&swap, &metrics, 2, &[]))
        .output()
        .expect("run");
    let _ = first.kill();
    let _ = first.wait();
    assert_refused_before_step_1(
        &out,
        &metrics,
        &[
            "offload_param.nvme_path",
            "strata-params.rank0.swap",
            "give each run its own nvme_path directory",
        ],
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("aio.file_name"));
}
