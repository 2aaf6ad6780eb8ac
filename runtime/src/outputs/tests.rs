use super::*;
use std::io::Write;

fn input(key: &str, path: &Path) -> InputFile {
    InputFile {
        key: key.into(),
        path: path.into(),
    }
}

fn output(key: &str, path: &Path) -> OutputFile {
    OutputFile {
        key: key.into(),
        path: path.into(),
        size_bytes: 10,
        size_detail: "a test".into(),
    }
}

fn err(inputs: &[InputFile], outputs: &[OutputFile]) -> String {
    prepare(inputs, outputs)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| "no error".into())
}

/// Names in `dir` that strata's temporary or lock files would have.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(TEMP_SUFFIX) || n.ends_with(LOCK_SUFFIX))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn outputs_that_alias_inputs_are_refused_however_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let tokens = d.join("tokens.bin");
    std::fs::write(&tokens, b"data").expect("write");
    std::fs::create_dir(d.join("sub")).expect("mkdir");
    std::os::unix::fs::symlink(&tokens, d.join("link.bin")).expect("symlink");
    std::fs::hard_link(&tokens, d.join("hard.bin")).expect("hard link");
    let inputs = [input("data.train", &tokens)];
    for alias in [
        tokens.clone(),
        d.join("sub/../tokens.bin"),
        d.join("link.bin"),
        d.join("hard.bin"),
    ] {
        let e = err(&inputs, &[output("train.metrics_file", &alias)]);
        assert!(
            e.starts_with(&format!(
                "train.metrics_file = {} is the input data.train",
                alias.display()
            )) && e.contains("strata never writes its inputs"),
            "{e}"
        );
    }
    assert!(err(&inputs, &[output("train.export_to", &d.join("hard.bin"))]).contains("hard links"));
    assert_eq!(std::fs::read(&tokens).ok().as_deref(), Some(&b"data"[..]));
    assert!(leftovers(d).is_empty());
}

#[test]
fn two_outputs_on_one_file_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("out");
    let b = dir.path().join("sub/../out");
    std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
    let e = err(
        &[],
        &[
            output("train.metrics_file", &a),
            output("train.export_to", &b),
        ],
    );
    assert!(
        e.contains("train.metrics_file")
            && e.contains("train.export_to")
            && e.contains("same file"),
        "{e}"
    );
}

#[test]
fn outputs_must_be_regular_files_in_existing_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Not /dev/null: tests may run as root, and a regression must not touch that device.
    let e = err(&[], &[output("train.export_to", Path::new("/dev/zero"))]);
    assert_eq!(
        e,
        "train.export_to = /dev/zero is a character device; an output must be a regular file or absent"
    );
    let e = err(&[], &[output("train.export_to", d)]);
    assert!(e.contains("is a directory"), "{e}");
    let missing = d.join("no/such/dir/w.safetensors");
    let e = err(&[], &[output("train.export_to", &missing)]);
    assert!(
        e.contains("the directory") && e.contains("does not exist"),
        "{e}"
    );
    std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling")).expect("symlink");
    let e = err(&[], &[output("train.export_to", &d.join("dangling"))]);
    assert!(
        e.contains("symbolic link to") && e.contains("nowhere"),
        "{e}"
    );
}

#[test]
fn space_is_checked_against_the_file_system() {
    let dir = tempfile::tempdir().expect("tempdir");
    let free = free_bytes(dir.path()).expect("statvfs");
    let mut big = output("train.export_to", &dir.path().join("w"));
    big.size_bytes = free.saturating_add(1 << 30);
    let e = err(&[], &[big]);
    // The free space moves while other programs write: the message is checked, not its number.
    assert!(
        e.contains("bytes free, but")
            && e.contains(&format!("{} are needed", free.saturating_add(1 << 30))),
        "{e}"
    );
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn a_locked_output_names_the_holder_and_the_lock_goes_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("metrics.jsonl");
    let held = prepare(&[], &[output("train.metrics_file", &path)]).expect("first lock");
    let e = err(&[], &[output("train.metrics_file", &path)]);
    assert!(
        e.contains(&format!("is in use by process {}", std::process::id())),
        "{e}"
    );
    drop(held);
    assert!(leftovers(dir.path()).is_empty());
    assert!(prepare(&[], &[output("train.metrics_file", &path)]).is_ok());
}

