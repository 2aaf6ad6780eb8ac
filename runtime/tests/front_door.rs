//! What a new user meets first: error messages (an OS error once, with its path; the `--set` that caused an
//! error; a hint to run `strata prepare`), exit codes, the log (one summary line, no colour codes off a
//! terminal, elapsed time and ETA, a warmup warning), step numbers that agree between the log and the metrics,
//! and the validation loss against the library's `Engine::eval_loss`.

use std::path::Path;
use std::process::{Command, Output};
use strata::config::Config;
use strata::data::Loader;
use strata::Engine;

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

fn run(command: &mut Command) -> (Output, String, String) {
    let out = command.output().expect("run strata");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Runs `strata ARGS` expecting failure; returns its stderr after checking exit code 1.
fn fails(args: &[&str]) -> String {
    let (out, _, stderr) = run(strata().args(args));
    assert_eq!(out.status.code(), Some(1), "{args:?} exit code:\n{stderr}");
    stderr
}

/// A model small enough that a run takes a fraction of a second.
const SMALL: [&str; 10] = [
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_embd=32",
    "--set",
    "model.n_head=2",
    "--set",
    "model.seq_len=32",
    "--set",
    "data.micro_batch_size=4",
];

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn a_missing_config_names_its_path_and_the_os_error_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no-such-config.toml");
    let stderr = fails(&["train", path.to_str().expect("utf-8 path")]);
    assert_eq!(
        stderr,
        format!(
            "error: cannot read config: {} does not exist\n",
            path.display()
        )
    );
}

#[test]
fn prepare_creates_directories_and_says_what_failed_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("input.txt");
    std::fs::write(&text, "hello strata. ".repeat(100)).expect("write");

    // Parent directories are created.
    let output = dir.path().join("data/nested/train.bin");
    let (out, stdout, stderr) = run(strata()
        .arg("prepare")
        .arg(&text)
        .arg("-o")
        .arg(&output)
        .args(["--tokenizer", "bytes"]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("wrote 1400 tokens"), "{stdout}");
    let tokens = strata::data::tokens::TokenFile::open(&output, 256).expect("a token file");
    assert_eq!(tokens.len(), 1400);
    assert_eq!(tokens.token(0).expect("token 0"), u32::from(b'h'));

    // A missing input: its path, once.
    let missing = dir.path().join("missing.txt");
    let stderr = fails(&[
        "prepare",
        missing.to_str().expect("utf-8"),
        "-o",
        output.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        stderr,
        format!("error: {} does not exist\n", missing.display())
    );

    // A directory that cannot be made (a file is in the way): which directory, and the OS error once.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "x").expect("write");
    let stderr = fails(&[
        "prepare",
        text.to_str().expect("utf-8"),
        "-o",
        blocker.join("train.bin").to_str().expect("utf-8"),
    ]);
    assert!(
        stderr.starts_with(&format!(
            "error: cannot create directory {}: ",
            blocker.display()
        )),
        "{stderr}"
    );
    assert_eq!(count(&stderr, "(os error"), 1, "{stderr}");
    assert_eq!(
        count(&stderr, &blocker.display().to_string()),
        1,
        "{stderr}"
    );
}

#[test]
fn a_missing_token_file_suggests_strata_prepare() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("train.bin");
    let stderr = fails(&["train", "--set", &format!("data.train={}", path.display())]);
    assert_eq!(
        stderr,
        format!(
            "error: data.train: token file {} does not exist; make it from a text file with \
             `strata prepare TEXT_FILE -o FILE` (or use data.train = \"synthetic\")\n",
            path.display()
        )
    );
    let stderr = fails(&["train", "--set", &format!("data.val={}", path.display())]);
    assert!(
        stderr.starts_with(&format!(
            "error: data.val: token file {} does not exist",
            path.display()
        )),
        "{stderr}"
    );
    assert_eq!(count(&stderr, &path.display().to_string()), 1, "{stderr}");
}

