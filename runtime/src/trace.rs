//! `--trace FILE`: a timeline of the run in the Chrome trace format (JSON with `traceEvents`), for
//! the Perfetto UI (ui.perfetto.dev) or chrome://tracing, so that the overlap of the queues can be
//! seen.
//!
//! Sources: every job of a host queue runs in a span (`backend/host_queue.rs`: on the CPU backend
//! every queue is a worker thread), the training loop marks its phases with spans (`train.rs`),
//! and on CUDA, while a trace is recorded, every step is profiled: the compute stream's kernels
//! are timed with CUDA events and land on a `gpu compute` track (`backend/cuda/profile.rs`), and
//! each launch is an instant on the host track. [`TraceLayer`] turns spans into complete ("X")
//! events with one track per thread — `host` (the training loop), `compute`, `h2d`, `d2h`,
//! `comm`, `io` — and `pid` = the rank, so every rank's tracks are apart.
//!
//! Files: a world of one writes FILE. With N ranks, rank r writes [`rank_path`] (FILE with
//! `.rank{r}` before the extension) while it runs; at the end every rank closes its file, the
//! ranks meet at a barrier, and rank 0 merges the rank files it can read into FILE and removes
//! them. Times are CLOCK_MONOTONIC, which the processes of one host share, so the merged ranks
//! line up; a rank on another host keeps its own file there, and rank 0 names it.
//!
//! Bounds: at most [`EVENTS_MAX`] events per rank; later ones are counted, dropped and reported.
//! Each file is written as one event per line, so it can be merged without reading it whole.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use serde_json::{json, Map, Value};
use strata_collectives::Communicator;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Most events one rank records; later ones are dropped (and counted).
pub const EVENTS_MAX: u64 = 4_000_000;

/// Target of events that become instants on the timeline (a kernel launch on CUDA).
pub const INSTANT_TARGET: &str = "strata::trace";

/// The track of CUDA kernel times.
pub const GPU_COMPUTE_TRACK: &str = "gpu compute";
/// The tracks of CUDA copy times (host to device, device to host), during a profiled step.
pub const GPU_H2D_TRACK: &str = "gpu h2d";
pub const GPU_D2H_TRACK: &str = "gpu d2h";

/// Tracks in the order they are shown; others follow.
const TRACK_ORDER: [&str; 11] = [
    "host",
    "compute",
    "h2d",
    "d2h",
    "comm",
    "io",
    "fetch",
    "optimizer",
    GPU_COMPUTE_TRACK,
    GPU_H2D_TRACK,
    GPU_D2H_TRACK,
];

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The OS error is the source, not repeated in the message.
    #[error("cannot {what} trace file {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trace file {path} line {line}: {message}")]
    Format {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("a trace is already recorded by this process")]
    AlreadyActive,
    #[error("cannot read CLOCK_MONOTONIC for the trace")]
    Clock(#[source] std::io::Error),
    #[error("trace: the ranks did not meet to merge their files")]
    Comm(#[source] strata_collectives::CommError),
}

/// The file rank `rank` of `world` writes: `path` itself for a world of one, else `path` with
/// `.rank{rank}` before its extension (`trace.json` → `trace.rank1.json`).
pub fn rank_path(path: &Path, rank: usize, world: usize) -> PathBuf {
    if world <= 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    let name = match (stem, path.extension()) {
        (Some(stem), Some(ext)) => format!("{stem}.rank{rank}.{}", ext.to_string_lossy()),
        (Some(stem), None) => format!("{stem}.rank{rank}"),
        (None, _) => format!("trace.rank{rank}.json"),
    };
    path.with_file_name(name)
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process of a host.
fn monotonic_ns() -> Result<u64, TraceError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(TraceError::Clock(std::io::Error::last_os_error()));
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(secs * 1_000_000_000 + nanos)
}

/// Now as an `Instant` and on CLOCK_MONOTONIC (the clock `Instant` reads on Linux): the clock read
/// between two `Instant`s, the closest pair of a few tries, so the two agree within a microsecond or
/// two unless the thread is preempted every time.
fn paired_now() -> Result<(Instant, u64), TraceError> {
    let mut best: Option<(std::time::Duration, Instant, u64)> = None;
    for _ in 0..8 {
        let before = Instant::now();
        let ns = monotonic_ns()?;
        let window = before.elapsed();
        if best.as_ref().is_none_or(|b| window < b.0) {
            best = Some((window, before + window / 2, ns));
        }
        if window < std::time::Duration::from_micros(1) {
            break;
        }
    }
    let (_, at, ns) = best.ok_or(TraceError::Clock(std::io::Error::other("no reading")))?;
    Ok((at, ns))
}

/// A small id per thread, the same for every recorder in the process.
fn thread_tid() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TID: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TID.with(|t| *t)
}

