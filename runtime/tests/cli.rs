//! End-to-end: the `strata` binary trains, learns, writes metrics and weights, and rejects bad input clearly.

use std::path::Path;
use std::process::Command;

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

#[test]
fn default_training_learns_and_writes_metrics_and_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = dir.path().join("metrics.jsonl");
    let weights = dir.path().join("final.safetensors");
    // The embedded default, shortened: 2 layers, 150 steps.
    let out = strata()
        .args([
            "train",
            "--steps",
            "150",
            "--set",
            "model.n_layer=2",
            "--set",
            "train.log_every=50",
        ])
        .arg("--set")
        .arg(format!("train.metrics_file={}", metrics.display()))
        .arg("--set")
        .arg(format!("train.export_to={}", weights.display()))
        .output()
        .expect("run strata");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "strata train failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("done: 150 steps"), "{stdout}");
    assert!(
        stderr.contains("step    50/150"),
        "log lines every 50 steps:\n{stderr}"
    );

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .expect("metrics file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 150);
    for key in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(lines[0].get(key).is_some(), "metrics lack {key}");
    }
    let first = lines[0]["loss"].as_f64().expect("loss");
    let last: f64 = lines[140..]
        .iter()
        .map(|l| l["loss"].as_f64().expect("loss"))
        .sum::<f64>()
        / 10.0;
    // ln(256) = 5.55 at the start; the synthetic set's floor is 0.90 nats.
    assert!((first - 256f64.ln()).abs() < 0.3, "initial loss {first}");
    assert!(last < 2.0, "loss fell only from {first} to {last}");
    assert!(
        weights
            .metadata()
            .map(|m| m.len() > 100_000)
            .unwrap_or(false),
        "exported weights"
    );

    // The exported weights load back and start where training ended.
    let out = strata()
        .args([
            "train",
            "--steps",
            "1",
            "--set",
            "model.n_layer=2",
            "--set",
            "optim.lr=1e-9",
            "--set",
            "optim.min_lr=0",
        ])
        .arg("--set")
        .arg(format!("model.init_from={}", weights.display()))
        .output()
        .expect("run strata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let resumed: f64 = stdout
        .split("loss ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("summary loss");
    assert!(resumed < 2.0, "weights did not load: loss {resumed}");
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = strata().args(args).output().expect("run strata");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    for n in needles {
        assert!(
            stderr.contains(n),
            "{args:?}: error should mention {n:?}:\n{stderr}"
        );
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    fails_with(
        &["train", "--set", "optim.learning_rate=1"],
        &["learning_rate", "expected one of"],
    );
    fails_with(&["train", "no-such-config.toml"], &["no-such-config.toml"]);
    fails_with(
        &["train", "--set", "data.train=/nonexistent/tokens.bin"],
        &["/nonexistent/tokens.bin"],
    );
    fails_with(
        &["train", "--set", "model.n_head=3"],
        &["model.n_embd", "model.n_head"],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not safetensors").expect("write");
    fails_with(
        &[
            "train",
            "--set",
            &format!("model.init_from={}", bad.display()),
        ],
        &["bad.safetensors"],
    );
}

#[test]
fn prepare_then_train_on_a_token_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(400),
    )
    .expect("write");
    let tokens = dir.path().join("train.bin");
    let out = strata()
        .args([
            "prepare",
            text.to_str().expect("path"),
            "-o",
            tokens.to_str().expect("path"),
            "--tokenizer",
            "bytes",
        ])
        .output()
        .expect("run strata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(Path::new(&tokens).exists());
    let out = strata()
        .args([
            "train",
            "--steps",
            "30",
            "--set",
            "model.n_layer=1",
            "--set",
            "model.seq_len=32",
        ])
        .arg("--set")
        .arg(format!("data.train={}", tokens.display()))
        .output()
        .expect("run strata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
