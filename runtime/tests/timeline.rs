//! `strata train --trace FILE`: the timeline of real runs, read back as Chrome trace JSON — one track per
//! queue per rank (pid = rank), every span well-formed and nested on its track, and the ranks of a 2-process
//! run on one clock (their all_reduce calls overlap in time, as a collective's must).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

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

/// Rounding of microseconds printed with nanosecond digits.
const EPS_US: f64 = 1e-3;

fn train(args: &[&str], trace: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("train")
        .args(SMALL)
        .args(args)
        .arg("--trace")
        .arg(trace)
        .output()
        .expect("run strata");
    assert!(
        out.status.success(),
        "strata train {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Slice {
    name: String,
    ts: f64,
    end: f64,
    args: Value,
}

/// The trace's complete events by rank and track name, after checking every event's shape.
struct Timeline {
    tracks: BTreeMap<(u64, String), Vec<Slice>>,
    processes: BTreeMap<u64, String>,
}

impl Timeline {
    fn read(path: &Path) -> Timeline {
        let text = std::fs::read_to_string(path).expect("trace file");
        let json: Value = serde_json::from_str(&text).expect("the trace is JSON");
        let events = json["traceEvents"].as_array().expect("traceEvents");
        let mut names = BTreeMap::new();
        let mut processes = BTreeMap::new();
        for e in events.iter().filter(|e| e["ph"] == "M") {
            let (pid, tid) = (
                e["pid"].as_u64().expect("pid"),
                e["tid"].as_u64().expect("tid"),
            );
            let name = e["args"]["name"].as_str().map(str::to_string);
            match (e["name"].as_str(), name) {
                (Some("thread_name"), Some(n)) => assert!(names.insert((pid, tid), n).is_none()),
                (Some("process_name"), Some(n)) => assert!(processes.insert(pid, n).is_none()),
                _ => {}
            }
        }
        let mut tracks: BTreeMap<(u64, String), Vec<Slice>> = BTreeMap::new();
        for e in events.iter().filter(|e| e["ph"] != "M") {
            let (pid, tid) = (
                e["pid"].as_u64().expect("pid"),
                e["tid"].as_u64().expect("tid"),
            );
            let track = names
                .get(&(pid, tid))
                .unwrap_or_else(|| panic!("unnamed track: {e}"));
            let ts = e["ts"].as_f64().expect("ts");
            assert!(ts.is_finite() && ts >= 0.0, "{e}");
            if e["ph"] == "i" {
                continue;
            }
            assert_eq!(e["ph"], "X", "{e}");
            let dur = e["dur"].as_f64().expect("dur");
            assert!(dur.is_finite() && dur >= 0.0, "begin after end: {e}");
            tracks.entry((pid, track.clone())).or_default().push(Slice {
                name: e["name"].as_str().expect("name").to_string(),
                ts,
                end: ts + dur,
                args: e["args"].clone(),
            });
        }
        for ((pid, track), slices) in &mut tracks {
            slices.sort_by(|a, b| a.ts.total_cmp(&b.ts).then(b.end.total_cmp(&a.end)));
            // Nested: a slice starting inside an open one ends inside it.
            let mut open: Vec<&Slice> = Vec::new();
            for s in slices.iter() {
                while open.last().is_some_and(|o| o.end <= s.ts + EPS_US) {
                    open.pop();
                }
                if let Some(o) = open.last() {
                    assert!(
                        s.end <= o.end + EPS_US,
                        "rank {pid} track {track}: {} [{}, {}] overlaps {} [{}, {}] without nesting",
                        s.name, s.ts, s.end, o.name, o.ts, o.end
                    );
                }
                open.push(s);
            }
        }
        Timeline { tracks, processes }
    }

    fn track(&self, rank: u64, name: &str) -> &[Slice] {
        self.tracks
            .get(&(rank, name.to_string()))
            .map_or(&[], Vec::as_slice)
    }

    fn named<'a>(
        &'a self,
        rank: u64,
        track: &str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Slice> {
        self.track(rank, track)
            .iter()
            .filter(move |s| s.name == name)
    }
}

#[test]
fn two_ranks_give_one_trace_with_every_queue_of_every_rank_on_one_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("out/run.json");
    train(
        &[
            "--nproc",
            "2",
            "--steps",
            "3",
            "--set",
            "dist.backend=\"shm\"",
            // Data parallel with every state on the device: gradients are all-reduced.
            "--set",
            "zero.stage=0",
            "--set",
            "offload_param.device=\"none\"",
            "--set",
            "offload_optimizer.device=\"none\"",
        ],
        &trace,
    );
    // Rank 0 merged the rank files and removed them.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .expect("out/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["run.json"]);

    let t = Timeline::read(&trace);
    assert_eq!(
        t.processes,
        BTreeMap::from([(0, "rank 0".to_string()), (1, "rank 1".to_string())])
    );
    for rank in [0, 1] {
        let tracks: BTreeSet<&str> = t
            .tracks
            .keys()
            .filter(|(pid, _)| *pid == rank)
            .map(|(_, name)| name.as_str())
            .collect();
        // Every queue that works in a data-parallel step on the CPU backend (no NVMe I/O yet).
        for queue in ["host", "compute", "h2d", "d2h", "comm"] {
            assert!(
                tracks.contains(queue),
                "rank {rank} has no {queue} track: {tracks:?}"
            );
        }
        // A job runs on its own queue's thread, so each queue's jobs are on its track.
        for queue in ["compute", "h2d", "d2h", "comm"] {
            for s in t.track(rank, queue) {
                assert_eq!(
                    s.args["queue"], queue,
                    "rank {rank}: {} on the {queue} track",
                    s.name
                );
            }
        }
        for (track, op) in [
            ("compute", "matmul_forward"),
            ("compute", "matmul_backward"),
            ("compute", "adamw"),
            ("h2d", "copy_h2d"),
            ("d2h", "copy_d2h"),
            ("comm", "all_reduce"),
        ] {
            assert!(
                t.named(rank, track, op).count() > 0,
                "rank {rank}: no {op} on {track}"
            );
        }
        let steps: Vec<_> = t
            .named(rank, "host", "step")
            .map(|s| s.args["step"].clone())
            .collect();
        assert_eq!(steps, [1, 2, 3], "rank {rank}: one step span per step");
        // Within a rank, the queues and the host share a clock: every gradient all_reduce runs inside
        // the train_step that enqueued and awaited it.
        let train_steps: Vec<_> = t.named(rank, "host", "train_step").collect();
        assert_eq!(train_steps.len(), 3);
        for a in t.named(rank, "comm", "all_reduce") {
            assert!(
                train_steps
                    .iter()
                    .any(|s| s.ts <= a.ts + EPS_US && a.end <= s.end + EPS_US),
                "rank {rank}: all_reduce [{}, {}] outside every train_step",
                a.ts,
                a.end
            );
        }
    }
    // Across ranks: the k-th all_reduce of rank 0 and of rank 1 are one collective, which neither rank can
    // finish before the other has entered it, so their intervals overlap (up to the clock pairing, µs).
    let (r0, r1): (Vec<_>, Vec<_>) = (
        t.named(0, "comm", "all_reduce").collect(),
        t.named(1, "comm", "all_reduce").collect(),
    );
    assert_eq!(r0.len(), r1.len());
    assert!(!r0.is_empty());
    let pairing_us = 20.0;
    for (a, b) in r0.iter().zip(&r1) {
        assert!(
            a.ts <= b.end + pairing_us && b.ts <= a.end + pairing_us,
            "all_reduce of rank 0 [{}, {}] and rank 1 [{}, {}] do not overlap: the ranks are not on one clock",
            a.ts,
            a.end,
            b.ts,
            b.end
        );
    }
}

