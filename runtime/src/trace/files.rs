//! The trace's files: a rank's file name ([`rank_path`]), the writer of one file ([`Sink`]: one
//! event per line under a temporary name, renamed into place when whole) and the merge of the
//! ranks' files into one.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{TraceError, EVENTS_MAX};
use crate::outputs::AtomicFile;

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

/// One trace file, written as events arrive under a temporary name: a header line, one event per
/// line, a footer; renamed into place by [`Sink::close`], removed if dropped before.
pub(super) struct Sink {
    pub(super) path: PathBuf,
    pub(super) file: Option<AtomicFile>,
    pub(super) out: Option<BufWriter<File>>,
    pub(super) events: u64,
    pub(super) events_max: u64,
    pub(super) dropped: u64,
    pub(super) error: Option<std::io::Error>,
    /// Threads and tracks whose names are written.
    pub(super) named: HashSet<u64>,
    /// Tracks that are not threads (the GPU's), by name.
    pub(super) tracks: HashMap<String, u64>,
}

impl Sink {
    /// Starts the file that will replace `path` (checked and locked by the caller).
    pub(super) fn create(
        path: &Path,
        other_data: Value,
        events_max: u64,
    ) -> Result<Sink, TraceError> {
        let mut file = AtomicFile::create(path)?;
        let writer = file
            .file()
            .try_clone()
            .map_err(|e| file.error("opening a writer", e))?;
        let mut out = BufWriter::with_capacity(1 << 20, writer);
        let header = json!({"displayTimeUnit": "ms", "otherData": other_data}).to_string();
        // `{"displayTimeUnit":…,"otherData":{…}` and then the array of events.
        let open = format!("{},\"traceEvents\":[\n", &header[..header.len() - 1]);
        out.write_all(open.as_bytes())
            .map_err(|e| file.error("writing the header", e))?;
        Ok(Sink {
            path: path.to_path_buf(),
            file: Some(file),
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
    pub(super) fn push(&mut self, event: &Value) {
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

    /// Writes the footer and renames the file into place; the first error of the whole file is
    /// returned (and the file is not renamed).
    pub(super) fn close(&mut self) -> Result<(), TraceError> {
        let (Some(mut out), Some(file)) = (self.out.take(), self.file.take()) else {
            return Ok(());
        };
        let written = match self.error.take() {
            Some(e) => Err(e),
            None => out.write_all(b"\n]}\n").and_then(|()| out.flush()),
        };
        drop(out);
        written.map_err(|source| TraceError::Io {
            what: "write",
            path: self.path.clone(),
            source,
        })?;
        file.commit()?;
        Ok(())
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
pub(super) fn merge(parts: &[PathBuf], target: &Path) -> Result<(), TraceError> {
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