/// The track a thread's spans go on: its queue for `strata-<queue>` workers, `host` for the main
/// thread.
fn thread_track(tid: u64) -> String {
    match std::thread::current().name() {
        Some("main") => "host".to_string(),
        Some(name) => name.strip_prefix("strata-").unwrap_or(name).to_string(),
        None => format!("thread {tid}"),
    }
}

fn sort_index(track: &str) -> usize {
    TRACK_ORDER
        .iter()
        .position(|t| *t == track)
        .unwrap_or(TRACK_ORDER.len())
}

/// One rank's trace file, written as events arrive: a header line, one event per line, a footer.
struct Sink {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    events: u64,
    events_max: u64,
    dropped: u64,
    error: Option<std::io::Error>,
    /// Threads and tracks whose names are written.
    named: HashSet<u64>,
    /// Tracks that are not threads (the GPU's), by name.
    tracks: HashMap<String, u64>,
}

impl Sink {
    fn create(path: &Path, other_data: Value, events_max: u64) -> Result<Sink, TraceError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| TraceError::Io { what, path, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
        }
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io("create"))?);
        let header = json!({"displayTimeUnit": "ms", "otherData": other_data}).to_string();
        // `{"displayTimeUnit":…,"otherData":{…}` and then the array of events.
        let open = format!("{},\"traceEvents\":[\n", &header[..header.len() - 1]);
        out.write_all(open.as_bytes()).map_err(io("write"))?;
        Ok(Sink {
            path: path.to_path_buf(),
            out: Some(out),
            events: 0,
            events_max,
            dropped: 0,
            error: None,
            named: HashSet::new(),
            tracks: HashMap::new(),
        })
    }

    /// Appends one event (metadata events too); the first error stops the writing and is kept.
    fn push(&mut self, event: &Value) {
        let Some(out) = self.out.as_mut().filter(|_| self.error.is_none()) else {
            return;
        };
        if self.events >= self.events_max {
            self.dropped += 1;
            return;
        }
        let separator: &[u8] = if self.events == 0 { b"" } else { b",\n" };
        let written = out
            .write_all(separator)
            .and_then(|()| serde_json::to_writer(&mut *out, event).map_err(Into::into));
        match written {
            Ok(()) => self.events += 1,
            Err(e) => self.error = Some(e),
        }
    }

    /// Writes the footer and closes the file; the first error of the whole file is returned.
    fn close(&mut self) -> Result<(), TraceError> {
        let Some(mut out) = self.out.take() else {
            return Ok(());
        };
        let result = match self.error.take() {
            Some(e) => Err(e),
            None => out.write_all(b"\n]}\n").and_then(|()| out.flush()),
        };
        result.map_err(|source| TraceError::Io {
            what: "write",
            path: self.path.clone(),
            source,
        })
    }
}

/// Records one process's (one rank's) events into its trace file.
pub struct Recorder {
    rank: usize,
    world: usize,
    /// The file the user asked for (the merged file with several ranks).
    target: PathBuf,
    /// Time 0 of this file's events; the header gives it on CLOCK_MONOTONIC.
    origin: Instant,
    sink: Mutex<Sink>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Recorder(rank {} of {}, {})",
            self.rank,
            self.world,
            self.target.display()
        )
    }
}