#[test]
fn an_uncommitted_file_leaves_the_old_one_whole_and_no_temp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.safetensors");
    std::fs::write(&path, b"old").expect("write");
    let mut atomic = AtomicFile::create(&path).expect("create");
    atomic.file().write_all(b"half").expect("write");
    assert!(atomic.temp().exists());
    drop(atomic);
    assert_eq!(std::fs::read(&path).ok().as_deref(), Some(&b"old"[..]));
    assert!(leftovers(dir.path()).is_empty());
    let mut atomic = AtomicFile::create(&path).expect("create");
    atomic.file().write_all(b"new").expect("write");
    atomic.commit().expect("commit");
    assert_eq!(std::fs::read(&path).ok().as_deref(), Some(&b"new"[..]));
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn a_symlinked_output_writes_its_target_and_keeps_the_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = dir.path().join("real");
    let link = dir.path().join("link");
    std::fs::write(&real, b"old").expect("write");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let mut atomic = AtomicFile::create(&link).expect("create");
    atomic.file().write_all(b"new").expect("write");
    atomic.commit().expect("commit");
    assert!(std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()));
    assert_eq!(std::fs::read(&real).ok().as_deref(), Some(&b"new"[..]));
}

#[test]
fn temp_names_are_unique_within_a_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w");
    let a = AtomicFile::create(&path).expect("a");
    let b = AtomicFile::create(&path).expect("b");
    assert_ne!(a.temp(), b.temp());
}

#[test]
fn a_line_file_replaces_the_old_file_only_at_its_first_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("metrics.jsonl");
    std::fs::write(&path, b"previous run\n").expect("write");
    let lines = LineFile::create("train.metrics_file", &path).expect("create");
    drop(lines);
    assert_eq!(
        std::fs::read(&path).ok().as_deref(),
        Some(&b"previous run\n"[..])
    );
    let mut lines = LineFile::create("train.metrics_file", &path).expect("create");
    lines.write_line("{\"step\":0}").expect("line");
    assert_eq!(
        std::fs::read(&path).ok().as_deref(),
        Some(&b"{\"step\":0}\n"[..])
    );
    lines.write_line("{\"step\":1}").expect("line");
    assert_eq!(
        std::fs::read_to_string(&path).ok().as_deref(),
        Some("{\"step\":0}\n{\"step\":1}\n")
    );
    assert!(leftovers(dir.path()).is_empty());
}

fn dir_output(key: &str, path: &Path) -> OutputFile {
    OutputFile {
        size_bytes: 10,
        ..output(key, path)
    }
}

#[test]
fn no_output_lies_inside_an_input_directory_or_another_ranks_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let checkpoint = d.join("ck/step-00000002");
    std::fs::create_dir_all(&checkpoint).expect("mkdir");
    std::fs::write(checkpoint.join("rank0.bin"), b"states").expect("write");
    let inputs = [input("train.resume", &checkpoint)];
    let e = err(&inputs, &[output("--trace", &checkpoint.join("rank0.bin"))]);
    assert!(
        e.contains("lies inside the input train.resume") && e.contains("strata never writes"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(checkpoint.join("rank0.bin")).ok().as_deref(),
        Some(&b"states"[..])
    );
    // Another rank's file is kept apart from this rank's outputs, and neither counted nor locked.
    let files = RunFiles {
        outputs: vec![output("train.metrics_file", &d.join("t.rank1.json"))],
        elsewhere: vec![output("--trace (rank 1's file)", &d.join("t.rank1.json"))],
        ..RunFiles::default()
    };
    let e = prepare_run(&files)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("--trace (rank 1's file)") && e.contains("same file"),
        "{e}"
    );
    let files = RunFiles {
        outputs: vec![output("--trace", &d.join("t.json"))],
        elsewhere: vec![
            output("--trace (rank 1's file)", &d.join("t.rank1.json")),
            // On another host: not resolvable here, that rank's to check.
            output("--trace (rank 2's file)", &d.join("no/such/t.rank2.json")),
        ],
        ..RunFiles::default()
    };
    let ready = prepare_run(&files).expect("prepare");
    assert_eq!(ready.files.len(), 1);
    assert_eq!(leftovers(d), [".t.json.strata-lock"]);
    drop(ready);
    assert!(leftovers(d).is_empty());
}

