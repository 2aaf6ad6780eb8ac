//! Issue 16: nothing a user gives strata is destroyed. Each test runs the real binary on real files and
//! processes and checks the exit code, the message, that every input is byte-for-byte as it was, and that
//! no temporary or lock file is left.

mod faults;

use faults::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn outputs_that_are_inputs_are_refused_before_step_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (tokens, init, config) = (
        d.join("train.bin"),
        d.join("init.safetensors"),
        d.join("run.toml"),
    );
    write_tokens(&tokens, 4096);
    export_tiny_weights(&init);
    std::fs::write(&config, "[train]\nsteps = 3\n").expect("config");
    std::fs::create_dir(d.join("sub")).expect("sub");
    std::os::unix::fs::symlink(&init, d.join("link.safetensors")).expect("symlink");
    let inputs = Snapshot::of(&[&tokens, &init, &config]);
    let cases = [
        ("train.metrics_file", tokens.clone(), "data.train"),
        ("train.export_to", tokens.clone(), "data.train"),
        ("train.metrics_file", init.clone(), "model.init_from"),
        (
            "train.export_to",
            d.join("link.safetensors"),
            "model.init_from",
        ),
        (
            "train.metrics_file",
            d.join("sub/../run.toml"),
            "the config file",
        ),
    ];
    for (key, path, input_key) in cases {
        let mut c = train(&[config.to_str().expect("utf-8")]);
        c.args(set("data.train", &tokens))
            .args(set("model.init_from", &init))
            .args(set(key, &path));
        let ran = run(c, LIMIT);
        let expected = format!("{key} = {} is the input {input_key}", path.display());
        assert_refused(&ran, &[&expected, "strata never writes its inputs"]);
        assert_no_step(&ran);
        inputs.assert_unchanged();
        assert_no_leftovers(d);
        assert_no_leftovers(&d.join("sub"));
    }
}

#[test]
fn prepare_refuses_to_write_over_its_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("in.txt");
    std::fs::write(&text, "hello strata ".repeat(100)).expect("text");
    let inputs = Snapshot::of(&[&text]);
    let mut c = std::process::Command::new(STRATA);
    c.args(["prepare", "--tokenizer", "bytes", "-o"])
        .arg(&text)
        .arg(&text);
    let ran = run(c, LIMIT);
    assert_refused(&ran, &["is the input", "strata never writes its inputs"]);
    inputs.assert_unchanged();
    assert_no_leftovers(dir.path());
}

#[test]
fn an_export_path_that_is_a_device_directory_or_missing_directory_is_refused_before_step_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no/such/dir/w.safetensors");
    // As root, a private device node: a strata that wrongly renamed over it must not replace /dev/null.
    let devices = tempfile::tempdir().expect("tempdir");
    let device = char_device(devices.path());
    let cases = [
        (
            device.clone(),
            "is a character device; an output must be a regular file or absent",
        ),
        (dir.path().to_path_buf(), "is a directory"),
        (missing, "/no/such/dir does not exist"),
    ];
    for (path, needle) in cases {
        let mut c = train(&["--steps", "2"]);
        c.args(set("train.export_to", &path));
        let ran = run(c, LIMIT);
        assert_refused(&ran, &["train.export_to", needle]);
        assert_no_step(&ran);
    }
    assert!(std::fs::metadata(&device).is_ok_and(|m| !m.is_file()));
    assert_no_leftovers(dir.path());
}

#[test]
fn an_export_through_a_symlink_replaces_the_target_and_keeps_the_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (real, link) = (
        dir.path().join("real.safetensors"),
        dir.path().join("link.safetensors"),
    );
    std::fs::write(&real, b"old").expect("write");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let mut c = train(&["--steps", "1"]);
    c.args(set("train.export_to", &link));
    let ran = run(c, LIMIT);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    assert!(std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()));
    assert!(std::fs::metadata(&real).is_ok_and(|m| m.len() > 10_000));
    assert_no_leftovers(dir.path());
}

