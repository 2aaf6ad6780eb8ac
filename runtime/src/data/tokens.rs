//! The llm.c token file: a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros),
//! then `count` little-endian uint16 tokens. Files are memory-mapped.

use super::DataError;
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: i32 = 20240520;
pub const VERSION: i32 = 1;
pub const HEADER_BYTES: usize = 256 * 4;

/// A validated, memory-mapped token file.
pub struct TokenFile {
    path: PathBuf,
    map: Mmap,
    count: usize,
}

impl TokenFile {
    /// Opens and validates `path`: header, length, and every token below `vocab_size`.
    pub fn open(path: &Path, vocab_size: usize) -> Result<TokenFile, DataError> {
        let err = |message: String| DataError::Format {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only; strata never writes the file while training, and a concurrent writer
        // elsewhere could at worst change token values, which are bounds-checked on use.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if map.len() < HEADER_BYTES {
            return Err(err(format!(
                "{} bytes is shorter than the {HEADER_BYTES}-byte header",
                map.len()
            )));
        }
        let header = |i: usize| {
            i32::from_le_bytes([map[4 * i], map[4 * i + 1], map[4 * i + 2], map[4 * i + 3]])
        };
        if header(0) != MAGIC {
            return Err(err(format!(
                "bad magic {} at offset 0 (expected {MAGIC}): not an llm.c token file",
                header(0)
            )));
        }
        if header(1) != VERSION {
            return Err(err(format!(
                "unsupported version {} at offset 4 (expected {VERSION})",
                header(1)
            )));
        }
        let count = usize::try_from(header(2))
            .map_err(|_| err(format!("negative token count {}", header(2))))?;
        let want = HEADER_BYTES + 2 * count;
        if map.len() != want {
            return Err(err(format!(
                "header says {count} tokens ({want} bytes) but the file has {} bytes{}",
                map.len(),
                if map.len() < want { ": truncated" } else { "" }
            )));
        }
        let tf = TokenFile {
            path: path.to_path_buf(),
            map,
            count,
        };
        if let Some(i) = (0..count).find(|&i| tf.token(i) as usize >= vocab_size) {
            return Err(err(format!(
                "token {} at index {i} (byte offset {}) is not below model.vocab_size = {vocab_size}",
                tf.token(i),
                HEADER_BYTES + 2 * i
            )));
        }
        Ok(tf)
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

    pub fn token(&self, i: usize) -> u16 {
        let o = HEADER_BYTES + 2 * i;
        u16::from_le_bytes([self.map[o], self.map[o + 1]])
    }
}

/// Writes `tokens` as an llm.c token file.
pub fn write_token_file(path: &Path, tokens: &[u16]) -> Result<(), DataError> {
    let io = |source| DataError::Write {
        path: path.to_path_buf(),
        source,
    };
    let count = i32::try_from(tokens.len()).map_err(|_| DataError::Format {
        path: path.to_path_buf(),
        message: format!(
            "{} tokens do not fit the format's int32 count",
            tokens.len()
        ),
    })?;
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    let mut header = [0i32; 256];
    header[0] = MAGIC;
    header[1] = VERSION;
    header[2] = count;
    for h in header {
        w.write_all(&h.to_le_bytes()).map_err(io)?;
    }
    for t in tokens {
        w.write_all(&t.to_le_bytes()).map_err(io)?;
    }
    w.flush().map_err(io)
}
