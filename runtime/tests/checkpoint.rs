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

/// The embedded default's optimizer states on NVMe in sub-groups of 16,384 elements: every
/// unit's part is several sub-groups, saved and loaded one at a time.
fn sub_groups() -> Vec<String> {
    set("offload_optimizer.sub_group_size=16384".into()).to_vec()
}

fn resume_bitwise(world: usize, small_groups: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nproc: Vec<String> = if world > 1 {
        vec!["--nproc".into(), world.to_string()]
    } else {
        Vec::new()
    };
    if small_groups {
        nproc.extend(sub_groups());
    }
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
    resume_bitwise(1, false);
}

#[test]
fn ten_steps_equal_five_and_a_resume_to_ten_at_two_ranks() {
    resume_bitwise(2, false);
}

#[test]
fn ten_steps_equal_five_and_a_resume_to_ten_in_small_sub_groups_at_two_ranks() {
    resume_bitwise(2, true);
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
        // Its own TMPDIR: the swap files of a killed run go with the test's directory.
        let mut child = strata()
            .env("TMPDIR", dir.path())
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
        // At 2 ranks the launcher's children (the ranks) die with it: wait until they have, so
        // that the resumed run does not find the killed run still holding its checkpoint_dir.
        let pid = child.id();
        let ranks =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        let started = Instant::now();
        while ranks
            .split_whitespace()
            .any(|r| Path::new(&format!("/proc/{r}")).exists())
        {
            assert!(started.elapsed() < Duration::from_secs(60), "ranks live on");
            std::thread::sleep(Duration::from_millis(10));
        }
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
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // Not an error, but not the end of the run: the exit status of a process SIGTERM ended.
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    assert!(
        stdout.contains("stopped by SIGTERM after step")
            && stdout.contains("checkpoint written to"),
        "{stdout}"
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
fn resume_at_another_world_size(small_groups: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tiers = if small_groups {
        sub_groups()
    } else {
        Vec::new()
    };
    let accum = [
        set("data.grad_accum_steps=2".into()).to_vec(),
        tiers.clone(),
    ]
    .concat();
    let (out, straight) = train(dir.path(), "straight", 8, &refs(&accum));
    ok(&out, "straight");
    let root = dir.path().join("ckpt");
    let first = [accum, checkpoint_args(&root, 0)].concat();
    let (out, _) = train(dir.path(), "first", 4, &refs(&first));
    ok(&out, "4 steps at 1 rank");
    let then = [
        vec!["--nproc".to_string(), "2".into()],
        tiers,
        set(format!("train.checkpoint_dir=\"{}\"", root.display())).to_vec(),
        vec!["--resume".into(), "latest".into()],
    ]
    .concat();
    let (out, resumed) = train(dir.path(), "resumed", 8, &refs(&then));
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

#[test]
fn a_checkpoint_resumes_at_another_world_size() {
    resume_at_another_world_size(false);
}

/// The same in small sub-groups: each of a rank's sub-groups is read from the part of the one
/// rank file that holds it.
#[test]
fn a_checkpoint_in_small_sub_groups_resumes_at_another_world_size() {
    resume_at_another_world_size(true);
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
    // At one rank, the global batch of 2 ranks × 8 rows is one micro-batch of 16.
    fn resume<'a>(ckpt: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        [
            &[
                "train",
                "--steps",
                "4",
                "--set",
                "data.micro_batch_size=16",
                "--resume",
                ckpt,
            ],
            extra,
        ]
        .concat()
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

/// The embedded default made small (one block of width 64, sequences of 32), for the tests
/// below, which run many short trainings.
const SMALL: [&str; 8] = [
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_embd=64",
    "--set",
    "model.n_head=2",
    "--set",
    "model.seq_len=32",
];

/// [`train`] of the [`SMALL`] model.
fn train_small(dir: &Path, name: &str, steps: usize, extra: &[&str]) -> (Output, Vec<f32>) {
    train(dir, name, steps, &[&SMALL[..], extra].concat())
}

/// A run's checkpoint directory, the checkpoints in it by name.
fn saved(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .expect("read")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    names
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `strata ARGS` fails before any step, naming everything in `needles`.
fn refused_before_step_1(args: &[&str], needles: &[&str]) {
    let out = strata().args(args).args(SMALL).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}:\n{stderr}");
    assert!(
        !stderr.contains("step     "),
        "a step ran: {args:?}\n{stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "{n:?} missing:\n{stderr}");
    }
}

/// Every file under `dir`, by path, with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).expect("read").filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            files.extend(snapshot(&p));
        } else {
            files.push((p.clone(), std::fs::read(&p).expect("read")));
        }
    }
    files.sort();
    files
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from)
        .expect("read")
        .filter_map(Result::ok)
    {
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// Issue 27, item 2: the data position is kept in rows, so any split of the same global batch
/// (ranks × micro-batch × accumulation) continues on the rows the uninterrupted run reads next.
#[test]
fn a_resume_with_another_split_of_the_global_batch_continues_at_the_same_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, straight) = train_small(dir.path(), "straight", 4, &[]);
    ok(&out, "straight");
    let root = dir.path().join("ckpt");
    let (out, _) = train_small(dir.path(), "first", 2, &refs(&checkpoint_args(&root, 0)));
    ok(&out, "first");
    let step2 = root.join("step-00000002").display().to_string();
    let splits: [(&str, &[&str]); 2] = [
        (
            "two ranks of 4",
            &["--nproc", "2", "--set", "data.micro_batch_size=4"],
        ),
        (
            "one rank of 2 x 4",
            &[
                "--set",
                "data.micro_batch_size=2",
                "--set",
                "data.grad_accum_steps=4",
            ],
        ),
    ];
    for (name, split) in splits {
        let args = [split, &["--resume", step2.as_str()]].concat();
        let (out, resumed) = train_small(dir.path(), &name.replace(' ', "-"), 4, &args);
        ok(&out, name);
        assert_eq!(resumed.len(), 2, "{name}");
        for (i, (a, b)) in resumed.iter().zip(&straight[2..]).enumerate() {
            assert!(
                ((a - b) / b).abs() <= 1e-5,
                "{name}, step {}: {a} vs {b}",
                i + 3
            );
        }
    }
    refused_before_step_1(
        &["train", "--steps", "4", "--resume", &step2, "--set", "data.micro_batch_size=4"],
        &[
            "saved with a global batch of 8 rows per step (data.micro_batch_size 8 × data.grad_accum_steps 1 × 1 rank)",
            "this run's is 4 (data.micro_batch_size 4 × data.grad_accum_steps 1 × 1 rank)",
            "so that their product is 8",
        ],
    );
}

