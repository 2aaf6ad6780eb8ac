//! Sharded checkpoints against the real binary: a run resumed from a checkpoint continues bit for
//! bit (1 and 2 ranks, stage 3 with the optimizer on NVMe), also after SIGKILL in the middle of a
//! save and after SIGTERM; at another world size it re-shards (within 1e-5); a checkpoint of
//! another model, a missing rank file or a corrupted shard is refused naming the file; the export
//! reads back through `model.init_from` to the same loss.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `strata train` of the embedded default (ZeRO-3, parameters and optimizer states on NVMe)
/// for `steps` steps with `extra` arguments; the run's losses from its metrics file.
fn train(dir: &Path, name: &str, steps: usize, extra: &[&str]) -> (Output, Vec<f32>) {
    let metrics = dir.join(format!("{name}.jsonl"));
    let out = strata()
        .args(["train", "--steps", &steps.to_string()])
        .args(["--set", "train.log_every=1"])
        .args([
            "--set",
            &format!("train.metrics_file=\"{}\"", metrics.display()),
        ])
        .args(extra)
        .output()
        .expect("run strata");
    (out, losses(&metrics))
}

fn losses(metrics: &Path) -> Vec<f32> {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v["loss"].as_f64().expect("loss") as f32
        })
        .collect()
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn set(kv: String) -> [String; 2] {
    ["--set".to_string(), kv]
}

fn checkpoint_args(root: &Path, every: usize) -> Vec<String> {
    [
        set(format!("train.checkpoint_dir=\"{}\"", root.display())),
        set(format!("train.checkpoint_every={every}")),
    ]
    .concat()
}

fn resume_bitwise(world: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let nproc: Vec<String> = if world > 1 {
        vec!["--nproc".into(), world.to_string()]
    } else {
        Vec::new()
    };
    let (out, straight) = train(dir.path(), "straight", 10, &refs(&nproc));
    ok(&out, "10 steps");
    let root = dir.path().join("ckpt");
    let first = [nproc.clone(), checkpoint_args(&root, 0)].concat();
    let (out, _) = train(dir.path(), "first", 5, &refs(&first));
    ok(&out, "5 steps");
    let then = [
        nproc.clone(),
        checkpoint_args(&root, 0),
        vec!["--resume".into(), "latest".into()],
    ]
    .concat();
    let (out, resumed) = train(dir.path(), "resumed", 10, &refs(&then));
    ok(&out, "resumed to 10");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("resumed from") && stderr.contains("step-00000005"),
        "{stderr}"
    );
    assert_eq!(resumed.len(), 5, "{stderr}");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&resumed),
        bits(&straight[5..]),
        "world {world}: {resumed:?} vs {:?}",
        &straight[5..]
    );
}

#[test]
fn ten_steps_equal_five_and_a_resume_to_ten_at_one_rank() {
    resume_bitwise(1);
}

#[test]
fn ten_steps_equal_five_and_a_resume_to_ten_at_two_ranks() {
    resume_bitwise(2);
}

/// A larger model, so that a save takes long enough to be killed in the middle of it.
const LARGER: [&str; 6] = [
    "--set",
    "model.n_layer=8",
    "--set",
    "model.n_embd=256",
    "--set",
    "model.n_head=4",
];

/// SIGKILL to `strata train` (at 2 ranks the launcher: its ranks die with it) while a save is
/// under way, then `--resume latest`.
fn sigkill_mid_save(world: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let nproc: Vec<String> = if world > 1 {
        vec!["--nproc".into(), world.to_string()]
    } else {
        Vec::new()
    };
    let larger = [&LARGER[..], &refs(&nproc)].concat();
    let (out, straight) = train(dir.path(), "straight", 8, &larger);
    ok(&out, "straight");
    let root = dir.path().join("ckpt");
    let metrics = dir.path().join("killed.jsonl");
    let mut killed_mid_save = false;
    for _attempt in 0..3 {
        let _ = std::fs::remove_dir_all(&root);
        let mut child = strata()
            .args(["train", "--steps", "8"])
            .args(&larger)
            .args(checkpoint_args(&root, 1))
            .args([
                "--set",
                &format!("train.metrics_file=\"{}\"", metrics.display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        // Wait for a complete checkpoint, then for the next save to be under way.
        let started = Instant::now();
        let tmp = loop {
            let saved = root.join("step-00000001").join("manifest.json").is_file();
            let tmp = std::fs::read_dir(&root).ok().and_then(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|x| x == "tmp"))
            });
            if let (true, Some(tmp)) = (saved, tmp) {
                break Some(tmp);
            }
            if started.elapsed() > Duration::from_secs(120)
                || child.try_wait().ok().flatten().is_some()
            {
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        if tmp.is_some_and(|t| t.exists()) {
            killed_mid_save = true;
            break;
        }
    }
    assert!(killed_mid_save, "never caught a save in progress");
    // The interrupted save is not a checkpoint; the last complete one is whole.
    let (out, resumed) = train(
        dir.path(),
        "resumed",
        8,
        &[
            &larger[..],
            &[
                "--set",
                &format!("train.checkpoint_dir=\"{}\"", root.display()),
                "--resume",
                "latest",
            ],
        ]
        .concat(),
    );
    ok(&out, "resume after SIGKILL");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let from: usize = stderr
        .split("(step ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resume line:\n{stderr}"));
    assert_eq!(resumed.len(), 8 - from);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&resumed), bits(&straight[from..]), "world {world}");
}

