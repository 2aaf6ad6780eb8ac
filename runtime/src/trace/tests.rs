use super::*;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("trace file");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not JSON: {e}\n{text}", path.display()))
}

fn events(trace: &Value) -> &Vec<Value> {
    trace["traceEvents"].as_array().expect("traceEvents array")
}

/// The name of every track (thread_name metadata) by tid.
fn track_names(trace: &Value) -> HashMap<u64, String> {
    events(trace)
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
        .map(|e| {
            (
                e["tid"].as_u64().expect("tid"),
                e["args"]["name"].as_str().expect("name").to_string(),
            )
        })
        .collect()
}

fn slices<'a>(trace: &'a Value, name: &str) -> Vec<&'a Value> {
    events(trace)
        .iter()
        .filter(|e| e["ph"] == "X" && e["name"] == name)
        .collect()
}

fn end(e: &Value) -> f64 {
    e["ts"].as_f64().expect("ts") + e["dur"].as_f64().expect("dur")
}

#[test]
fn rank_files_insert_the_rank_before_the_extension() {
    let p = Path::new("out/trace.json");
    assert_eq!(rank_path(p, 0, 1), PathBuf::from("out/trace.json"));
    assert_eq!(rank_path(p, 1, 2), PathBuf::from("out/trace.rank1.json"));
    assert_eq!(rank_path(Path::new("t"), 3, 4), PathBuf::from("t.rank3"));
    assert_eq!(
        rank_path(Path::new("a.b.json"), 0, 2),
        PathBuf::from("a.b.rank0.json")
    );
}

#[test]
fn spans_become_slices_on_their_threads_tracks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("trace.json");
    let recorder = Arc::new(Recorder::create(&path, 0, 1).expect("recorder"));
    let subscriber = tracing_subscriber::registry()
        .with(TraceLayer::new(Arc::clone(&recorder)).with_filter(TraceFilter));
    tracing::subscriber::with_default(subscriber, || {
        let outer = tracing::trace_span!(target: "strata::test", "step", step = 7u64).entered();
        std::thread::sleep(Duration::from_millis(3));
        {
            let _inner =
                tracing::trace_span!(target: "strata::test", "job", queue = "x", op = "matmul")
                    .entered();
            std::thread::sleep(Duration::from_millis(2));
        }
        // Not strata's: not recorded. An ordinary log event: not recorded either.
        tracing::trace_span!(target: "other", "foreign").in_scope(|| {});
        tracing::info!("a log line");
        tracing::trace!(target: INSTANT_TARGET, op = "launch", "enqueue");
        drop(outer);
    });
    // A queue worker: its own thread, its own track named after the queue.
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(TraceLayer::new(Arc::clone(&recorder)).with_filter(TraceFilter)),
    );
    std::thread::Builder::new()
        .name("strata-compute".into())
        .spawn(move || {
            tracing::dispatcher::with_default(&dispatch, || {
                tracing::trace_span!(target: "strata::queue", "job", queue = "compute", op = "adamw")
                    .in_scope(|| std::thread::sleep(Duration::from_millis(1)));
            })
        })
        .expect("thread")
        .join()
        .expect("join");
    recorder.close().expect("close");

    let trace = read_json(&path);
    assert_eq!(trace["otherData"]["strata_clock"], "CLOCK_MONOTONIC");
    let names = track_names(&trace);
    let step = slices(&trace, "step");
    let matmul = slices(&trace, "matmul");
    let adamw = slices(&trace, "adamw");
    assert_eq!(
        (step.len(), matmul.len(), adamw.len()),
        (1, 1, 1),
        "{trace}"
    );
    assert!(slices(&trace, "foreign").is_empty() && !trace.to_string().contains("a log line"));
    let (step, matmul, adamw) = (step[0], matmul[0], adamw[0]);
    // The sleeps bound the durations from below (µs).
    assert!(step["dur"].as_f64().unwrap() >= 5_000.0, "{step}");
    assert!(matmul["dur"].as_f64().unwrap() >= 2_000.0, "{matmul}");
    assert!(adamw["dur"].as_f64().unwrap() >= 1_000.0, "{adamw}");
    // Nested: the job lies inside the step, on the same track; fields become args.
    assert_eq!(step["tid"], matmul["tid"]);
    assert!(matmul["ts"].as_f64() >= step["ts"].as_f64() && end(matmul) <= end(step) + 1e-3);
    assert_eq!(step["args"]["step"], 7);
    assert_eq!(matmul["args"]["queue"], "x");
    assert_eq!(matmul["cat"], "job");
    // Tracks: the worker's is "compute"; the test thread's is its own name, and apart.
    assert_eq!(names[&adamw["tid"].as_u64().unwrap()], "compute");
    assert_ne!(adamw["tid"], step["tid"]);
    // The instant sits inside the step, on the same track.
    let instant: Vec<_> = events(&trace).iter().filter(|e| e["ph"] == "i").collect();
    assert_eq!(instant.len(), 1);
    assert_eq!(instant[0]["name"], "launch");
    assert_eq!(instant[0]["tid"], step["tid"]);
    // Every event carries the rank as pid.
    assert!(events(&trace).iter().all(|e| e["pid"] == 0));
}