#[test]
fn a_full_disk_under_export_to_is_found_before_step_1() {
    if !can_mount_tmpfs() {
        eprintln!("skipped: cannot mount a tmpfs in a private mount namespace here (needs root and unshare)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let script = "\"$1\" train --steps 2 --set train.export_to=\"$0/w.safetensors\"; rc=$?; ls -A \"$0\"; exit $rc";
    let ran = run(
        in_small_tmpfs(&dir.path().join("mnt"), "64k", script, &[]),
        LIMIT,
    );
    assert_refused(
        &ran,
        &[
            "train.export_to",
            "bytes free, but",
            "fp32 parameters and the safetensors header",
        ],
    );
    assert_no_step(&ran);
    assert_eq!(ran.stdout.trim(), "", "left in the tmpfs: {}", ran.stdout);
}

#[test]
fn a_full_disk_under_metrics_mid_run_still_exports_the_weights_and_says_where() {
    if !can_mount_tmpfs() {
        eprintln!("skipped: cannot mount a tmpfs in a private mount namespace here (needs root and unshare)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("w.safetensors");
    // 700 steps × 256 B fit the 256 KiB tmpfs at the start; a filler takes the rest after the first line.
    let script = r#"m="$0/metrics.jsonl"
"$@" --steps 700 --set train.metrics_file="$m" & pid=$!
i=0; while [ ! -s "$m" ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done
dd if=/dev/zero of="$0/filler" bs=4k 2>/dev/null
wait $pid; rc=$?
rm -f "$0/filler"; tail -c 1 "$m" | od -An -c; ls -A "$0"; exit $rc"#;
    let mut args: Vec<String> = vec!["train".into()];
    args.extend(TINY.iter().map(|s| s.to_string()));
    args.extend(set("train.export_to", &weights));
    let ran = run(
        in_small_tmpfs(&dir.path().join("mnt"), "256k", script, &args),
        LIMIT,
    );
    assert_refused(
        &ran,
        &[
            "train.metrics_file",
            "No space left on device",
            "training stopped after step",
            &format!("were exported to {}", weights.display()),
        ],
    );
    // The metrics file ends with a whole line, and the tmpfs holds nothing else of strata's.
    assert_eq!(
        ran.stdout.split_whitespace().collect::<Vec<_>>(),
        ["\\n", "metrics.jsonl"],
        "{}",
        ran.stdout
    );
    let bytes = std::fs::read(&weights).expect("exported weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a whole safetensors file");
    assert!(st
        .names()
        .iter()
        .any(|n| n.as_str() == "transformer.wte.weight"));
    assert_no_leftovers(dir.path());
}

#[test]
fn ranks_started_with_different_configs_are_refused_naming_keys_and_ranks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("w.safetensors");
    let mut c = std::process::Command::new(STRATA);
    c.args(["launch", "--nproc-per-node", "2", "--grace-s", "2", "--", "sh", "-c"])
        .arg(r#"exec "$0" train "$@" --set optim.lr=0.00$((RANK + 1)) --set model.n_layer=$((RANK + 1))"#)
        .arg(STRATA)
        .args(TINY)
        .args(["--steps", "3", "--set", "dist.timeout_s=30"])
        .args(set("train.export_to", &weights));
    let ran = run(c, LIMIT);
    assert_ne!(ran.code, Some(0), "{}", ran.stderr);
    for rank in 0..2 {
        let line = ran
            .stderr
            .lines()
            .find(|l| l.starts_with(&format!("[rank {rank}] error:")))
            .unwrap_or_else(|| panic!("rank {rank} printed no error:\n{}", ran.stderr));
        assert!(
            line.contains("the ranks were started with different configs")
                && line.contains("model.n_layer = 1 on rank 0 vs 2 on rank 1")
                && line.contains("optim.lr = 0.001 on rank 0 vs 0.002 on rank 1"),
            "{line}"
        );
    }
    assert!(
        !weights.exists(),
        "rank 0 exported weights of a refused run"
    );
    assert_no_leftovers(dir.path());
}

#[test]
fn a_second_run_on_the_same_outputs_fails_at_once_naming_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (metrics, weights) = (dir.path().join("m.jsonl"), dir.path().join("w.safetensors"));
    let mut first = train(&["--steps", "1000000"]);
    first
        .args(set("train.metrics_file", &metrics))
        .args(set("train.export_to", &weights));
    let first = start(first);
    assert!(
        wait_until(LIMIT, || metrics.metadata().is_ok_and(|m| m.len() > 0)),
        "the first run wrote no metrics:\n{}",
        first.stderr_so_far()
    );
    for (key, path) in [
        ("train.metrics_file", &metrics),
        ("train.export_to", &weights),
    ] {
        let mut second = train(&["--steps", "2"]);
        second.args(set(key, path));
        let ran = run(second, LIMIT);
        let holder = format!(
            "{key} = {} is in use by process {} (",
            path.display(),
            first.pid()
        );
        assert_refused(&ran, &[&holder, ".strata-lock"]);
        assert!(ran.elapsed < Duration::from_secs(20), "{:?}", ran.elapsed);
    }
    let lines = std::fs::read_to_string(&metrics)
        .expect("metrics")
        .lines()
        .count();
    // SIGTERM ends the first run as the signal's default action would, and takes its lock files along.
    let ended = first.stop();
    assert_eq!(ended.signal, Some(libc::SIGTERM), "{}", ended.stderr);
    assert!(lines >= 1);
    assert!(!weights.exists());
    assert_no_leftovers(dir.path());
}

#[test]
fn sizes_and_counts_beyond_their_max_name_the_key_at_once() {
    let cases: [(&[&str], &[&str]); 6] = [
        (
            &["--set", "model.n_embd=1000000000"],
            &["model.n_embd", "exceeds the maximum 65536"],
        ),
        (
            &["--set", "model.n_layer=100000"],
            &["model.n_layer", "exceeds the maximum 1024"],
        ),
        (
            &[
                "--set",
                "model.n_layer=1000",
                "--set",
                "model.n_embd=8192",
                "--set",
                "model.n_head=64",
                // Unpartitioned, all on the device (partitioned runs are checked by their plan).
                "--set",
                "zero.stage=0",
                "--set",
                "offload_param.device=\"none\"",
                "--set",
                "offload_optimizer.device=\"none\"",
            ],
            &["model.n_layer", "GiB of host memory", "(MemTotal)"],
        ),
        (
            &["--set", "train.threads=100000"],
            &["train.threads", "per core"],
        ),
        (
            &["--nproc", "100000"],
            &["--nproc 100000 must lie between 1 and 256"],
        ),
        (&["--nproc", "0"], &["--nproc 0 must lie between 1 and 256"]),
    ];
    for (args, needles) in cases {
        let ran = run(train(args), LIMIT);
        assert_refused(&ran, needles);
        assert!(
            ran.elapsed < Duration::from_secs(10),
            "{args:?} took {:?}",
            ran.elapsed
        );
    }
    let mut c = std::process::Command::new(STRATA);
    c.args(["train", "/dev/zero"]);
    let ran = run(c, LIMIT);
    assert_refused(
        &ran,
        &["/dev/zero is a character device, not a regular file"],
    );
}

#[test]
fn fifos_and_directories_as_inputs_are_refused_by_type_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let fifo_text = format!(
        "{} is a FIFO (named pipe), not a regular file",
        fifo.display()
    );
    let dir_text = format!(
        "{} is a directory, not a regular file",
        dir.path().display()
    );
    let mut runs = vec![
        (train(&[fifo.to_str().expect("utf-8")]), &fifo_text),
        (train(&[]), &fifo_text),
        (train(&[]), &fifo_text),
        (train(&[]), &dir_text),
    ];
    runs[1].0.args(set("data.train", &fifo));
    runs[2].0.args(set("model.init_from", &fifo));
    runs[3].0.args(set("data.train", dir.path()));
    let mut prepare = std::process::Command::new(STRATA);
    prepare
        .arg("prepare")
        .arg(&fifo)
        .arg("-o")
        .arg(dir.path().join("out.bin"));
    runs.push((prepare, &fifo_text));
    for (command, needle) in runs {
        let ran = run(command, Duration::from_secs(20));
        assert_refused(&ran, &[needle]);
    }
    assert_no_leftovers(dir.path());
    assert!(!dir.path().join("out.bin").exists());
}

#[test]
fn a_token_file_truncated_under_a_running_job_is_an_error_with_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tokens, metrics) = (dir.path().join("train.bin"), dir.path().join("m.jsonl"));
    write_tokens(&tokens, 200_000);
    let mut c = train(&["--steps", "1000000"]);
    c.args(set("data.train", &tokens))
        .args(set("train.metrics_file", &metrics));
    let running = start(c);
    assert!(
        wait_until(LIMIT, || metrics.metadata().is_ok_and(|m| m.len() > 0)),
        "no step ran:\n{}",
        running.stderr_so_far()
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tokens)
        .and_then(|f| f.set_len(1024 + 64))
        .expect("truncate");
    let ran = running.wait(LIMIT);
    assert_refused(
        &ran,
        &[
            &tokens.display().to_string(),
            "bytes at byte offset",
            "the file is now 1088 bytes long, but its header says 200000 tokens (401024 bytes)",
            "truncated or replaced while in use",
        ],
    );
    assert_no_leftovers(dir.path());
}

/// The byte offset of element `index` of tensor `name` in a safetensors file.
fn element_offset(bytes: &[u8], name: &str, index: usize) -> usize {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let start = header[name]["data_offsets"][0].as_u64().expect("offsets") as usize;
    8 + n + start + 4 * index
}

#[test]
fn weight_file_faults_are_named_with_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (huge, short, nan) = (
        dir.path().join("huge.safetensors"),
        dir.path().join("short.safetensors"),
        dir.path().join("nan.safetensors"),
    );
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}{}{}{}");
    std::fs::write(&huge, &bytes).expect("write");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\":1}     ");
    std::fs::write(&short, &bytes).expect("write");
    export_tiny_weights(&nan);
    let mut bytes = std::fs::read(&nan).expect("read");
    let at = element_offset(&bytes, "transformer.h.0.ln_1.weight", 3);
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&nan, &bytes).expect("write");
    let inputs = Snapshot::of(&[&huge, &short, &nan]);
    let cases = [
        (
            &huge,
            "header length 1099511627776 bytes, file length 16 bytes".to_string(),
        ),
        (
            &short,
            "does not fit in the file (header length 1000 bytes, file length 20 bytes)".into(),
        ),
        (
            &nan,
            "tensor `transformer.h.0.ln_1.weight` holds NaN at index 3".into(),
        ),
    ];
    for (path, needle) in cases {
        let mut c = train(&["--steps", "1"]);
        c.args(set("model.init_from", path));
        let ran = run(c, LIMIT);
        assert_refused(&ran, &[&path.display().to_string(), &needle]);
        assert_no_step(&ran);
    }
    inputs.assert_unchanged();
    assert_no_leftovers(dir.path());
}
