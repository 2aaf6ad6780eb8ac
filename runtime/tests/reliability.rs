//! Issue 16: nothing a user gives strata is destroyed. Each test runs the real binary on real files and
//! processes and checks the exit code, the message, that every input is byte-for-byte as it was, and that
//! no temporary or lock file is left.

mod faults;

use faults::*;
use std::path::{Path, PathBuf};
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
    // A directory named like a weights file (any other directory is a model directory to export into).
    let named_file = dir.path().join("d.safetensors");
    std::fs::create_dir(&named_file).expect("mkdir");
    let cases = [
        (
            device.clone(),
            "is a character device; an output must be a regular file or absent",
        ),
        (named_file, "is a directory"),
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

// Issue 27: a second sweep. Each test below fails on the code before its fix.

/// `strata train` on the tiny model, resolving `args` in `dir` and with `dir` as its `TMPDIR`.
fn train_in(dir: &Path, args: &[&str]) -> std::process::Command {
    let mut c = train(args);
    c.current_dir(dir);
    in_tmpdir(&mut c, dir);
    c
}

#[test]
fn a_trace_file_is_an_output_checked_before_step_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (tokens, init, config, ds) = (
        d.join("train.bin"),
        d.join("init.safetensors"),
        d.join("run.toml"),
        d.join("ds.json"),
    );
    write_tokens(&tokens, 4096);
    export_tiny_weights(&init);
    std::fs::write(&config, "[train]\nsteps = 3\n").expect("config");
    std::fs::write(&ds, r#"{"train_micro_batch_size_per_gpu": 2}"#).expect("ds");
    // A checkpoint to resume from: its rank file is an input of the resumed run.
    let ck = d.join("ck");
    let mut c = train_in(d, &["--steps", "1"]);
    c.args(set("train.checkpoint_dir", &ck));
    let ran = run(c, LIMIT);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let step1 = ck.join("step-00000001");
    let rank0 = step1.join("rank0.bin");
    let metrics = d.join("m.jsonl");
    let inputs = Snapshot::of(&[&tokens, &init, &config, &ds, &rank0]);
    let config_s = config.display().to_string();
    let cases: Vec<(Vec<String>, PathBuf, String)> = vec![
        (
            vec![config_s.clone()],
            config.clone(),
            format!("is the input the config file = {config_s}"),
        ),
        (
            set("data.train", &tokens).to_vec(),
            tokens.clone(),
            "is the input data.train".into(),
        ),
        (
            set("model.init_from", &init).to_vec(),
            init.clone(),
            "is the input model.init_from".into(),
        ),
        (
            vec!["--deepspeed".into(), ds.display().to_string()],
            ds.clone(),
            "is the input --deepspeed".into(),
        ),
        (
            set("train.metrics_file", &metrics).to_vec(),
            metrics.clone(),
            "train.metrics_file".into(),
        ),
        (
            set("train.export_to", &init).to_vec(),
            d.join("sub/../init.safetensors"),
            "train.export_to".into(),
        ),
        (
            [
                set("train.checkpoint_dir", &d.join("ck2")).to_vec(),
                vec!["--resume".into(), step1.display().to_string()],
            ]
            .concat(),
            rank0.clone(),
            format!("lies inside the input train.resume = {}", step1.display()),
        ),
        (
            set("train.checkpoint_dir", &ck).to_vec(),
            rank0.clone(),
            "lies inside the checkpoint".into(),
        ),
    ];
    std::fs::create_dir(d.join("sub")).expect("sub");
    for (args, trace, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = train_in(d, &args);
        c.arg("--trace").arg(&trace);
        let ran = run(c, LIMIT);
        assert_refused(&ran, &[&format!("{}", trace.display()), "--trace", &needle]);
        assert_no_step(&ran);
        inputs.assert_unchanged();
        assert!(!metrics.exists(), "{}", ran.stderr);
        assert_no_leftovers(d);
    }
    // With two ranks, rank 1's file (m.rank1.json) is kept apart from the other outputs too.
    let mut c = train_in(d, &["--nproc", "2", "--steps", "2"]);
    c.args(set("train.metrics_file", &d.join("m.rank1.json")))
        .arg("--trace")
        .arg(d.join("m.json"));
    let ran = run(c, LIMIT);
    assert_ne!(ran.code, Some(0), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("--trace (rank 1's file)") && ran.stderr.contains("same file"),
        "{}",
        ran.stderr
    );
    assert!(
        names_starting(d, "m.").is_empty(),
        "{:?}",
        names_starting(d, "m.")
    );
    assert_no_leftovers(d);
}

#[test]
fn a_failed_run_leaves_the_previous_trace_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (trace, nan) = (d.join("t.json"), d.join("nan.safetensors"));
    std::fs::write(&trace, "the previous trace").expect("write");
    export_tiny_weights(&nan);
    let mut bytes = std::fs::read(&nan).expect("read");
    let at = element_offset(&bytes, "transformer.h.0.ln_1.weight", 0);
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&nan, &bytes).expect("write");
    // The weights are read after the trace is opened: the run fails with the trace under way.
    let mut c = train_in(d, &["--steps", "2"]);
    c.args(set("model.init_from", &nan))
        .arg("--trace")
        .arg(&trace);
    let ran = run(c, LIMIT);
    assert_refused(&ran, &["holds NaN"]);
    assert_eq!(
        std::fs::read_to_string(&trace).ok().as_deref(),
        Some("the previous trace")
    );
    assert_no_leftovers(d);
    // The trace's directory is made for it, and removed again when the run fails.
    let mut c = train_in(d, &["--steps", "2"]);
    c.args(set("model.init_from", &nan))
        .arg("--trace")
        .arg(d.join("new/dir/t.json"));
    let ran = run(c, LIMIT);
    assert_refused(&ran, &["holds NaN"]);
    assert!(!d.join("new").exists(), "{}", ran.stderr);
    // A run that ends writes it.
    let mut c = train_in(d, &["--steps", "1"]);
    c.arg("--trace").arg(&trace);
    let ran = run(c, LIMIT);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trace).expect("trace")).expect("JSON");
    assert!(json["traceEvents"]
        .as_array()
        .is_some_and(|e| !e.is_empty()));
    assert_no_leftovers(d);
}

