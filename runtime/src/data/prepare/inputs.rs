//! Reading the inputs as a stream of units, in bounded batches: a text file as pieces of at most
//! [`TEXT_UNIT_BYTES`] bytes (cut as [`super::pieces`] says, so the tokens are those of the whole text), a
//! JSON-lines file (`.jsonl`, `.ndjson`) as one unit per non-blank line, a parquet file (`.parquet`) as one unit
//! per row, read row group by row group and written as the JSON object its JSONL line would be. Only the batch
//! being read and those queued are in memory, whatever the input size.

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
    Parquet,
}

impl Kind {
    pub fn of(path: &Path) -> Kind {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson") => Kind::Jsonl,
            Some("parquet") => Kind::Parquet,
            _ => Kind::Text,
        }
    }
}

/// One unit of work, tokenized on its own.
pub struct Unit {
    /// Index of the input file.
    pub file: usize,
    /// Line (from 1) where the unit starts; of a parquet file, its row (from 1).
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
    /// One row of a parquet file as a JSON object; `input_bytes` is its share of the file's bytes.
    Row { json: String, input_bytes: u64 },
}

impl Unit {
    /// The bytes it holds.
    pub fn bytes(&self) -> usize {
        match &self.body {
            Body::Text { text, .. } => text.len(),
            Body::Record(r) => r.len() + 1,
            Body::Row { json, .. } => json.len(),
        }
    }

    /// The bytes of the input file it stands for.
    pub fn input_bytes(&self) -> u64 {
        match &self.body {
            Body::Row { input_bytes, .. } => *input_bytes,
            _ => self.bytes() as u64,
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
        let (file, size_bytes) = crate::inputs::open_regular(path)?;
        match Kind::of(path) {
            Kind::Text => read_text(index, path, file, &mut batch)?,
            Kind::Jsonl => read_jsonl(index, path, file, &mut batch)?,
            Kind::Parquet => read_parquet(index, path, file, size_bytes, &mut batch)?,
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

/// Reads a parquet file row group by row group (the record API decodes a row group's columns in batches), each
/// row as the JSON object of its columns: strings as strings, lists as arrays, structs as objects.
fn read_parquet<F: FnMut(Vec<Unit>) -> bool>(
    index: usize,
    path: &Path,
    file: std::fs::File,
    size_bytes: u64,
    batch: &mut Batcher<'_, F>,
) -> Result<(), DataError> {
    use parquet::basic::Compression;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(file).map_err(|e| DataError::Format {
        path: path.to_path_buf(),
        message: format!("not a parquet file, or a truncated one: {e}"),
    })?;
    // Only these codecs are built in: a file with another is refused whole, before any row is read.
    for group in reader.metadata().row_groups() {
        for column in group.columns() {
            let codec = match column.compression() {
                Compression::UNCOMPRESSED
                | Compression::SNAPPY
                | Compression::GZIP(_)
                | Compression::ZSTD(_) => continue,
                Compression::LZ4 | Compression::LZ4_RAW => "LZ4",
                Compression::BROTLI(_) => "Brotli",
                Compression::LZO => "LZO",
            };
            return Err(DataError::Format {
                path: path.to_path_buf(),
                message: format!(
                    "column {:?} is compressed with {codec}, which strata does not read (snappy, zstd, \
                     gzip or none; rewrite it, e.g. pyarrow's write_table(..., compression=\"zstd\"))",
                    column.column_path().string()
                ),
            });
        }
    }
    let rows_total = reader.metadata().file_metadata().num_rows().max(1) as u128;
    // The bytes of the first `rows` rows, for the progress: the file spread evenly over its rows.
    let share = |rows: u64| (size_bytes as u128 * rows as u128 / rows_total) as u64;
    let mut row = 0u64;
    for group in 0..reader.num_row_groups() {
        let row_error = |row: u64, e: parquet::errors::ParquetError| DataError::Row {
            path: path.to_path_buf(),
            row,
            message: format!("cannot read it (row group {group}): {e}"),
        };
        let group_reader = reader
            .get_row_group(group)
            .map_err(|e| row_error(row + 1, e))?;
        let rows = group_reader
            .get_row_iter(None)
            .map_err(|e| row_error(row + 1, e))?;
        for record in rows {
            let record = record.map_err(|e| row_error(row + 1, e))?;
            row += 1;
            batch.push(Unit {
                file: index,
                line: row,
                body: Body::Row {
                    json: record.to_json_value().to_string(),
                    input_bytes: share(row) - share(row - 1),
                },
            });
            if !batch.open {
                return Ok(());
            }
        }
    }
    Ok(())
}
