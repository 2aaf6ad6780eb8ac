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
//! Files: the trace is an output like the others ([`crate::outputs`]). [`Trace::start`] touches no
//! file (events before [`Trace::open`] are not recorded); the run checks FILE and the rank files
//! with its other outputs — not an input, not another output, locked — and opens the trace before
//! step 1. Every file is written under a temporary name and renamed when whole, so a run that fails
//! leaves FILE as it was. A world of one writes FILE. With N ranks, rank r writes [`rank_path`]
//! (FILE with `.rank{r}` before the extension); at the end every rank renames its file into place,
//! the ranks meet at a barrier, and rank 0 merges the rank files it can read into FILE and removes
//! them. Times are CLOCK_MONOTONIC, which the processes of one host share, so the merged ranks
//! line up; a rank on another host keeps its own file there, and rank 0 names it.
//!
//! Bounds: at most [`EVENTS_MAX`] events per rank; later ones are counted, dropped and reported.
//! Each file is written as one event per line, so it can be merged without reading it whole.

mod files;

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

use crate::outputs::{OutputError, OutputFile, TraceFiles};
pub use files::rank_path;
use files::{merge, Sink};

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
    #[error(transparent)]
    Output(Box<OutputError>),
    #[error("--trace {path}: this rank's file was not among the outputs checked for the run")]
    NotPrepared { path: PathBuf },
}

impl From<OutputError> for TraceError {
    fn from(e: OutputError) -> Self {
        TraceError::Output(Box::new(e))
    }
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

/// Records one process's (one rank's) events into its trace file, from [`Recorder::open`] on.
pub struct Recorder {
    rank: usize,
    world: usize,
    /// The file the user asked for (the merged file with several ranks).
    target: PathBuf,
    /// Time 0 of this file's events, and the same moment on CLOCK_MONOTONIC (in the header).
    origin: Instant,
    origin_ns: u64,
    /// None until opened (events are not recorded), and again once discarded.
    sink: Mutex<Option<Sink>>,
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
    /// Rank `rank`'s recorder for `target` (see [`rank_path`]); no file is touched until
    /// [`Recorder::open`].
    pub fn new(target: &Path, rank: usize, world: usize) -> Result<Recorder, TraceError> {
        let (origin, origin_ns) = paired_now()?;
        Ok(Recorder {
            rank,
            world,
            target: target.to_path_buf(),
            origin,
            origin_ns,
            sink: Mutex::new(None),
        })
    }

    /// [`Recorder::new`] and [`Recorder::open`] at its own [`Recorder::path`] (tests, tools).
    pub fn create(target: &Path, rank: usize, world: usize) -> Result<Recorder, TraceError> {
        let recorder = Recorder::new(target, rank, world)?;
        recorder.open(&recorder.path())?;
        Ok(recorder)
    }

