//! `strata-bench` as a user meets it: a missing `--path` is refused rather than created, a failed run leaves
//! no file behind, an argument that cannot give a figure is refused (no NaN and exit 0), a user's error prints
//! one line without a backtrace, `train` takes its config as `strata train` does, and sizes follow strata's
//! one rule.

use std::process::{Command, Output};

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata-bench"))
}

fn run(command: &mut Command) -> (Output, String) {
    let out = command.output().expect("run strata-bench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn fails(command: &mut Command) -> String {
    let (out, text) = run(command);
    assert_eq!(out.status.code(), Some(1), "{text}");
    text
}

#[test]
fn io_refuses_a_path_that_is_missing_or_not_a_directory_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("mnt/nvme0");
    let text = fails(
        bench()
            .arg("io")
            .arg("--path")
            .arg(&missing)
            .args(["--size", "4MiB"]),
    );
    assert!(
        text.contains(&format!(
            "error: --path {}: does not exist",
            missing.display()
        )),
        "{text}"
    );
    assert!(
        !dir.path().join("mnt").exists(),
        "created {}",
        missing.display()
    );
    let file = dir.path().join("afile");
    std::fs::write(&file, b"x").expect("write");
    let text = fails(
        bench()
            .arg("io")
            .arg("--path")
            .arg(&file)
            .args(["--size", "4MiB"]),
    );
    assert!(text.contains("not a directory"), "{text}");
    assert!(!text.contains("File exists"), "{text}");
    assert_eq!(std::fs::read(&file).expect("read"), b"x");
}

#[test]
fn io_sizes_follow_the_one_rule_and_a_full_disk_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1MB is 10^6 bytes (rounded up to whole 4 KiB blocks), 1M is 2^20.
    for (size, bytes) in [("1MB", 1_003_520), ("1M", 1 << 20)] {
        let (out, text) = run(bench().arg("io").arg("--path").arg(dir.path()).args([
            "--size",
            size,
            "--block-size",
            "256KiB",
            "--queue-depth",
            "4",
            "--buffered",
        ]));
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains(&format!("{bytes} bytes per row")),
            "{size}: {text}"
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        0,
        "swap file left"
    );
    // A 1 MiB tmpfs in a private mount namespace (root and unshare only).
    let full = dir.path().join("full");
    std::fs::create_dir(&full).expect("mkdir");
    let script =
        "mount -t tmpfs -o size=1M tmpfs \"$0\" || exit 77; \"$1\" io --path \"$0\" --size 8MiB \
                  --block-size 1MiB --queue-depth 4 --buffered; echo \"rc=$?\"; ls -A \"$0\"";
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", script])
        .arg(&full)
        .arg(env!("CARGO_BIN_EXE_strata-bench"))
        .output();
    match out {
        Ok(out) if out.status.code() != Some(77) && out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let (rc, left) = text.split_once('\n').unwrap_or((&text, ""));
            assert_eq!(rc, "rc=1", "{text}");
            assert_eq!(left.trim(), "", "left on the full disk: {text}");
        }
        _ => eprintln!("skipped the full-disk case: needs root and unshare -m to mount a tmpfs"),
    }
}

#[test]
fn train_refuses_what_cannot_give_a_figure_and_prints_no_backtrace() {
    for args in [
        &["train", "--steps", "0"][..],
        &["train", "--time-limit", "NaN"],
        &["train", "--peak-tflops=-1"],
        &["adam", "--steps", "0"],
        &["adam", "--params", "0"],
    ] {
        let text = fails(bench().args(args).env("RUST_BACKTRACE", "1"));
        assert!(text.starts_with("error: "), "{args:?}: {text}");
        assert_eq!(text.lines().count(), 1, "{args:?}: {text}");
        assert!(
            !text.contains("NaN tokens") && !text.contains("backtrace"),
            "{args:?}: {text}"
        );
    }
    let text = fails(
        bench()
            .args(["train", "--set", "model.n_layr=1"])
            .env("RUST_BACKTRACE", "1"),
    );
    assert!(
        text.starts_with("error: --set model.n_layr=1: key `model.n_layr`")
            && !text.contains("Stack backtrace"),
        "{text}"
    );
}

#[test]
fn train_takes_its_config_as_strata_train_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("small.toml");
    std::fs::write(
        &config,
        "[model]\nn_layer = 1\nn_embd = 32\nn_head = 2\nseq_len = 16\n[data]\nmicro_batch_size = 2\n",
    )
    .expect("write");
    for flag in [None, Some("--config")] {
        let mut command = bench();
        command.arg("train");
        command.args(flag);
        let (out, text) = run(command
            .arg(&config)
            .args(["--steps", "1", "--warmup", "0", "--json"]));
        assert!(out.status.success(), "{flag:?}: {text}");
        let row: serde_json::Value =
            serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().expect("a line"))
                .expect("JSON");
        assert_eq!(
            (row["n_layer"].as_u64(), row["seq_len"].as_u64()),
            (Some(1), Some(16)),
            "{flag:?}"
        );
        assert_eq!(row["steps_timed"].as_u64(), Some(1));
    }
    let (out, text) = run(bench()
        .arg("train")
        .arg(&config)
        .arg("--config")
        .arg(&config));
    assert!(
        !out.status.success() && text.contains("cannot be used with"),
        "{text}"
    );
}