/// Issue 27, item 3: the manifest lists every rank file; another checkpoint's file, an edited
/// step and a `.tmp` directory are refused naming the file.
#[test]
fn rank_files_and_manifests_of_another_checkpoint_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let root = d.join("ckpt");
    let args = [
        vec!["--nproc".to_string(), "2".into()],
        checkpoint_args(&root, 2),
        set("train.keep_last=0".into()).to_vec(),
    ]
    .concat();
    let (out, _) = train_small(d, "two", 4, &refs(&args));
    ok(&out, "2 ranks");
    let (step2, step4) = (root.join("step-00000002"), root.join("step-00000004"));
    let before = snapshot(&root);
    // At one rank the global batch of 2 ranks × 8 is one micro-batch of 16.
    let resume = |ck: &Path, needles: &[&str]| {
        let ck = ck.display().to_string();
        refused_before_step_1(
            &[
                "train",
                "--steps",
                "6",
                "--set",
                "data.micro_batch_size=16",
                "--resume",
                &ck,
            ],
            needles,
        );
    };
    let a = d.join("a/step-00000004");
    copy_dir(&step4, &a);
    for name in ["rank1.bin", "rank1.json"] {
        std::fs::copy(step2.join(name), a.join(name)).expect("copy");
    }
    resume(
        &a,
        &[
            &a.join("rank1.json").display().to_string(),
            "is not the index manifest.json lists for rank 1",
            "a rank file of another checkpoint",
        ],
    );
    let b = d.join("b/step-00000004");
    copy_dir(&step4, &b);
    std::fs::copy(step2.join("rank1.bin"), b.join("rank1.bin")).expect("copy");
    resume(
        &b,
        &[
            &b.join("rank1.bin").display().to_string(),
            "checksum mismatch",
            "another checkpoint's",
        ],
    );
    let edit_step = |at: &Path| {
        let path = at.join("manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        m["step"] = 3.into();
        std::fs::write(&path, serde_json::to_vec_pretty(&m).expect("json")).expect("write");
    };
    let c = d.join("c/step-00000002");
    copy_dir(&step2, &c);
    edit_step(&c);
    resume(&c, &["says step 3, but its directory is named for step 2"]);
    let renamed = d.join("c/best");
    copy_dir(&step2, &renamed);
    edit_step(&renamed);
    resume(
        &renamed,
        &["says step 3, but rank 0's file was written at step 2"],
    );
    let tmp = d.join("d/step-00000004.tmp");
    copy_dir(&step4, &tmp);
    resume(&tmp, &["`.tmp` directories are never read"]);
    assert_eq!(snapshot(&root), before, "a checkpoint changed");
}