    /// Starts writing this rank's file, which will replace `path` (its path checked, and locked, by
    /// the caller: [`crate::outputs`]).
    pub fn open(&self, path: &Path) -> Result<(), TraceError> {
        let (rank, world) = (self.rank, self.world);
        let other = json!({
            "strata_rank": rank,
            "strata_world_size": world,
            "strata_clock": "CLOCK_MONOTONIC",
            "strata_origin_ns": self.origin_ns,
        });
        let mut sink = Sink::create(path, other, EVENTS_MAX)?;
        sink.push(&json!({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": format!("rank {rank}")}}));
        sink.push(&json!({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}}));
        *self.lock() = Some(sink);
        Ok(())
    }

    /// The file this rank writes.
    pub fn path(&self) -> PathBuf {
        rank_path(&self.target, self.rank, self.world)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Sink>> {
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
        let mut guard = self.lock();
        let Some(sink) = guard.as_mut() else {
            return;
        };
        if !sink.named.contains(&tid) {
            self.name_track(sink, tid, &thread_track(tid));
        }
        sink.push(&self.slice_event(tid, name, cat, start, end, args));
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
        let mut guard = self.lock();
        let Some(sink) = guard.as_mut() else {
            return;
        };
        if !sink.named.contains(&tid) {
            self.name_track(sink, tid, &thread_track(tid));
        }
        sink.push(&event);
    }

    /// Slices on the track named `track` (not a thread: the GPU's compute stream): `(name,
    /// begin_ms, end_ms)` after `anchor`, the host time at which the stream reached its start.
    pub fn track_slices(&self, track: &str, anchor: Instant, slices: &[(&str, f64, f64)]) {
        let mut guard = self.lock();
        let Some(sink) = guard.as_mut() else {
            return;
        };
        let tid = match sink.tracks.get(track) {
            Some(&tid) => tid,
            None => {
                // Track ids share the thread ids' counter, so they never collide.
                static NEXT: AtomicU64 = AtomicU64::new(1 << 32);
                let tid = NEXT.fetch_add(1, Ordering::Relaxed);
                sink.tracks.insert(track.to_string(), tid);
                self.name_track(sink, tid, track);
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

    /// Closes the file and renames it into place; returns (events written, events dropped over
    /// [`EVENTS_MAX`]). A recorder never opened has nothing to close.
    pub fn close(&self) -> Result<(u64, u64), TraceError> {
        let mut guard = self.lock();
        let Some(sink) = guard.as_mut() else {
            return Ok((0, 0));
        };
        sink.close()?;
        Ok((sink.events, sink.dropped))
    }

    /// Stops recording and removes the unfinished file (the file it would replace stays as it was).
    pub fn discard(&self) {
        drop(self.lock().take());
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

/// The key that names the trace in errors about its files.
pub const TRACE_KEY: &str = "--trace";

/// `--trace FILE` for this process: started before the run reads its config ([`Trace::start`]:
/// no file is touched), its files checked and locked with the run's other outputs
/// ([`Trace::files`], then [`Trace::open`] before step 1), written through [`Trace::layer`],
/// renamed into place (and merged, with several ranks) by [`Trace::finish`]. A trace dropped
/// without `finish` (a failed run) removes its unfinished file and leaves FILE as it was.
pub struct Trace {
    recorder: Arc<Recorder>,
    /// This rank's checked, locked files (from [`Trace::open`]): its own, and on rank 0 of
    /// several, FILE; the directories made for them go last, if the run left them empty.
    files: TraceFiles,
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
        let recorder = Arc::new(Recorder::new(path, rank, world)?);
        ACTIVE
            .set(Arc::clone(&recorder))
            .map_err(|_| TraceError::AlreadyActive)?;
        Ok(Trace {
            recorder,
            files: TraceFiles::default(),
        })
    }

    /// The trace's files for the run's output checks: (those this process writes, those other
    /// ranks write). One rank writes FILE; with several, rank r writes its [`rank_path`] and rank 0
    /// also FILE (and keeps the other ranks' files apart from its outputs).
    pub fn files(&self) -> (Vec<OutputFile>, Vec<OutputFile>) {
        let rec = &self.recorder;
        let file = |r: Option<usize>| OutputFile {
            key: match r {
                Some(r) => format!("{TRACE_KEY} (rank {r}'s file)"),
                None => TRACE_KEY.into(),
            },
            path: r.map_or_else(
                || rec.target.clone(),
                |r| rank_path(&rec.target, r, rec.world),
            ),
            size_bytes: 0,
            size_detail: "a timeline of unknown size".into(),
        };
        if rec.world <= 1 {
            return (vec![file(None)], Vec::new());
        }
        if rec.rank != 0 {
            return (vec![file(Some(rec.rank))], Vec::new());
        }
        let others = (1..rec.world).map(|r| file(Some(r))).collect();
        (vec![file(None), file(Some(0))], others)
    }

    /// Starts recording into this rank's file, `files` being the trace's files after the run's
    /// checks ([`Trace::files`]' first list, checked and locked); they stay locked until the end.
    pub fn open(&mut self, files: TraceFiles) -> Result<(), TraceError> {
        let own = self.recorder.path();
        let ready = files
            .files
            .iter()
            .find(|f| f.path == own)
            .ok_or(TraceError::NotPrepared { path: own.clone() })?;
        self.recorder.open(&ready.target)?;
        self.files = files;
        Ok(())
    }

    /// For a tool whose only output is the trace (`strata-bench train`): checks the trace's files
    /// against `inputs` and each other, locks them and opens the trace.
    pub fn prepare(&mut self, inputs: Vec<crate::outputs::InputFile>) -> Result<(), TraceError> {
        crate::outputs::cleanup::install();
        let (outputs, elsewhere) = self.files();
        let made = outputs
            .iter()
            .map(|f| crate::outputs::make_parent(&f.key, &f.path, &inputs))
            .collect::<Result<Vec<_>, _>>()?;
        let files = crate::outputs::RunFiles {
            inputs,
            outputs,
            elsewhere,
            checkpoints: None,
        };
        let files = crate::outputs::prepare_run(&files)?.files;
        self.open(TraceFiles { files, made })
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
        let merged = self
            .files
            .files
            .iter()
            .find(|f| f.path == rec.target)
            .ok_or(TraceError::NotPrepared {
                path: rec.target.clone(),
            })?;
        let parts: Vec<PathBuf> = (0..rec.world)
            .map(|r| rank_path(&rec.target, r, rec.world))
            .collect();
        let (found, missing): (Vec<_>, Vec<_>) = parts.into_iter().partition(|p| p.exists());
        merge(&found, &merged.target)?;
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
        // After `finish` the file is in place and this removes nothing; before, the run failed.
        self.recorder.discard();
    }
}

#[cfg(test)]
mod tests;