#[test]
fn a_checkpoint_directory_is_made_locked_kept_apart_and_removed_if_still_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ck = d.join("runs/a/ck");
    let files = RunFiles {
        outputs: vec![output("train.metrics_file", &d.join("m.jsonl"))],
        checkpoints: Some(dir_output("train.checkpoint_dir", &ck)),
        ..RunFiles::default()
    };
    let ready = prepare_run(&files).expect("prepare");
    assert!(ck.join(".strata-lock").is_file());
    let e = prepare_run(&files)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("train.checkpoint_dir")
            && e.contains(&format!("in use by process {}", std::process::id())),
        "{e}"
    );
    drop(ready);
    assert!(!d.join("runs").exists(), "made for nothing, removed again");
    // Inside a checkpoint of the directory: refused; beside them: fine.
    std::fs::create_dir_all(ck.join("step-00000002")).expect("mkdir");
    let inside = RunFiles {
        outputs: vec![output("--trace", &ck.join("step-00000002/rank0.bin"))],
        checkpoints: Some(dir_output("train.checkpoint_dir", &ck)),
        ..RunFiles::default()
    };
    let e = prepare_run(&inside)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("lies inside the checkpoint") && e.contains("train.checkpoint_dir"),
        "{e}"
    );
    let beside = RunFiles {
        outputs: vec![output("train.metrics_file", &ck.join("metrics.jsonl"))],
        ..inside
    };
    let ready = prepare_run(&beside).expect("beside the checkpoints");
    drop(ready);
    // Not made by this run: stays.
    assert!(ck.join("step-00000002").is_dir());
    // A regular file, or a path through one, is no directory.
    std::fs::write(d.join("afile"), b"x").expect("write");
    for path in [d.join("afile"), d.join("afile/ck")] {
        let files = RunFiles {
            checkpoints: Some(dir_output("train.checkpoint_dir", &path)),
            ..RunFiles::default()
        };
        let e = prepare_run(&files)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("is a regular file; it must be a directory"),
            "{e}"
        );
    }
}

#[test]
fn a_continued_line_file_keeps_the_lines_up_to_the_step_and_replaces_the_file_at_the_first_new_one()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("metrics.jsonl");
    let old = "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\nhalf a li";
    std::fs::write(&path, old).expect("write");
    let (mut lines, kept, dropped) =
        LineFile::continuing("train.metrics_file", &path, 2).expect("continue");
    assert_eq!((kept, dropped), (2, 2));
    assert_eq!(std::fs::read_to_string(&path).ok().as_deref(), Some(old));
    lines.write_line("{\"step\":3,\"new\":true}").expect("line");
    lines.write_line("{\"step\":4}").expect("line");
    assert_eq!(
        std::fs::read_to_string(&path).ok().as_deref(),
        Some("{\"step\":1}\n{\"step\":2}\n{\"step\":3,\"new\":true}\n{\"step\":4}\n")
    );
    assert!(leftovers(dir.path()).is_empty());
    // No file yet: a fresh one.
    let fresh = dir.path().join("fresh.jsonl");
    let (_, kept, dropped) = LineFile::continuing("train.metrics_file", &fresh, 2).expect("fresh");
    assert_eq!((kept, dropped), (0, 0));
}