impl Recorder {
    /// Creates rank `rank`'s file for `target` (see [`rank_path`]), with its parent directory.
    pub fn create(target: &Path, rank: usize, world: usize) -> Result<Recorder, TraceError> {
        let (origin, origin_ns) = paired_now()?;
        let path = rank_path(target, rank, world);
        let other = json!({
            "strata_rank": rank,
            "strata_world_size": world,
            "strata_clock": "CLOCK_MONOTONIC",
            "strata_origin_ns": origin_ns,
        });
        let mut sink = Sink::create(&path, other, EVENTS_MAX)?;
        sink.push(&json!({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": format!("rank {rank}")}}));
        sink.push(&json!({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}}));
        Ok(Recorder {
            rank,
            world,
            target: target.to_path_buf(),
            origin,
            sink: Mutex::new(sink),
        })
    }

    /// The file this rank writes.
    pub fn path(&self) -> PathBuf {
        rank_path(&self.target, self.rank, self.world)
    }

    fn lock(&self) -> MutexGuard<'_, Sink> {
        self.sink.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn micros(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.origin).as_nanos() as f64 / 1e3
    }

    /// Names track `tid` the first time it is used.
    fn name_track(&self, sink: &mut Sink, tid: u64, track: &str) {
        if sink.named.insert(tid) {
            let pid = self.rank;
            sink.push(&json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": track}}));
            let index = sort_index(track);
            sink.push(&json!({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": index}}));
        }
    }

    /// A slice from `start` to `end` on the calling thread's track.
    pub fn slice(
        &self,
        name: &str,
        cat: &str,
        start: Instant,
        end: Instant,
        args: Map<String, Value>,
    ) {
        let tid = thread_tid();
        let event = self.slice_event(tid, name, cat, start, end, args);
        let mut sink = self.lock();
        if !sink.named.contains(&tid) {
            self.name_track(&mut sink, tid, &thread_track(tid));
        }
        sink.push(&event);
    }

    fn slice_event(
        &self,
        tid: u64,
        name: &str,
        cat: &str,
        start: Instant,
        end: Instant,
        args: Map<String, Value>,
    ) -> Value {
        let ts = self.micros(start);
        let dur = end.saturating_duration_since(start).as_nanos() as f64 / 1e3;
        json!({"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": self.rank, "tid": tid, "args": args})
    }

    /// An instant on the calling thread's track.
    pub fn instant(&self, name: &str, at: Instant) {
        let tid = thread_tid();
        let event = json!({"name": name, "cat": "instant", "ph": "i", "s": "t", "ts": self.micros(at), "pid": self.rank, "tid": tid});
        let mut sink = self.lock();
        if !sink.named.contains(&tid) {
            self.name_track(&mut sink, tid, &thread_track(tid));
        }
        sink.push(&event);
    }

    /// Slices on the track named `track` (not a thread: the GPU's compute stream): `(name,
    /// begin_ms, end_ms)` after `anchor`, the host time at which the stream reached its start.
    pub fn track_slices(&self, track: &str, anchor: Instant, slices: &[(&str, f64, f64)]) {
        let mut sink = self.lock();
        let tid = match sink.tracks.get(track) {
            Some(&tid) => tid,
            None => {
                // Track ids share the thread ids' counter, so they never collide.
                static NEXT: AtomicU64 = AtomicU64::new(1 << 32);
                let tid = NEXT.fetch_add(1, Ordering::Relaxed);
                sink.tracks.insert(track.to_string(), tid);
                self.name_track(&mut sink, tid, track);
                tid
            }
        };
        let base = self.micros(anchor);
        for &(name, begin_ms, end_ms) in slices {
            let ts = base + begin_ms * 1e3;
            let dur = (end_ms - begin_ms).max(0.0) * 1e3;
            sink.push(&json!({"name": name, "cat": track, "ph": "X", "ts": ts, "dur": dur, "pid": self.rank, "tid": tid}));
        }
    }

    /// Closes the file; returns (events written, events dropped over [`EVENTS_MAX`]).
    pub fn close(&self) -> Result<(u64, u64), TraceError> {
        let mut sink = self.lock();
        sink.close()?;
        Ok((sink.events, sink.dropped))
    }
}

/// The fields of a span or event: `op` names the slice when present; all go into its args.
#[derive(Default)]
struct Fields {
    op: Option<String>,
    args: Map<String, Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "op" {
            if let Value::String(s) = &value {
                self.op = Some(s.clone());
            }
        }
        self.args.insert(field.name().to_string(), value);
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, json!(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, json!(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, json!(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, json!(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, json!(format!("{value:?}")));
    }
}

/// What a span carries between its creation and its exits.
struct SpanData {
    name: String,
    fields: Map<String, Value>,
    /// Enter times not yet matched by an exit (a span may be entered again while entered).
    entered: Vec<Instant>,
}

/// The `tracing` layer that writes a [`Recorder`]'s file: a slice per span enter/exit, on the
/// thread's track, named by the span's `op` field (else its name); an instant per event with
/// target [`INSTANT_TARGET`].
pub struct TraceLayer {
    recorder: Arc<Recorder>,
}

impl TraceLayer {
    pub fn new(recorder: Arc<Recorder>) -> TraceLayer {
        TraceLayer { recorder }
    }
}

impl<S> Layer<S> for TraceLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let name = fields
            .op
            .unwrap_or_else(|| attrs.metadata().name().to_string());
        span.extensions_mut().insert(SpanData {
            name,
            fields: fields.args,
            entered: Vec::new(),
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut extensions = span.extensions_mut();
        if let Some(data) = extensions.get_mut::<SpanData>() {
            data.fields.extend(fields.args);
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut extensions = span.extensions_mut();
            if let Some(data) = extensions.get_mut::<SpanData>() {
                data.entered.push(Instant::now());
            }
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let end = Instant::now();
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        let Some(data) = extensions.get_mut::<SpanData>() else {
            return;
        };
        if let Some(start) = data.entered.pop() {
            let cat = span.metadata().name();
            self.recorder
                .slice(&data.name, cat, start, end, data.fields.clone());
        }
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() == INSTANT_TARGET {
            let mut fields = Fields::default();
            event.record(&mut fields);
            let name = fields
                .op
                .unwrap_or_else(|| event.metadata().name().to_string());
            self.recorder.instant(&name, Instant::now());
        }
    }
}

/// What the trace layer sees: strata's spans and its instant events, at every level.
pub struct TraceFilter;

impl TraceFilter {
    fn wants(meta: &Metadata<'_>) -> bool {
        meta.target().starts_with("strata") && (meta.is_span() || meta.target() == INSTANT_TARGET)
    }
}

impl<S> Filter<S> for TraceFilter {
    fn enabled(&self, meta: &Metadata<'_>, _ctx: &Context<'_, S>) -> bool {
        TraceFilter::wants(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if TraceFilter::wants(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }
}

/// The process's trace while it is recorded (for the CUDA profile hook).
static ACTIVE: OnceLock<Arc<Recorder>> = OnceLock::new();

/// The trace this process records, if any.
pub fn active() -> Option<&'static Arc<Recorder>> {
    ACTIVE.get()
}

/// `--trace FILE` for this process: its rank's file is open from [`Trace::start`] on, written
/// through [`Trace::layer`], and closed (and merged, with several ranks) by [`Trace::finish`]. A
/// trace dropped without `finish` (a failed run) still closes its file, so it stays valid JSON.
pub struct Trace {
    recorder: Arc<Recorder>,
}

impl Trace {
    /// Starts this process's trace for FILE `path`; the rank and world size come from the
    /// launcher's variables (`strata launch`, torchrun, SLURM, Open MPI), as the engine's do.
    pub fn start(path: &Path) -> Result<Trace, TraceError> {
        let launched = ["WORLD_SIZE", "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        let (rank, world) = match strata_collectives::RankInfo::from_env() {
            Ok(info) if launched => (info.rank, info.world_size),
            _ => (0, 1),
        };
        let recorder = Arc::new(Recorder::create(path, rank, world)?);
        ACTIVE
            .set(Arc::clone(&recorder))
            .map_err(|_| TraceError::AlreadyActive)?;
        Ok(Trace { recorder })
    }

    /// The layer to add to the process's subscriber.
    pub fn layer<S>(&self) -> impl Layer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        TraceLayer::new(Arc::clone(&self.recorder)).with_filter(TraceFilter)
    }

    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// Closes this rank's file; with several ranks, meets the others at a barrier and rank 0
    /// merges every rank's file it can read into FILE. Returns the file this rank leaves.
    pub fn finish(self, comm: &dyn Communicator) -> Result<PathBuf, TraceError> {
        let rec = &self.recorder;
        let (_, dropped) = rec.close()?;
        if dropped > 0 {
            tracing::warn!(
                "trace: {dropped} events beyond the limit of {EVENTS_MAX} were dropped; trace fewer steps"
            );
        }
        if rec.world <= 1 {
            return Ok(rec.path());
        }
        comm.barrier().map_err(TraceError::Comm)?;
        if rec.rank != 0 {
            return Ok(rec.path());
        }
        let parts: Vec<PathBuf> = (0..rec.world)
            .map(|r| rank_path(&rec.target, r, rec.world))
            .collect();
        let (found, missing): (Vec<_>, Vec<_>) = parts.into_iter().partition(|p| p.exists());
        merge(&found, &rec.target)?;
        for part in &found {
            std::fs::remove_file(part).map_err(|source| TraceError::Io {
                what: "remove the merged rank file",
                path: part.clone(),
                source,
            })?;
        }
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            tracing::warn!(
                "trace: {} holds {} of {} ranks; the others' files are not on this host: {}",
                rec.target.display(),
                found.len(),
                rec.world,
                names.join(", ")
            );
        }
        Ok(rec.target.clone())
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        // Closing twice is a no-op; a failure here can only be reported.
        if let Err(e) = self.recorder.close() {
            eprintln!("warning: {e}");
        }
    }
}

/// One rank file, read line by line: its header's `otherData` and its events.
fn read_part(
    path: &Path,
    mut each: impl FnMut(Value) -> Result<(), TraceError>,
) -> Result<Map<String, Value>, TraceError> {
    let bad = |line: usize, message: String| TraceError::Format {
        path: path.to_path_buf(),
        line,
        message,
    };
    let file = File::open(path).map_err(|source| TraceError::Io {
        what: "open",
        path: path.to_path_buf(),
        source,
    })?;
    let mut lines = BufReader::new(file).lines().enumerate();
    let mut next = || -> Result<Option<(usize, String)>, TraceError> {
        match lines.next() {
            None => Ok(None),
            Some((i, Ok(line))) => Ok(Some((i + 1, line))),
            Some((_, Err(source))) => Err(TraceError::Io {
                what: "read",
                path: path.to_path_buf(),
                source,
            }),
        }
    };
    let (_, header) = next()?.ok_or_else(|| bad(1, "empty".into()))?;
    let header: Value = serde_json::from_str(&format!("{header}]}}"))
        .map_err(|e| bad(1, format!("not a strata trace header: {e}")))?;
    let other = header
        .get("otherData")
        .and_then(Value::as_object)
        .cloned()
        .ok_or_else(|| bad(1, "no otherData".into()))?;
    while let Some((n, line)) = next()? {
        if line == "]}" {
            return Ok(other);
        }
        let event = line.strip_suffix(',').unwrap_or(&line);
        each(serde_json::from_str(event).map_err(|e| bad(n, e.to_string()))?)?;
    }
    Err(bad(
        0,
        "ends before its closing `]}` (the rank did not finish)".into(),
    ))
}

/// Writes one trace at `target` holding the events of every file in `parts`, their times moved
/// onto the earliest file's origin.
fn merge(parts: &[PathBuf], target: &Path) -> Result<(), TraceError> {
    let origin_of =
        |other: &Map<String, Value>| other.get("strata_origin_ns").and_then(Value::as_u64);
    let mut origins = Vec::with_capacity(parts.len());
    for part in parts {
        // Only the header line is read here.
        let file = File::open(part).map_err(|source| TraceError::Io {
            what: "open",
            path: part.clone(),
            source,
        })?;
        let mut header = String::new();
        BufReader::new(file)
            .read_line(&mut header)
            .map_err(|source| TraceError::Io {
                what: "read",
                path: part.clone(),
                source,
            })?;
        let other = serde_json::from_str::<Value>(&format!("{}]}}", header.trim_end()))
            .ok()
            .and_then(|h| h.get("otherData").and_then(Value::as_object).cloned());
        let origin = other
            .as_ref()
            .and_then(origin_of)
            .ok_or_else(|| TraceError::Format {
                path: part.clone(),
                line: 1,
                message: "no strata_origin_ns in its header".into(),
            })?;
        origins.push(origin);
    }
    let base = origins.iter().copied().min().unwrap_or(0);
    let world = parts.len();
    let mut sink = Sink::create(
        target,
        json!({"strata_world_size": world, "strata_clock": "CLOCK_MONOTONIC", "strata_origin_ns": base}),
        EVENTS_MAX * world as u64,
    )?;
    for (part, origin) in parts.iter().zip(origins) {
        let shift_us = (origin - base) as f64 / 1e3;
        read_part(part, |mut event| {
            if let Some(ts) = event.get("ts").and_then(Value::as_f64) {
                event["ts"] = json!(ts + shift_us);
            }
            sink.push(&event);
            Ok(())
        })?;
    }
    sink.close()
}

#[cfg(test)]
mod tests;
