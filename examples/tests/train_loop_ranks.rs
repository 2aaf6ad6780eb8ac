//! The README's training loop (`examples/train_loop.rs`) at 2 ranks equals 1 rank with twice the micro-batch:
//! `Loader::from_config` gives each rank its own micro-batches (the launcher's RANK and WORLD_SIZE), so the
//! two ranks together read the micro-batch of 16 that one rank reads, not the same 8 twice.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Builds the example with the profile this test was built with and returns its path.
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    // target/<profile>/deps/<test>: the example lands in target/<profile>/examples/.
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target/");
    let mut build = Command::new(env!("CARGO"));
    build.args([
        "build",
        "-q",
        "-p",
        "strata-examples",
        "--example",
        "train_loop",
    ]);
    build.arg("--target-dir").arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building examples/train_loop.rs failed");
    profile_dir.join("examples").join("train_loop")
}

fn args(micro: usize) -> Vec<String> {
    vec![
        "train.steps=40".into(),
        format!("data.micro_batch_size={micro}"),
        // Each rank gets one core: the two ranks run at once on a 2-core machine.
        "train.threads=1".into(),
        // The validation loss is over micro-batches of another size at 2 ranks: not compared, kept short.
        "train.eval_batches=1".into(),
    ]
}

fn check(out: &Output, what: &str) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The training losses the example prints, one per 20 steps (after them comes the validation loss).
fn losses(stdout: &str) -> Vec<f64> {
    assert!(stdout.contains("val loss "), "{stdout}");
    let values: Vec<f64> = stdout
        .lines()
        .filter(|l| l.starts_with("step "))
        .filter_map(|l| {
            let after = l.split("loss ").nth(1)?;
            after.split_whitespace().next()?.parse().ok()
        })
        .collect();
    assert_eq!(values.len(), 2, "two step lines in:\n{stdout}");
    values
}

fn alone(exe: &Path, micro: usize) -> Vec<f64> {
    let out = Command::new(exe)
        .args(args(micro))
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .expect("the example starts");
    losses(&check(&out, &format!("1 rank, micro-batch {micro}")))
}

#[test]
fn two_ranks_read_what_one_rank_with_twice_the_micro_batch_reads() {
    let exe = example();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .args(args(8))
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("a rank starts")
        })
        .collect();
    let outputs: Vec<Output> = ranks
        .into_iter()
        .map(|c| c.wait_with_output().expect("a rank ends"))
        .collect();
    let two = losses(&check(&outputs[0], "rank 0 of 2"));
    assert_eq!(two, losses(&check(&outputs[1], "rank 1 of 2")));
    let sixteen = alone(&exe, 16);
    let eight = alone(&exe, 8);
    for (a, b) in two.iter().zip(&sixteen) {
        // The same data in another summation order.
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "2 ranks × 8: {two:?}, 1 rank × 16: {sixteen:?}"
        );
    }
    // Both ranks reading the same 8 sequences would be the 1-rank micro-batch-8 run.
    let apart = two
        .iter()
        .zip(&eight)
        .map(|(a, c)| (a - c).abs())
        .fold(0.0, f64::max);
    assert!(
        apart > 1e-3,
        "2 ranks × 8: {two:?} is the 1-rank micro-batch-8 run {eight:?}"
    );
}
