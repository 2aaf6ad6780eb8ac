//! Reading the inputs as a stream of units, in bounded batches: a text file as pieces of at most
//! [`TEXT_UNIT_BYTES`] bytes (cut as [`super::pieces`] says, so the tokens are those of the whole text), a
//! JSON-lines file (`.jsonl`, `.ndjson`) as one unit per non-blank line. Only the batch being read and those
//! queued are in memory, whatever the input size.

use super::pieces::cut;
use crate::data::DataError;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Text or record bytes per batch.
pub const BATCH_BYTES: usize = 4 << 20;
/// The longest JSON line read.
pub const LINE_BYTES_MAX: usize = 256 << 20;
/// The most bytes of a text file in one unit: the grain of `--val-fraction` and of the parallel work.
pub const TEXT_UNIT_BYTES: usize = 8 << 10;
/// Bytes read from a text file at once.
const READ_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Jsonl,
}

impl Kind {
    pub fn of(path: &Path) -> Kind {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson") => Kind::Jsonl,
            _ => Kind::Text,
        }
    }
}

/// One unit of work, tokenized on its own.
pub struct Unit {
    /// Index of the input file.
    pub file: usize,
    /// Line (from 1) where the unit starts.
    pub line: u64,
    pub body: Body,
}

pub enum Body {
    /// A piece of a text file; `first` and `last` say whether it begins or ends the file (the document).
    Text {
        text: String,
        first: bool,
        last: bool,
    },
    /// One line of a JSON-lines file.
    Record(String),
}

impl Unit {
    pub fn bytes(&self) -> usize {
        match &self.body {
            Body::Text { text, .. } => text.len(),
            Body::Record(r) => r.len() + 1,
        }
    }
}

/// The input paths: each argument a file or a shell pattern (`data/*.jsonl`), patterns expanded in sorted
/// order; a pattern that matches nothing is an error.
pub fn expand(args: &[String]) -> Result<Vec<PathBuf>, DataError> {
    let mut paths = Vec::new();
    for arg in args {
        if !arg.contains(['*', '?', '[']) {
            paths.push(PathBuf::from(arg));
            continue;
        }
        let bad = DataError::Usage;
        let matches = glob::glob(arg).map_err(|e| bad(format!("input pattern {arg:?}: {e}")))?;
        let mut found: Vec<PathBuf> = matches
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("input pattern {arg:?}: {e}")))?;
        if found.is_empty() {
            return Err(bad(format!("input pattern {arg:?} matches no file")));
        }
        found.sort();
        paths.extend(found);
    }
    Ok(paths)
}

fn record_error(path: &Path, line: u64, message: impl Into<String>) -> DataError {
    DataError::Record {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Reads every input in order, handing batches of units to `send`; stops early when `send` returns false.
pub fn read_all(
    paths: &[PathBuf],
    mut send: impl FnMut(Vec<Unit>) -> bool,
) -> Result<(), DataError> {
    let mut batch = Batcher {
        units: Vec::new(),
        bytes: 0,
        send: &mut send,
        open: true,
    };
    for (index, path) in paths.iter().enumerate() {
        let (file, _) = crate::inputs::open_regular(path)?;
        match Kind::of(path) {
            Kind::Text => read_text(index, path, file, &mut batch)?,
            Kind::Jsonl => read_jsonl(index, path, file, &mut batch)?,
        }
        if !batch.open {
            return Ok(());
        }
    }
    batch.flush();
    Ok(())
}

struct Batcher<'a, F: FnMut(Vec<Unit>) -> bool> {
    units: Vec<Unit>,
    bytes: usize,
    send: &'a mut F,
    /// False once the receiver has gone.
    open: bool,
}

impl<F: FnMut(Vec<Unit>) -> bool> Batcher<'_, F> {
    fn push(&mut self, unit: Unit) {
        self.bytes += unit.bytes();
        self.units.push(unit);
        if self.bytes >= BATCH_BYTES {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.units.is_empty() && self.open {
            self.open = (self.send)(std::mem::take(&mut self.units));
        }
        self.units.clear();
        self.bytes = 0;
    }
}

fn read_text<F: FnMut(Vec<Unit>) -> bool>(
    index: usize,
    path: &Path,
    mut file: std::fs::File,
    batch: &mut Batcher<'_, F>,
) -> Result<(), DataError> {
    let io = |error| DataError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut pending: Vec<u8> = Vec::with_capacity(2 * READ_BYTES);
    let (mut line, mut offset, mut first, mut eof) = (1u64, 0u64, true, false);
    let mut block = vec![0u8; READ_BYTES];
    while !eof {
        let n = loop {
            match file.read(&mut block) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        };
        eof = n == 0;
        pending.extend_from_slice(&block[..n]);
        let valid = match std::str::from_utf8(&pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_some() || eof => {
                let at = e.valid_up_to();
                let lines = pending[..at].iter().filter(|&&b| b == b'\n').count() as u64;
                return Err(record_error(
                    path,
                    line + lines,
                    format!(
                        "not UTF-8 text: invalid byte at offset {} (a binary file?)",
                        offset + at as u64
                    ),
                ));
            }
            Err(e) => e.valid_up_to(),
        };
        let text = std::str::from_utf8(&pending[..valid]).expect("checked above");
        let mut used = 0;
        // Cut whole pieces while more than one piece's worth is here (the cut looks one byte past it), or
        // everything at the end of the file.
        while text.len() - used > TEXT_UNIT_BYTES || (eof && used < text.len()) {
            let rest = &text[used..];
            let n = cut(rest, TEXT_UNIT_BYTES);
            let last = eof && n == rest.len();
            batch.push(Unit {
                file: index,
                line,
                body: Body::Text {
                    text: rest[..n].to_string(),
                    first,
                    last,
                },
            });
            line += rest[..n].bytes().filter(|&b| b == b'\n').count() as u64;
            first = false;
            used += n;
            if !batch.open {
                return Ok(());
            }
        }
        offset += used as u64;
        pending.drain(..used);
    }
    Ok(())
}

fn read_jsonl<F: FnMut(Vec<Unit>) -> bool>(
    index: usize,
    path: &Path,
    file: std::fs::File,
    batch: &mut Batcher<'_, F>,
) -> Result<(), DataError> {
    let mut reader = BufReader::with_capacity(READ_BYTES, file);
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        line += 1;
        let n = (&mut reader)
            .take(LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|error| DataError::Io {
                path: path.to_path_buf(),
                error,
            })?;
        if n == 0 {
            return Ok(());
        }
        if buf.len() > LINE_BYTES_MAX {
            return Err(record_error(
                path,
                line,
                format!("the line is longer than {} MiB", LINE_BYTES_MAX >> 20),
            ));
        }
        let text = std::str::from_utf8(&buf).map_err(|e| {
            record_error(
                path,
                line,
                format!("not UTF-8: invalid byte at column {}", e.valid_up_to() + 1),
            )
        })?;
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        batch.push(Unit {
            file: index,
            line,
            body: Body::Record(text.to_string()),
        });
        if !batch.open {
            return Ok(());
        }
    }
}