#[test]
fn a_second_run_on_the_same_checkpoint_dir_fails_at_once_naming_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (ck, metrics) = (d.join("ck"), d.join("m.jsonl"));
    std::fs::create_dir(d.join("sub")).expect("sub");
    let mut first = train_in(d, &["--steps", "1000000"]);
    first
        .args(set("train.checkpoint_dir", &ck))
        .args(set("train.metrics_file", &metrics));
    let first = start(first);
    assert!(
        wait_until(LIMIT, || metrics.metadata().is_ok_and(|m| m.len() > 0)),
        "the first run wrote no metrics:\n{}",
        first.stderr_so_far()
    );
    for nproc in ["1", "2"] {
        let mut second = train_in(d, &["--nproc", nproc, "--steps", "2"]);
        second.args(set("train.checkpoint_dir", &d.join("sub/../ck")));
        let ran = run(second, LIMIT);
        assert_ne!(ran.code, Some(0), "{}", ran.stderr);
        assert!(
            ran.stderr
                .contains(&format!("is in use by process {} (", first.pid()))
                && ran.stderr.contains("train.checkpoint_dir"),
            "{}",
            ran.stderr
        );
        assert_no_step(&ran);
    }
    // SIGTERM: the first run saves, and only its checkpoint is there.
    let ended = first.stop();
    assert_eq!(ended.code, Some(128 + libc::SIGTERM), "{}", ended.stderr);
    let saved = names_starting(&ck, "step-");
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_no_leftovers(&ck);
}

#[test]
fn a_checkpoint_dir_that_cannot_be_written_is_refused_before_step_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let afile = d.join("afile");
    std::fs::write(&afile, "a file").expect("write");
    let cases = [
        (
            afile.clone(),
            "is a regular file; it must be a directory".to_string(),
        ),
        (
            afile.join("ck"),
            format!("{} is a regular file", afile.display()),
        ),
    ];
    for (ck, needle) in cases {
        let mut c = train_in(d, &["--steps", "3"]);
        c.args(set("train.checkpoint_dir", &ck));
        let ran = run(c, LIMIT);
        assert_refused(&ran, &["train.checkpoint_dir", &needle]);
        assert_no_step(&ran);
    }
    assert_eq!(
        std::fs::read_to_string(&afile).ok().as_deref(),
        Some("a file")
    );
    // A directory made for the run is removed again when the run fails before saving (here: its
    // token file is missing, which is found after the outputs are checked).
    let mut c = train_in(d, &["--steps", "3"]);
    c.args(set("train.checkpoint_dir", &d.join("new/ck")))
        .args(set("data.train", &d.join("missing.bin")));
    let ran = run(c, LIMIT);
    assert_refused(&ran, &["missing.bin does not exist"]);
    assert!(!d.join("new").exists(), "{}", ran.stderr);
    assert_no_leftovers(d);
    // A read-only file system (root writes anywhere else).
    if !can_mount_tmpfs() {
        eprintln!("skipped the read-only case: cannot mount a tmpfs here (needs root and unshare)");
        return;
    }
    let script = r#"mount -o remount,ro "$0" || exit 99