#[test]
fn gpu_slices_sit_after_their_anchor_on_their_own_track() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gpu.json");
    let recorder = Recorder::create(&path, 3, 1).expect("recorder");
    let anchor = Instant::now() + Duration::from_millis(10);
    recorder.track_slices(
        GPU_COMPUTE_TRACK,
        anchor,
        &[("gemm", 0.0, 1.5), ("gelu", 1.5, 1.75)],
    );
    recorder.track_slices(GPU_COMPUTE_TRACK, anchor, &[("adamw", 2.0, 3.0)]);
    recorder.close().expect("close");
    let trace = read_json(&path);
    let (gemm, gelu, adamw) = (
        slices(&trace, "gemm")[0],
        slices(&trace, "gelu")[0],
        slices(&trace, "adamw")[0],
    );
    let base = gemm["ts"].as_f64().unwrap();
    assert!(base >= 10_000.0, "anchor 10 ms after the origin: {gemm}");
    assert!((gelu["ts"].as_f64().unwrap() - base - 1_500.0).abs() < 1e-6);
    assert!((gelu["dur"].as_f64().unwrap() - 250.0).abs() < 1e-6);
    assert!((adamw["ts"].as_f64().unwrap() - base - 2_000.0).abs() < 1e-6);
    assert!(gemm["tid"] == adamw["tid"] && gemm["pid"] == 3);
    let names = track_names(&trace);
    assert_eq!(names.len(), 1, "one track, named once: {names:?}");
    assert_eq!(names[&gemm["tid"].as_u64().unwrap()], GPU_COMPUTE_TRACK);
}

#[test]
fn a_full_trace_drops_events_past_its_limit_and_stays_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("small.json");
    let mut sink = Sink::create(&path, json!({}), 3).expect("sink");
    for i in 0..5 {
        sink.push(&json!({"name": format!("e{i}"), "ph": "i", "ts": i, "pid": 0, "tid": 1}));
    }
    sink.close().expect("close");
    assert_eq!((sink.events, sink.dropped), (3, 2));
    let trace = read_json(&path);
    let names: Vec<_> = events(&trace)
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["e0", "e1", "e2"]);
}

