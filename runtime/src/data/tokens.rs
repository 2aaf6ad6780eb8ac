//! The llm.c token file: a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros),
//! then `count` little-endian uint16 tokens.
//!
//! Files are read with `pread` through bounded buffers, not memory-mapped: a mapped file that shrinks under
//! a running job (truncated, rewritten by another program) kills the process with SIGBUS at the first
//! access past its new end, with no message. Read, the same event is a short read, reported as an error
//! with the file and the byte offset. A SIGBUS handler could do the same for a map, but it would have to
//! jump out of arbitrary code in the middle of a batch; a `pread` of one row (seq_len + 1 tokens) costs
//! microseconds against a training step of milliseconds or more.

use super::DataError;
use crate::inputs::open_regular;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const MAGIC: i32 = 20240520;
pub const VERSION: i32 = 1;
pub const HEADER_BYTES: usize = 256 * 4;
/// Tokens read at once when the file is checked at open.
const SCAN_TOKENS_MAX: usize = 1 << 20;

/// A validated token file, read through `pread`.
pub struct TokenFile {
    path: PathBuf,
    file: File,
    count: usize,
    vocab_size: usize,
}

fn format_error(path: &Path, message: String) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        message,
    }
}

/// Reads exactly `buf.len()` bytes at `offset`; a file that ends first is an error naming the offset.
fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    count: usize,
) -> Result<(), DataError> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => {
                let now = match file.metadata() {
                    Ok(m) => format!("the file is now {} bytes long", m.len()),
                    Err(_) => format!("the file ended at byte offset {at}"),
                };
                return Err(format_error(
                    path,
                    format!(
                        "cannot read {} bytes at byte offset {offset}: {now}, but its header says {count} tokens ({} bytes): it was truncated or replaced while in use",
                        buf.len(),
                        HEADER_BYTES + 2 * count
                    ),
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                return Err(DataError::Io {
                    path: path.to_path_buf(),
                    error: std::io::Error::new(
                        error.kind(),
                        format!("reading {} bytes at offset {at}: {error}", buf.len() - done),
                    ),
                })
            }
        }
    }
    Ok(())
}

impl TokenFile {
    /// Opens and validates `path`: a regular file, the header, the length, and every token below `vocab_size`.
    pub fn open(path: &Path, vocab_size: usize) -> Result<TokenFile, DataError> {
        let err = |message: String| format_error(path, message);
        let (file, len) = open_regular(path)?;
        if len < HEADER_BYTES as u64 {
            return Err(err(format!(
                "{len} bytes is shorter than the {HEADER_BYTES}-byte header"
            )));
        }
        let mut header = [0u8; HEADER_BYTES];
        read_exact_at(&file, path, &mut header, 0, 0)?;
        let word = |i: usize| {
            i32::from_le_bytes([
                header[4 * i],
                header[4 * i + 1],
                header[4 * i + 2],
                header[4 * i + 3],
            ])
        };
        if word(0) != MAGIC {
            return Err(err(format!(
                "bad magic {} at offset 0 (expected {MAGIC}): not an llm.c token file",
                word(0)
            )));
        }
        if word(1) != VERSION {
            return Err(err(format!(
                "unsupported version {} at offset 4 (expected {VERSION})",
                word(1)
            )));
        }
        let count = usize::try_from(word(2))
            .map_err(|_| err(format!("negative token count {} at offset 8", word(2))))?;
        let want = (HEADER_BYTES + 2 * count) as u64;
        if len != want {
            return Err(err(format!(
                "header says {count} tokens ({want} bytes) but the file has {len} bytes{}",
                if len < want { ": truncated" } else { "" }
            )));
        }
        let tf = TokenFile {
            path: path.to_path_buf(),
            file,
            count,
            vocab_size,
        };
        tf.check_all()?;
        Ok(tf)
    }

    /// Reads every token once, in bounded chunks, checking each against the vocabulary.
    fn check_all(&self) -> Result<(), DataError> {
        let mut chunk = vec![0u16; SCAN_TOKENS_MAX.min(self.count)];
        let mut start = 0;
        while start < self.count {
            let n = chunk.len().min(self.count - start);
            self.read(start, &mut chunk[..n])?;
            start += n;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads tokens `[start, start + out.len())` into `out`, each checked against the vocabulary: a file
    /// changed since it was opened is an error naming the byte offset, never an out-of-range token.
    pub fn read(&self, start: usize, out: &mut [u16]) -> Result<(), DataError> {
        let end = start.saturating_add(out.len());
        if end > self.count {
            return Err(format_error(
                &self.path,
                format!("tokens {start}..{end} are past its {} tokens", self.count),
            ));
        }
        let offset = (HEADER_BYTES + 2 * start) as u64;
        read_exact_at(
            &self.file,
            &self.path,
            bytemuck::cast_slice_mut(out),
            offset,
            self.count,
        )?;
        for (i, t) in out.iter_mut().enumerate() {
            *t = u16::from_le(*t);
            if usize::from(*t) >= self.vocab_size {
                return Err(format_error(
                    &self.path,
                    format!(
                        "token {} at index {} (byte offset {}) is not below model.vocab_size = {}",
                        *t,
                        start + i,
                        offset + 2 * i as u64,
                        self.vocab_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Token `i`.
    pub fn token(&self, i: usize) -> Result<u16, DataError> {
        let mut one = [0u16];
        self.read(i, &mut one)?;
        Ok(one[0])
    }
}

/// Writes `tokens` as an llm.c token file: to a temporary file beside `path`, renamed over it when whole.
pub fn write_token_file(path: &Path, tokens: &[u16]) -> Result<(), DataError> {
    let count = i32::try_from(tokens.len()).map_err(|_| DataError::Format {
        path: path.to_path_buf(),
        message: format!(
            "{} tokens do not fit the format's int32 count",
            tokens.len()
        ),
    })?;
    let output = DataError::from;
    let mut atomic = crate::outputs::AtomicFile::create(path).map_err(output)?;
    let mut header = [0i32; 256];
    header[0] = MAGIC;
    header[1] = VERSION;
    header[2] = count;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + 2 * tokens.len());
    header
        .iter()
        .for_each(|h| bytes.extend_from_slice(&h.to_le_bytes()));
    tokens
        .iter()
        .for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
    if let Err(e) = atomic.file().write_all(&bytes) {
        return Err(output(atomic.error("writing the token file", e)));
    }
    atomic.commit().map(drop).map_err(output)
}