/// Issue 27, item 8: `latest` is the newest save, not the highest step; retention keeps the
/// newest saves.
#[test]
fn latest_is_the_newest_save_and_retention_keeps_the_newest_saves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (out, straight) = train_small(d, "straight", 5, &[]);
    ok(&out, "straight");
    let root = d.join("ckpt");
    let (out, _) = train_small(d, "first", 4, &refs(&checkpoint_args(&root, 2)));
    ok(&out, "first");
    assert_eq!(saved(&root), ["step-00000002", "step-00000004"]);
    // Back to step 2, on to step 3: step 3 is now the newest save, step 2 the oldest.
    let step2 = root.join("step-00000002").display().to_string();
    let again = [checkpoint_args(&root, 0), vec!["--resume".into(), step2]].concat();
    let (out, _) = train_small(d, "again", 3, &refs(&again));
    ok(&out, "again");
    assert_eq!(saved(&root), ["step-00000003", "step-00000004"]);
    let latest = [
        checkpoint_args(&root, 0),
        vec!["--resume".into(), "latest".into()],
    ]
    .concat();
    let (out, resumed) = train_small(d, "latest", 5, &refs(&latest));
    ok(&out, "latest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("step-00000003 (step 3,"), "{stderr}");
    assert_eq!(bits(&resumed), bits(&straight[3..]));
}

/// Issue 27, item 6 and 13: `strata export` writes nothing into a checkpoint, and checks both of
/// its files before writing either.
#[test]
fn export_writes_nothing_into_a_checkpoint_and_checks_both_files_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let root = d.join("ckpt");
    let args = [
        checkpoint_args(&root, 2),
        set("train.keep_last=0".into()).to_vec(),
    ]
    .concat();
    let (out, _) = train_small(d, "run", 4, &refs(&args));
    ok(&out, "run");
    let before = snapshot(&root);
    let root_s = root.display().to_string();
    let step4 = root.join("step-00000004");
    let export = |from: &Path, to: &Path| {
        vec![
            "export".to_string(),
            from.display().to_string(),
            "-o".into(),
            to.display().to_string(),
        ]
    };
    for (from, to, needle) in [
        (
            root.clone(),
            step4.join("rank0.bin"),
            "lies inside the input CHECKPOINT",
        ),
        (
            root.clone(),
            root.join("step-00000002/rank0.bin"),
            "lies inside the input a checkpoint beside it",
        ),
        (
            step4.clone(),
            step4.join("new/model.safetensors"),
            "lies inside the input CHECKPOINT",
        ),
    ] {
        refused(
            &refs(&export(&from, &to)),
            &["--output", &to.display().to_string(), needle],
        );
    }
    assert_eq!(snapshot(&root), before, "a checkpoint changed");
    assert!(!step4.join("new").exists());
    // config.json is a directory: nothing is written, the directory made for the export is gone.
    let hf = d.join("hf");
    std::fs::create_dir_all(hf.join("config.json")).expect("mkdir");
    refused(
        &[
            "export",
            &root_s,
            "-o",
            &hf.join("m.safetensors").display().to_string(),
        ],
        &["config.json", "is a directory"],
    );
    let made = d.join("new/sub");
    let out = strata()
        .args(export(&root, &made.join("m.safetensors")))
        .args(["--dtype", "bf16"])
        .output()
        .expect("export");
    ok(&out, "export into a new directory");
    assert!(made.join("config.json").is_file());
    let names: Vec<String> = std::fs::read_dir(&hf)
        .expect("read")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["config.json"]);
}

/// Issue 24, item 6: a resumed run continues its metrics file: the lines up to the checkpoint's
/// step stay as they were, later ones (of the first run) are dropped, the new ones follow.
#[test]
fn a_resumed_run_continues_its_metrics_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let root = d.join("ckpt");
    let args = [
        checkpoint_args(&root, 3),
        set("train.keep_last=0".into()).to_vec(),
    ]
    .concat();
    let (out, first) = train_small(d, "m", 5, &refs(&args));
    ok(&out, "first");
    let old = std::fs::read_to_string(d.join("m.jsonl")).expect("metrics");
    let step3 = root.join("step-00000003").display().to_string();
    let again = [args.clone(), vec!["--resume".into(), step3]].concat();
    let (out, all) = train_small(d, "m", 6, &refs(&again));
    ok(&out, "resumed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("continued after its 3 lines up to step 3 (2 later lines dropped)"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(d.join("m.jsonl")).expect("metrics");
    let steps: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["step"]
                .as_u64()
                .expect("step")
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    let kept: Vec<&str> = old.lines().take(3).collect();
    assert_eq!(text.lines().take(3).collect::<Vec<_>>(), kept);
    assert_eq!(bits(&all[3..5]), bits(&first[3..5]));
}

/// Issue 24, item 6: SIGTERM to a 2-rank run saves and stops it; no rank calls that an error.
#[test]
fn a_signal_stop_is_not_an_error_on_any_rank() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("ckpt");
    let metrics = dir.path().join("stopped.jsonl");
    let child = strata()
        .env("TMPDIR", dir.path())
        .args(["train", "--nproc", "2", "--steps", "100000"])
        .args(SMALL)
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
    while losses(&metrics).len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(60), "no step 2");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: sending a signal to our own child process (the launcher, which passes it on).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    assert!(
        stdout.contains("[rank 0] stopped by SIGTERM after step") && !stdout.contains("[rank 1]"),
        "{stdout}"
    );
    let done = losses(&metrics).len();
    assert_eq!(saved(&root), [format!("step-{done:08}")]);
}