#[test]
fn merged_ranks_share_one_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("trace.json");
    let rank0 = Recorder::create(&target, 0, 2).expect("rank 0");
    std::thread::sleep(Duration::from_millis(20));
    let rank1 = Recorder::create(&target, 1, 2).expect("rank 1");
    // The same moment in both ranks: 20 ms apart from their own origins, one time once merged.
    let (start, stop) = (Instant::now(), Instant::now() + Duration::from_millis(1));
    rank0.slice("all_reduce", "job", start, stop, Map::new());
    rank1.slice("all_reduce", "job", start, stop, Map::new());
    rank0.close().expect("close 0");
    rank1.close().expect("close 1");
    let parts = [rank0.path(), rank1.path()];
    assert!(parts.iter().all(|p| p.exists()), "{parts:?}");
    let own: Vec<f64> = parts
        .iter()
        .map(|p| {
            slices(&read_json(p), "all_reduce")[0]["ts"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert!(
        own[0] - own[1] >= 19_000.0,
        "rank files keep their own origins: {own:?}"
    );

    merge(&parts, &target).expect("merge");
    let trace = read_json(&target);
    let merged = slices(&trace, "all_reduce");
    assert_eq!(merged.len(), 2);
    let pids: HashSet<u64> = merged.iter().map(|e| e["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids, HashSet::from([0, 1]));
    let (a, b) = (
        merged[0]["ts"].as_f64().unwrap(),
        merged[1]["ts"].as_f64().unwrap(),
    );
    // Each file pairs its origin with CLOCK_MONOTONIC within a microsecond or so.
    assert!((a - b).abs() < 2.5, "merged onto one clock: {a} vs {b}");
    let processes: Vec<_> = events(&trace)
        .iter()
        .filter(|e| e["name"] == "process_name")
        .map(|e| e["args"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(processes, ["rank 0", "rank 1"]);
}

#[test]
fn an_unfinished_rank_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let part = dir.path().join("trace.rank1.json");
    let recorder = Recorder::create(&dir.path().join("trace.json"), 1, 2).expect("recorder");
    recorder.slice("x", "job", Instant::now(), Instant::now(), Map::new());
    // Flushed but not closed: no footer, as after a crash (a copy of the temporary file in its
    // place).
    {
        let mut guard = recorder.lock();
        let sink = guard.as_mut().expect("open");
        sink.out.as_mut().expect("open").flush().expect("flush");
        std::fs::copy(sink.file.as_ref().expect("open").temp(), &part).expect("copy");
    }
    let err = merge(std::slice::from_ref(&part), &dir.path().join("merged.json"))
        .expect_err("unfinished")
        .to_string();
    assert!(
        err.contains("trace.rank1.json") && err.contains("did not finish"),
        "{err}"
    );
}

/// The names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn nothing_is_written_before_open_and_the_file_is_replaced_only_at_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("trace.json");
    std::fs::write(&path, "old").expect("write");
    let recorder = Recorder::new(&path, 0, 1).expect("recorder");
    let now = Instant::now();
    recorder.slice("before", "job", now, now, Map::new());
    assert_eq!(names(dir.path()), ["trace.json"]);
    recorder.open(&path).expect("open");
    recorder.slice("after", "job", now, now, Map::new());
    assert_eq!(std::fs::read_to_string(&path).ok().as_deref(), Some("old"));
    recorder.close().expect("close");
    let trace = read_json(&path);
    assert!(slices(&trace, "before").is_empty());
    assert_eq!(slices(&trace, "after").len(), 1);
    assert_eq!(names(dir.path()), ["trace.json"]);
}

#[test]
fn a_discarded_trace_leaves_the_old_file_and_no_temporary_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("trace.json");
    std::fs::write(&path, "old").expect("write");
    let recorder = Recorder::create(&path, 0, 1).expect("recorder");
    let now = Instant::now();
    recorder.slice("x", "job", now, now, Map::new());
    assert_eq!(names(dir.path()).len(), 2, "the temporary file");
    recorder.discard();
    assert_eq!(std::fs::read_to_string(&path).ok().as_deref(), Some("old"));
    assert_eq!(names(dir.path()), ["trace.json"]);
    // A recorder never opened has nothing to close.
    assert_eq!(
        Recorder::new(&path, 0, 1)
            .expect("new")
            .close()
            .expect("close"),
        (0, 0)
    );
}