#[test]
fn sigkill_in_the_middle_of_a_save_then_resume_latest_continues_bitwise_at_one_rank() {
    sigkill_mid_save(1);
}

#[test]
fn sigkill_in_the_middle_of_a_save_then_resume_latest_continues_bitwise_at_two_ranks() {
    sigkill_mid_save(2);
}

#[test]
fn sigterm_saves_a_checkpoint_and_stops_then_the_run_resumes_bitwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, straight) = train(dir.path(), "straight", 30, &[]);
    ok(&out, "straight");
    let root = dir.path().join("ckpt");
    let metrics = dir.path().join("stopped.jsonl");
    let child = strata()
        .args(["train", "--steps", "30"])
        .args(checkpoint_args(&root, 0))
        .args([
            "--set",
            &format!("train.metrics_file=\"{}\"", metrics.display()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while losses(&metrics).len() < 3 {
        assert!(started.elapsed() < Duration::from_secs(60), "no step 3");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("stopped by a signal after step")
            && stderr.contains("checkpoint written to"),
        "{stderr}"
    );
    let done = losses(&metrics).len();
    assert!(done < 30, "{stderr}");
    let (out, resumed) = train(
        dir.path(),
        "resumed",
        30,
        &[
            "--set",
            &format!("train.checkpoint_dir=\"{}\"", root.display()),
            "--resume",
            "latest",
        ],
    );
    ok(&out, "resume after SIGTERM");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&resumed), bits(&straight[done..]));
}

/// One rank with 2 micro-batches per step reads the rows of 2 ranks with one each: a checkpoint
/// of the first, resumed by the second, continues within 1e-5 (the shards are re-cut).
#[test]
fn a_checkpoint_resumes_at_another_world_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, straight) = train(
        dir.path(),
        "straight",
        8,
        &["--set", "data.grad_accum_steps=2"],
    );
    ok(&out, "straight");
    let root = dir.path().join("ckpt");
    let first = [
        vec!["--set".to_string(), "data.grad_accum_steps=2".into()],
        checkpoint_args(&root, 0),
    ]
    .concat();
    let (out, _) = train(
        dir.path(),
        "first",
        4,
        &first.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    ok(&out, "4 steps at 1 rank");
    let (out, resumed) = train(
        dir.path(),
        "resumed",
        8,
        &[
            "--nproc",
            "2",
            "--set",
            &format!("train.checkpoint_dir=\"{}\"", root.display()),
            "--resume",
            "latest",
        ],
    );
    ok(&out, "resumed at 2 ranks");
    assert_eq!(resumed.len(), 4);
    for (i, (a, b)) in resumed.iter().zip(&straight[4..]).enumerate() {
        assert!(
            ((a - b) / b).abs() <= 1e-5,
            "step {}: {a} at 2 ranks vs {b} at 1",
            i + 5
        );
    }
}

fn refused(args: &[&str], needles: &[&str]) {
    let out = strata().args(args).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} missing:\n{stderr}");
    }
}