#[test]
fn one_rank_writes_the_file_it_is_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("trace");
    // The embedded default: ZeRO-3 with parameters and optimizer states on NVMe (every unit
    // partitioned: this model's are below the default persistence threshold).
    train(
        &[
            "--steps",
            "2",
            "--set",
            "zero.param_persistence_threshold=0",
        ],
        &trace,
    );
    let t = Timeline::read(&trace);
    assert_eq!(t.processes, BTreeMap::from([(0, "rank 0".to_string())]));
    assert_eq!(t.named(0, "host", "step").count(), 2);
    for (track, op) in [
        ("fetch", "nvme read params"),
        ("io", "nvme read optimizer"),
        ("io", "nvme write optimizer"),
        ("optimizer", "host adamw"),
        ("optimizer", "gradient intake"),
        ("h2d", "copy_h2d"),
        ("d2h", "copy_d2h"),
    ] {
        assert!(t.named(0, track, op).count() > 0, "no {op} on {track}");
    }
    assert_eq!(t.named(0, "compute", "adamw").count(), 0);
    // A world of one has no rank files.
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
}

#[test]
fn an_unwritable_trace_path_is_an_error_that_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "not a directory").expect("write");
    let trace = blocker.join("trace.json");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["train", "--steps", "1", "--trace"])
        .arg(&trace)
        .output()
        .expect("run strata");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Checked with the run's other outputs, before anything is written.
    assert!(
        stderr.starts_with(&format!(
            "error: --trace = {}: {} is a regular file; it must be a directory",
            trace.display(),
            blocker.display()
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&blocker).ok().as_deref(),
        Some("not a directory")
    );
}