"$@"; rc=$?; ls -A "$0"; exit $rc"#;
    let mut args: Vec<String> = vec!["train".into(), "--steps".into(), "3".into()];
    args.extend(TINY.iter().map(|s| s.to_string()));
    args.extend(set("train.checkpoint_dir", &d.join("mnt/ck")));
    let ran = run(in_small_tmpfs(&d.join("mnt"), "8m", script, &args), LIMIT);
    assert_refused(&ran, &["train.checkpoint_dir", "Read-only file system"]);
    assert_no_step(&ran);
    assert_eq!(
        ran.stdout.trim(),
        "",
        "left on the file system: {}",
        ran.stdout
    );
}

#[test]
fn one_tensor_under_two_names_or_a_shape_beyond_its_bytes_is_refused_naming_the_tensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let init = d.join("init.safetensors");
    export_tiny_weights(&init);
    let bytes = std::fs::read(&init).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("export");
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, t.shape().to_vec(), v)
        })
        .collect();
    let (_, shape, values) = tensors
        .iter()
        .find(|t| t.0 == "transformer.h.0.attn.c_attn.weight")
        .cloned()
        .expect("c_attn");
    tensors.push((
        "h.0.attn.c_attn.weight".into(),
        shape,
        values.iter().map(|v| v + 1.0).collect(),
    ));
    let twice = d.join("twice.safetensors");
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    std::fs::write(&twice, safetensors_bytes(&refs)).expect("write");
    let (short, overflow) = (d.join("short.safetensors"), d.join("overflow.safetensors"));
    std::fs::write(
        &short,
        safetensors_with_header(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,16]}}"#, 16),
    )
    .expect("write");
    std::fs::write(
        &overflow,
        safetensors_with_header(
            r#"{"big":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
            8,
        ),
    )
    .expect("write");
    let inputs = Snapshot::of(&[&twice, &short, &overflow]);
    let cases = [
        (&twice, "tensors `h.0.attn.c_attn.weight` and `transformer.h.0.attn.c_attn.weight` are one parameter"),
        (&short, "tensor `b`: shape [2, 2] of F32 is 16 bytes, but its data offsets [8, 16] hold 8"),
        (&overflow, "tensor `big`: shape [4294967296, 4294967296] of F32 has more bytes than can be counted"),
    ];
    // The same answer every time (the file's tensors are visited in a fixed order).
    for _ in 0..3 {
        for (path, needle) in &cases {
            let mut c = train_in(d, &["--steps", "1"]);
            c.args(set("model.init_from", path));
            let ran = run(c, LIMIT);
            assert_refused(&ran, &[&path.display().to_string(), needle]);
            assert_no_step(&ran);
        }
    }
    inputs.assert_unchanged();
}