#[test]
fn errors_caused_by_set_name_the_set() {
    // A value of the wrong type.
    let stderr = fails(&["train", "--set", "model.n_layer=twelve"]);
    assert_eq!(
        stderr,
        "error: --set model.n_layer=twelve: key `model.n_layer`: invalid type: string \"twelve\", expected usize\n"
    );
    // An unknown key.
    let stderr = fails(&["train", "--set", "optim.learning_rate=1"]);
    assert!(
        stderr.starts_with("error: --set optim.learning_rate=1: key `optim.learning_rate`: unknown field `learning_rate`, expected one of `lr`"),
        "{stderr}"
    );
    // A cross-field rule broken by the --set, though it is reported on the other key.
    let stderr = fails(&["train", "--set", "model.n_head=3"]);
    assert_eq!(
        stderr,
        "error: --set model.n_head=3: key `model.n_embd`: 128 must be a multiple of model.n_head (3)\n"
    );
    // The last --set of a key is the one in effect and the one named.
    let stderr = fails(&["train", "--set", "optim.lr=1e-3", "--set", "optim.lr=-1"]);
    assert!(stderr.starts_with("error: --set optim.lr=-1: "), "{stderr}");
    // An error in the file is the file's, even with a --set of another key.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[model]\nn_layer = \"twelve\"\n").expect("write");
    let stderr = fails(&[
        "train",
        config.to_str().expect("utf-8"),
        "--set",
        "optim.lr=1e-3",
    ]);
    assert!(
        stderr.starts_with(&format!("error: {}: key `model.n_layer`", config.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("--set"), "{stderr}");
}

#[test]
fn the_log_is_short_plain_and_counts_steps_like_the_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = dir.path().join("metrics.jsonl");
    let (out, stdout, stderr) = run(strata()
        .args(["train", "--steps", "12"])
        .args(SMALL)
        .args([
            "--set",
            "train.log_every=5",
            "--set",
            "optim.warmup_steps=40",
        ])
        .arg("--set")
        .arg(format!("train.metrics_file={}", metrics.display()))
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR"));
    assert!(out.status.success(), "{stderr}");
    // Not a terminal: no colour codes, no progress bar.
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe:\n{stderr}"
    );
    // One summary line at info; the effective config only at debug.
    assert!(
        !stderr.contains("[optim]"),
        "config dump at info:\n{stderr}"
    );
    let summary: Vec<&str> = stderr.lines().filter(|l| l.contains("GPT-2,")).collect();
    assert_eq!(summary.len(), 1, "{stderr}");
    for part in [
        "GPT-2, 0.02M params",
        "cpu, fp32",
        "1 rank",
        "stage 3 (parameters, gradients and optimizer states sharded): parameters on nvme, optimizer states on nvme, gradients on cpu",
    ] {
        assert!(
            summary[0].contains(part),
            "{part:?} missing: {}",
            summary[0]
        );
    }
    // The warmup longer than the run, with both numbers.
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN"))
        .unwrap_or_else(|| panic!("no warning:\n{stderr}"));
    assert!(
        warning.contains("optim.warmup_steps = 40") && warning.contains("train.steps = 12"),
        "{warning}"
    );

    // Log lines at steps 1, 5, 10 and 12, with elapsed time and ETA, numbered as the metrics are.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let steps: Vec<u64> = lines
        .iter()
        .map(|l| l["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<u64>>());
    let logged: Vec<&str> = stderr.lines().filter(|l| l.contains(" | loss ")).collect();
    assert_eq!(logged.len(), 4, "{stderr}");
    for line in logged {
        assert!(line.contains(" elapsed, ETA "), "{line}");
        let step: usize = line
            .split("step ")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no step in {line}"));
        let loss = lines[step - 1]["loss"].as_f64().expect("loss");
        assert!(
            line.contains(&format!("step {step:>5}/12 | loss {loss:.4} |")),
            "log and metrics disagree at step {step} (metrics loss {loss}): {line}"
        );
    }
    assert!(stdout.starts_with("done: 12 steps"), "{stdout}");

    // RUST_LOG=debug shows the effective config.
    let (out, _, stderr) = run(strata()
        .args(["train", "--steps", "1"])
        .args(SMALL)
        .env("RUST_LOG", "debug"));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("effective config") && stderr.contains("[optim]"),
        "{stderr}"
    );
}

#[test]
fn threads_zero_shares_the_cores_among_local_ranks() {
    let (out, _, stderr) = run(strata()
        .args(["train", "--nproc", "2", "--steps", "1"])
        .args(SMALL));
    assert!(out.status.success(), "{stderr}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let expected = strata::threads::share_of_cores(cores, 2, 0);
    let summary = stderr
        .lines()
        .find(|l| l.contains("[rank 0]") && l.contains("GPT-2,"))
        .unwrap_or_else(|| panic!("no summary line from rank 0:\n{stderr}"));
    let threads = if expected == 1 {
        "1 thread |"
    } else {
        &format!("{expected} threads |")
    };
    assert!(
        summary.contains(&format!("cpu, fp32, {threads}")) && summary.contains("2 ranks over shm"),
        "expected {expected} threads for 2 ranks on {cores} cores: {summary}"
    );
}

/// Trains with `data.val` and returns (metrics lines, stdout).
fn train_with_validation(extra: &[&str], metrics: &Path) -> (Vec<serde_json::Value>, String) {
    let (out, stdout, stderr) = run(strata()
        .args(["train", "--steps", "10"])
        .args(SMALL)
        .args([
            "--set",
            "data.val=synthetic",
            "--set",
            "train.eval_every=4",
            "--set",
            "train.eval_batches=3",
        ])
        .arg("--set")
        .arg(format!("train.metrics_file={}", metrics.display()))
        .args(extra));
    assert!(out.status.success(), "{stderr}");
    let lines = std::fs::read_to_string(metrics)
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    (lines, stdout)
}

#[test]
fn validation_loss_matches_the_library_and_is_averaged_over_ranks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("final.safetensors");
    let metrics = dir.path().join("one-rank.jsonl");
    let export = format!("train.export_to={}", weights.display());
    let (lines, stdout) = train_with_validation(
        &["--set", "data.grad_accum_steps=2", "--set", &export],
        &metrics,
    );
    // val_loss on steps 4, 8 and the last (10), nowhere else.
    let with_val: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("val_loss").is_some())
        .map(|l| l["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(with_val, [4, 8, 10]);
    let val = |l: &serde_json::Value| l["val_loss"].as_f64().expect("val_loss");
    let last = val(&lines[9]);
    assert!(stdout.contains(&format!("val loss {last:.4}")), "{stdout}");
    assert!(
        val(&lines[3]) > last,
        "validation loss did not fall: {lines:?}"
    );

    // The library on the exported weights and the same three held-out micro-batches.
    let overrides: Vec<String> = SMALL
        .chunks(2)
        .map(|pair| pair[1].to_string())
        .chain([
            "data.val=synthetic".to_string(),
            "data.grad_accum_steps=2".to_string(),
            format!("model.init_from={}", weights.display()),
        ])
        .collect();
    let config = Config::load(None, &overrides).expect("config");
    let mut engine = Engine::from_config(config.clone()).expect("engine");
    let mut loader = Loader::val_from_config(&config)
        .expect("val loader")
        .expect("data.val is set");
    let mut batch = engine.new_batch();
    let mut sum = 0.0f64;
    for _ in 0..3 {
        loader.fill(&mut batch).expect("batch");
        sum += f64::from(engine.eval_loss(&batch).expect("eval_loss"));
    }
    let library = sum / 3.0;
    assert!(
        (library - last).abs() < 1e-5 * library.abs().max(1.0),
        "CLI val_loss {last} vs Engine::eval_loss {library}"
    );
    // Held out: the training stream's first micro-batch is not the validation set's.
    let mut train_batch = engine.new_batch();
    Loader::from_config(&config)
        .expect("train loader")
        .fill(&mut train_batch)
        .expect("batch");
    let mut val_batch = engine.new_batch();
    Loader::val_from_config(&config)
        .expect("val loader")
        .expect("set")
        .fill(&mut val_batch)
        .expect("batch");
    assert_ne!(train_batch.inputs, val_batch.inputs);

    // Two ranks with one micro-batch each train as one rank with two; the three validation micro-batches are
    // split 2 + 1 between them and averaged over all three.
    let metrics2 = dir.path().join("two-ranks.jsonl");
    let (lines2, _) = train_with_validation(&["--nproc", "2"], &metrics2);
    for step in [3, 7, 9] {
        let (one, two) = (val(&lines[step]), val(&lines2[step]));
        assert!(
            (one - two).abs() < 1e-4,
            "step {}: val_loss {one} on one rank, {two} on two",
            step + 1
        );
    }
}