/// Two ranks of the embedded default (ZeRO-3, parameters and optimizer states on NVMe): every
/// queue's track is there for every rank — compute, host→device, device→host, communication,
/// NVMe (optimizer states), parameter fetch, the host optimizer — with the operations that
/// belong on it.
#[test]
fn two_offloaded_ranks_show_every_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("offload.json");
    train(
        &[
            "--nproc",
            "2",
            "--steps",
            "2",
            "--set",
            "zero.param_persistence_threshold=0",
            "--set",
            "dist.backend=\"shm\"",
        ],
        &trace,
    );
    let t = Timeline::read(&trace);
    for rank in 0..2 {
        for (track, op) in [
            ("compute", "matmul_forward"),
            ("h2d", "copy_h2d"),
            ("d2h", "copy_d2h"),
            ("comm", "all_gather_in_place"),
            ("comm", "reduce_scatter_add"),
            ("fetch", "nvme read params"),
            ("io", "nvme read optimizer"),
            ("io", "nvme write optimizer"),
            ("optimizer", "host adamw"),
        ] {
            assert!(
                t.named(rank, track, op).count() > 0,
                "rank {rank}: no {op} on {track}"
            );
        }
    }
}

/// Without clipping the host optimizer steps each sub-group as its gradient arrives: on the
/// optimizer track, AdamW slices start before the step's last gradient intake. With clipping it
/// waits for the global norm, so every AdamW of the step follows every intake.
#[test]
fn without_clipping_host_adamw_starts_during_backward() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (clip, early) in [("0.0", true), ("1.0", false)] {
        let trace = dir.path().join(format!("clip-{clip}.json"));
        train(
            &[
                "--steps",
                "2",
                "--set",
                "model.n_layer=4",
                "--set",
                "offload_param.device=\"none\"",
                "--set",
                "offload_optimizer.device=\"cpu\"",
                "--set",
                "zero.param_persistence_threshold=0",
                "--set",
                &format!("optim.grad_clip={clip}"),
            ],
            &trace,
        );
        let t = Timeline::read(&trace);
        // The first step's intakes: the first half of the run's (two steps of the same units).
        let all: Vec<&Slice> = t.named(0, "optimizer", "gradient intake").collect();
        let intakes = &all[..all.len() / 2];
        let updates: Vec<&Slice> = t.named(0, "optimizer", "host adamw").collect();
        assert!(
            all.len() % 2 == 0 && intakes.len() > 1 && !updates.is_empty(),
            "clip {clip}: {} intakes, {} updates",
            all.len(),
            updates.len()
        );
        let last_intake = intakes.iter().map(|s| s.ts).fold(f64::MIN, f64::max);
        let first_update = updates.iter().map(|s| s.ts).fold(f64::MAX, f64::min);
        assert_eq!(
            first_update < last_intake,
            early,
            "clip {clip}: first AdamW at {first_update} µs, last intake at {last_intake} µs"
        );
    }
}