#[test]
fn another_model_a_missing_rank_file_or_a_corrupted_shard_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("ckpt");
    let args = [
        vec!["--nproc".to_string(), "2".into()],
        checkpoint_args(&root, 0),
    ]
    .concat();
    let (out, _) = train(
        dir.path(),
        "two",
        2,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    ok(&out, "2 ranks");
    let ckpt: PathBuf = root.join("step-00000002");
    let ckpt_s = ckpt.display().to_string();
    fn resume<'a>(ckpt: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        [&["train", "--steps", "4", "--resume", ckpt], extra].concat()
    }
    refused(
        &resume(&ckpt_s, &["--set", "model.n_layer=3"]),
        &[
            "manifest.json",
            "a checkpoint of another model: model.n_layer is 4 there, 3 in this config",
        ],
    );
    // A corrupted shard: one byte of rank 1's file changed.
    let bin = ckpt.join("rank1.bin");
    let mut bytes = std::fs::read(&bin).expect("read");
    bytes[1000] ^= 0x40;
    std::fs::write(&bin, &bytes).expect("write");
    refused(
        &resume(&ckpt_s, &[]),
        &["rank1.bin", "checksum mismatch", "corrupted"],
    );
    bytes[1000] ^= 0x40;
    bytes.truncate(bytes.len() - 4);
    std::fs::write(&bin, &bytes).expect("write");
    refused(&resume(&ckpt_s, &[]), &["rank1.bin", "truncated"]);
    std::fs::remove_file(ckpt.join("rank1.json")).expect("remove");
    refused(
        &resume(&ckpt_s, &[]),
        &["rank1.json", "missing: the checkpoint was saved by 2 ranks"],
    );
    refused(
        &[
            "train",
            "--steps",
            "4",
            "--resume",
            &dir.path().join("nothing").display().to_string(),
        ],
        &["is not a checkpoint (no manifest.json)"],
    );
}

#[test]
fn the_export_reads_back_to_the_same_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("ckpt");
    let args = checkpoint_args(&root, 0);
    let (out, _) = train(
        dir.path(),
        "run",
        5,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    ok(&out, "5 steps");
    let exported = dir.path().join("hf").join("model.safetensors");
    std::fs::create_dir_all(exported.parent().expect("parent")).expect("mkdir");
    let out = strata()
        .args([
            "export",
            &root.display().to_string(),
            "-o",
            &exported.display().to_string(),
        ])
        .output()
        .expect("export");
    ok(&out, "export");
    assert!(exported.with_file_name("config.json").is_file());
    // The exported weights, read by model.init_from, against the checkpoint resumed: the same
    // evaluation loss on the held-out stream, at step 0 of a run with 0 learning-rate steps.
    let eval = |extra: &[&str]| -> f32 {
        let metrics = dir.path().join("eval.jsonl");
        let _ = std::fs::remove_file(&metrics);
        let out = strata()
            .args(["train", "--steps", "6"])
            .args([
                "--set",
                "data.val=\"synthetic\"",
                "--set",
                "train.eval_every=1",
            ])
            .args([
                "--set",
                "optim.lr=1e-30",
                "--set",
                "optim.min_lr=0",
                "--set",
                "optim.weight_decay=0",
            ])
            .args([
                "--set",
                &format!("train.metrics_file=\"{}\"", metrics.display()),
            ])
            .args(extra)
            .output()
            .expect("run");
        ok(&out, "eval");
        let text = std::fs::read_to_string(&metrics).expect("metrics");
        let first: serde_json::Value =
            serde_json::from_str(text.lines().next().expect("a line")).expect("json");
        first["val_loss"].as_f64().expect("val_loss") as f32
    };
    let from_export = eval(&[
        "--set",
        &format!("model.init_from=\"{}\"", exported.display()),
    ]);
    let from_checkpoint = eval(&[
        "--set",
        &format!(
            "train.checkpoint_dir=\"{}\"",
            dir.path().join("other").display()
        ),
        "--resume",
        &root.join("step-00000005").display().to_string(),
    ]);
    assert!(
        ((from_export - from_checkpoint) / from_checkpoint).abs() <= 1e-6,
        "{from_export} vs {from_checkpoint}"
    );
    // bf16: a valid safetensors file of the same tensors at half the bytes.
    let bf16 = dir.path().join("model-bf16.safetensors");
    let out = strata()
        .args([
            "export",
            &root.display().to_string(),
            "-o",
            &bf16.display().to_string(),
            "--dtype",
            "bf16",
        ])
        .output()
        .expect("export bf16");
    ok(&out, "export bf16");
    let (a, b) = (
        std::fs::read(&exported).expect("fp32"),
        std::fs::read(&bf16).expect("bf16"),
    );
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).expect("fp32 file"),
        safetensors::SafeTensors::deserialize(&b).expect("bf16 file"),
    );
    assert_eq!(a.names().len(), b.names().len());
    for (name, t) in a.tensors() {
        let u = b.tensor(&name).expect("same names");
        assert_eq!(t.shape(), u.shape());
        assert_eq!(u.dtype(), safetensors::Dtype::BF16);
        assert_eq!(u.data().len() * 2, t.data().len());
    }
}