#[test]
fn scratch_directories_of_killed_runs_are_removed_by_the_next_run_or_doctor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // The embedded default keeps each rank's swap files in a fresh directory under $TMPDIR.
    let launcher = |metrics: &Path| {
        let mut c = std::process::Command::new(STRATA);
        c.args(["train", "--nproc", "2", "--steps", "1000000"])
            .args(set("train.metrics_file", metrics));
        in_tmpdir(&mut c, d);
        start(c)
    };
    let stepped = |m: &Path| wait_until(LIMIT, || m.metadata().is_ok_and(|m| m.len() > 0));
    // A live run, whose directories must stay, and a run whose launcher is SIGKILLed: its ranks
    // die with it (PDEATHSIG), and nothing of theirs runs a destructor or a signal handler.
    let (live_metrics, killed_metrics) = (d.join("live.jsonl"), d.join("killed.jsonl"));
    let live = launcher(&live_metrics);
    assert!(stepped(&live_metrics), "{}", live.stderr_so_far());
    let live_dirs = names_starting(d, "strata-");
    assert_eq!(live_dirs.len(), 3, "{live_dirs:?}");
    let killed = launcher(&killed_metrics);
    assert!(stepped(&killed_metrics), "{}", killed.stderr_so_far());
    let pid = killed.pid();
    let ranks: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("the launcher's children")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    // SAFETY: kill(2) on our own child; no memory is involved.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(killed.wait(LIMIT).signal, Some(libc::SIGKILL));
    let ranks_gone = || {
        ranks
            .iter()
            .all(|r| !Path::new(&format!("/proc/{r}")).exists())
    };
    assert!(
        wait_until(LIMIT, ranks_gone),
        "the killed run's ranks live on"
    );
    let stale: Vec<String> = names_starting(d, "strata-")
        .into_iter()
        .filter(|n| !live_dirs.contains(n))
        .collect();
    assert_eq!(stale.len(), 3, "{stale:?}");
    let mut doctor = std::process::Command::new(STRATA);
    doctor.arg("doctor");
    in_tmpdir(&mut doctor, d);
    let ran = run(doctor, LIMIT);
    assert!(
        ran.stdout
            .contains("removed 3 directories left by ended strata processes"),
        "{}",
        ran.stdout
    );
    for name in &stale {
        assert!(ran.stdout.contains(name.as_str()), "{name}: {}", ran.stdout);
    }
    assert_eq!(names_starting(d, "strata-"), live_dirs);
    // SIGTERM to the live launcher: it stops its ranks, whose signal handlers remove their files.
    let ended = live.stop();
    assert_eq!(ended.code, Some(128 + libc::SIGTERM), "{}", ended.stderr);
    assert!(
        names_starting(d, "strata-").is_empty(),
        "{:?}",
        names_starting(d, "strata-")
    );
    // A run removes them too: one rank SIGKILLed mid-run, then another run.
    let metrics = d.join("single.jsonl");
    let mut single = std::process::Command::new(STRATA);
    single
        .args(["train", "--steps", "1000000"])
        .args(set("train.metrics_file", &metrics));
    in_tmpdir(&mut single, d);
    let single = start(single);
    assert!(stepped(&metrics), "{}", single.stderr_so_far());
    drop(single); // SIGKILL
    let left = names_starting(d, "strata-swap-");
    assert_eq!(left.len(), 1, "{left:?}");
    let mut next = std::process::Command::new(STRATA);
    next.args(["train", "--steps", "1"]);
    in_tmpdir(&mut next, d);
    let ran = run(next, LIMIT);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let removed = format!("removed {}", d.join(&left[0]).display());
    assert!(ran.stderr.contains(&removed), "{}", ran.stderr);
    assert!(
        names_starting(d, "strata-").is_empty(),
        "{:?}",
        names_starting(d, "strata-")
    );
}

#[test]
fn messages_name_the_step_counted_from_1_and_the_kind_of_offload_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A learning rate that blows the weights up in step 1: step 2's loss is not finite.
    let metrics = d.join("m.jsonl");
    let mut c = train_in(
        d,
        &[
            "--steps",
            "5",
            "--set",
            "optim.lr=1e30",
            "--set",
            "optim.warmup_steps=0",
        ],
    );
    c.args(set("train.metrics_file", &metrics));
    let ran = run(c, LIMIT);
    assert_refused(&ran, &["is not finite"]);
    let lines = std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        ran.stderr.contains(&format!("error: step {}: ", lines + 1)),
        "{lines} steps logged:\n{}",
        ran.stderr
    );
    // strata doctor: a regular file and a missing path are not offload paths.
    let afile = d.join("afile");
    std::fs::write(&afile, "x").expect("write");
    let missing = d.join("missing");
    let mut doctor = std::process::Command::new(STRATA);
    doctor.arg("doctor").arg(&afile).arg(&missing).arg(d);
    let ran = run(doctor, LIMIT);
    assert_eq!(ran.code, Some(1), "{}", ran.stdout);
    let line = |p: &Path| {
        ran.stdout
            .lines()
            .find(|l| l.contains("O_DIRECT") && l.contains(&format!(" {}: ", p.display())))
            .unwrap_or_else(|| panic!("no line for {}:\n{}", p.display(), ran.stdout))
            .to_string()
    };
    let (f, m, ok) = (line(&afile), line(&missing), line(d));
    assert!(
        f.contains("FAILED: is a regular file; an offload path must be a directory")
            && !f.contains("free"),
        "{f}"
    );
    assert!(
        m.contains("FAILED: does not exist") && !m.contains("free"),
        "{m}"
    );
    assert!(ok.contains(": ok, ") && ok.contains("free"), "{ok}");
}
