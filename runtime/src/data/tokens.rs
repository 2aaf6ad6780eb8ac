//! Token files: llm.c's format and strata's extension of it for 32-bit tokens and a loss mask.
//!
//! A header of 256 little-endian int32, then the tokens, then (when the header says so) the mask:
//! - llm.c's GPT-2 files: magic 20240520, version 1, token count N; then N uint16 tokens.
//! - llm.c's Llama 3 files: magic 20240801, version 7, token count N; then N uint32 tokens (read only).
//! - strata's: magic 20240520, version 2, token count N, bytes per token (2 or 4) at word 3, flags at word 4
//!   (bit 0: a loss mask follows); then N tokens of that width, then, with the mask flag, N bytes, one per
//!   token: 1 when the token is a target the loss counts, 0 when it is not (a prompt, a separator).
//!
//! strata writes version 1 whenever it can (uint16 tokens and no mask), so llm.c reads those files too.
//!
//! Files are read with `pread` through bounded buffers, not memory-mapped: a mapped file that shrinks under
//! a running job (truncated, rewritten by another program) kills the process with SIGBUS at the first
//! access past its new end, with no message. Read, the same event is a short read, reported as an error
//! with the file and the byte offset. A SIGBUS handler could do the same for a map, but it would have to
//! jump out of arbitrary code in the middle of a batch; a `pread` of one row (seq_len + 1 tokens) costs
//! microseconds against a training step of milliseconds or more.

use super::DataError;
use crate::inputs::open_regular;
use crate::outputs::AtomicFile;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const MAGIC: i32 = 20240520;
/// llm.c's version for uint16 tokens without a mask.
pub const VERSION_U16: i32 = 1;
/// strata's version: bytes per token at header word 3, flags at word 4.
pub const VERSION_STRATA: i32 = 2;
/// llm.c's magic and version for its Llama 3 files (uint32 tokens).
pub const LLMC_LLAMA3_MAGIC: i32 = 20240801;
pub const LLMC_LLAMA3_VERSION: i32 = 7;
/// Flag bit (header word 4, version 2): a loss mask of one byte per token follows the tokens.
pub const FLAG_MASK: i32 = 1;
pub const HEADER_BYTES: usize = 256 * 4;
/// Tokens read at once when the file is checked at open.
const SCAN_TOKENS_MAX: usize = 1 << 20;
/// Bytes the writer buffers before a write.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// What a header says: how many tokens, how wide, and whether a mask follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub count: usize,
    /// 2 or 4.
    pub token_bytes: usize,
    pub masked: bool,
}

impl Layout {
    /// The narrowest layout for ids below `vocab_size`.
    pub fn for_vocab(vocab_size: usize, masked: bool) -> Layout {
        Layout {
            count: 0,
            token_bytes: if vocab_size <= 1 << 16 { 2 } else { 4 },
            masked,
        }
    }

    pub fn file_bytes(&self) -> u64 {
        (HEADER_BYTES + self.count * (self.token_bytes + usize::from(self.masked))) as u64
    }

    fn token_offset(&self, index: usize) -> u64 {
        (HEADER_BYTES + index * self.token_bytes) as u64
    }

    fn mask_offset(&self, index: usize) -> u64 {
        (HEADER_BYTES + self.count * self.token_bytes + index) as u64
    }

    /// The header strata writes: version 1 (llm.c's) for uint16 tokens without a mask, else version 2.
    pub fn header(&self, path: &Path) -> Result<[u8; HEADER_BYTES], DataError> {
        let count = i32::try_from(self.count).map_err(|_| DataError::Format {
            path: path.to_path_buf(),
            message: format!(
                "{} tokens do not fit the format's int32 count: split the input",
                self.count
            ),
        })?;
        let mut words = [0i32; 256];
        words[0] = MAGIC;
        words[2] = count;
        if self.token_bytes == 2 && !self.masked {
            words[1] = VERSION_U16;
        } else {
            words[1] = VERSION_STRATA;
            words[3] = self.token_bytes as i32;
            words[4] = if self.masked { FLAG_MASK } else { 0 };
        }
        let mut bytes = [0u8; HEADER_BYTES];
        for (chunk, w) in bytes.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Ok(bytes)
    }

    /// Reads a header; the error says which word is wrong and what was expected.
    fn parse(header: &[u8; HEADER_BYTES]) -> Result<Layout, String> {
        let word = |i: usize| {
            i32::from_le_bytes([
                header[4 * i],
                header[4 * i + 1],
                header[4 * i + 2],
                header[4 * i + 3],
            ])
        };
        let count = || {
            usize::try_from(word(2))
                .map_err(|_| format!("negative token count {} at offset 8", word(2)))
        };
        match (word(0), word(1)) {
            (MAGIC, VERSION_U16) => Ok(Layout {
                count: count()?,
                token_bytes: 2,
                masked: false,
            }),
            (MAGIC, VERSION_STRATA) => {
                let token_bytes = match word(3) {
                    2 => 2,
                    4 => 4,
                    w => {
                        return Err(format!(
                            "{w} bytes per token at offset 12 (version 2 has 2 or 4)"
                        ))
                    }
                };
                let flags = word(4);
                if flags & !FLAG_MASK != 0 {
                    return Err(format!(
                        "unknown flags {flags:#x} at offset 16 (version 2 knows {FLAG_MASK:#x}: a loss mask)"
                    ));
                }
                Ok(Layout {
                    count: count()?,
                    token_bytes,
                    masked: flags & FLAG_MASK != 0,
                })
            }
            (LLMC_LLAMA3_MAGIC, LLMC_LLAMA3_VERSION) => Ok(Layout {
                count: count()?,
                token_bytes: 4,
                masked: false,
            }),
            (MAGIC, v) => Err(format!(
                "unsupported version {v} at offset 4 (expected {VERSION_U16} or {VERSION_STRATA})"
            )),
            (LLMC_LLAMA3_MAGIC, v) => Err(format!(
                "unsupported version {v} at offset 4 (expected {LLMC_LLAMA3_VERSION} with magic {LLMC_LLAMA3_MAGIC})"
            )),
            (m, _) => Err(format!(
                "bad magic {m} at offset 0 (expected {MAGIC}): not an llm.c token file"
            )),
        }
    }
}

/// A validated token file, read through `pread`.
pub struct TokenFile {
    path: PathBuf,
    file: File,
    layout: Layout,
    vocab_size: usize,
}

fn format_error(path: &Path, message: String) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        message,
    }
}

impl TokenFile {
    /// Opens and validates `path`: a regular file, the header, the length, every token below `vocab_size`
    /// and every mask byte 0 or 1.
    pub fn open(path: &Path, vocab_size: usize) -> Result<TokenFile, DataError> {
        let err = |message: String| format_error(path, message);
        let (file, len) = open_regular(path)?;
        if len < HEADER_BYTES as u64 {
            return Err(err(format!(
                "{len} bytes is shorter than the {HEADER_BYTES}-byte header"
            )));
        }
        let mut header = [0u8; HEADER_BYTES];
        let header_only = Layout {
            count: 0,
            token_bytes: 2,
            masked: false,
        };
        read_exact_at(&file, path, &mut header, 0, &header_only)?;
        let layout = Layout::parse(&header).map_err(err)?;
        let want = layout.file_bytes();
        if len != want {
            let mask = if layout.masked { " and their mask" } else { "" };
            return Err(err(format!(
                "header says {} tokens of {} bytes{mask} ({want} bytes) but the file has {len} bytes{}",
                layout.count,
                layout.token_bytes,
                if len < want { ": truncated" } else { "" }
            )));
        }
        let tf = TokenFile {
            path: path.to_path_buf(),
            file,
            layout,
            vocab_size,
        };
        tf.check_all()?;
        Ok(tf)
    }

    /// Reads every token (and mask byte) once, in bounded chunks, checking each.
    fn check_all(&self) -> Result<(), DataError> {
        let n = SCAN_TOKENS_MAX.min(self.layout.count);
        let (mut tokens, mut mask) = (vec![0u32; n], vec![0u8; n]);
        let mut start = 0;
        while start < self.layout.count {
            let n = n.min(self.layout.count - start);
            self.read(start, &mut tokens[..n])?;
            if self.layout.masked {
                self.read_mask(start, &mut mask[..n])?;
            }
            start += n;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.layout.count
    }

    pub fn is_empty(&self) -> bool {
        self.layout.count == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Reads tokens `[start, start + out.len())` into `out`, each checked against the vocabulary: a file
    /// changed since it was opened is an error naming the byte offset, never an out-of-range token.
    pub fn read(&self, start: usize, out: &mut [u32]) -> Result<(), DataError> {
        self.check_range(start, out.len())?;
        let (n, width) = (out.len(), self.layout.token_bytes);
        let offset = self.layout.token_offset(start);
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        read_exact_at(
            &self.file,
            &self.path,
            &mut bytes[..n * width],
            offset,
            &self.layout,
        )?;
        if width == 2 {
            // Widen in place from the back: token i's two bytes [2i, 2i+2) lie at or before its four [4i, 4i+4),
            // and tokens below i are not yet overwritten.
            for i in (0..n).rev() {
                let v = u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
                bytes[4 * i..4 * i + 4].copy_from_slice(&u32::from(v).to_ne_bytes());
            }
        } else {
            out.iter_mut().for_each(|t| *t = u32::from_le(*t));
        }
        if let Some((i, &t)) = out
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.vocab_size)
        {
            return Err(format_error(
                &self.path,
                format!(
                    "token {t} at index {} (byte offset {}) is not below model.vocab_size = {}",
                    start + i,
                    offset + (width * i) as u64,
                    self.vocab_size
                ),
            ));
        }
        Ok(())
    }

    /// Reads mask bytes `[start, start + out.len())` (1: the token is a target, 0: it is not); each must be
    /// 0 or 1. A file without a mask reads as all ones.
    pub fn read_mask(&self, start: usize, out: &mut [u8]) -> Result<(), DataError> {
        self.check_range(start, out.len())?;
        if !self.layout.masked {
            out.fill(1);
            return Ok(());
        }
        let offset = self.layout.mask_offset(start);
        read_exact_at(&self.file, &self.path, out, offset, &self.layout)?;
        if let Some((i, &m)) = out.iter().enumerate().find(|(_, &m)| m > 1) {
            return Err(format_error(
                &self.path,
                format!(
                    "mask byte {m} at index {} (byte offset {}) is not 0 or 1",
                    start + i,
                    offset + i as u64
                ),
            ));
        }
        Ok(())
    }

    fn check_range(&self, start: usize, len: usize) -> Result<(), DataError> {
        let end = start.saturating_add(len);
        if end > self.layout.count {
            return Err(format_error(
                &self.path,
                format!(
                    "tokens {start}..{end} are past its {} tokens",
                    self.layout.count
                ),
            ));
        }
        Ok(())
    }

    /// Token `i`.
    pub fn token(&self, i: usize) -> Result<u32, DataError> {
        let mut one = [0u32];
        self.read(i, &mut one)?;
        Ok(one[0])
    }
}

/// Reads exactly `buf.len()` bytes at `offset`; a file that ends first is an error naming the offset.
fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    layout: &Layout,
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
                        "cannot read {} bytes at byte offset {offset}: {now}, but its header says {} tokens ({} bytes): it was truncated or replaced while in use",
                        buf.len(),
                        layout.count,
                        layout.file_bytes()
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

/// Writes a token file as tokens arrive: the tokens go to a temporary file beside the target, the mask to a
/// second one; [`TokenWriter::finish`] appends the mask (when some token is masked), writes the header and
/// renames the file over the target. Dropped unfinished, it leaves nothing behind.
pub struct TokenWriter {
    file: AtomicFile,
    /// The mask while it is written; never committed, so dropping it removes it.
    mask_file: AtomicFile,
    layout: Layout,
    /// Whether any mask byte is 0 (else the mask is left out).
    any_masked: bool,
    tokens_buf: Vec<u8>,
    mask_buf: Vec<u8>,
}

impl TokenWriter {
    /// Starts a file for ids below `vocab_size` at `path` (checked and locked by the caller).
    pub fn create(path: &Path, vocab_size: usize) -> Result<TokenWriter, DataError> {
        let mut file = AtomicFile::create(path)?;
        let mut mask_path = path.as_os_str().to_owned();
        mask_path.push(".mask");
        let mask_file = AtomicFile::create(Path::new(&mask_path))?;
        // The header's place; written last, when the count is known.
        if let Err(e) = file.file().write_all(&[0u8; HEADER_BYTES]) {
            return Err(file.error("writing the header", e).into());
        }
        Ok(TokenWriter {
            file,
            mask_file,
            layout: Layout::for_vocab(vocab_size, false),
            any_masked: false,
            tokens_buf: Vec::with_capacity(WRITE_BUFFER_BYTES),
            mask_buf: Vec::with_capacity(WRITE_BUFFER_BYTES),
        })
    }

    pub fn count(&self) -> usize {
        self.layout.count
    }

    /// The file this writer replaces.
    pub fn path(&self) -> &Path {
        self.file.target()
    }

    /// Appends `tokens`, with their mask bytes (`None`: every token counts).
    pub fn push(&mut self, tokens: &[u32], mask: Option<&[u8]>) -> Result<(), DataError> {
        if let Some(m) = mask {
            assert_eq!(m.len(), tokens.len());
            self.any_masked |= m.contains(&0);
            self.mask_buf.extend_from_slice(m);
        } else {
            self.mask_buf.resize(self.mask_buf.len() + tokens.len(), 1);
        }
        if self.layout.token_bytes == 2 {
            for &t in tokens {
                let t = u16::try_from(t).expect("ids fit the width chosen for the vocabulary");
                self.tokens_buf.extend_from_slice(&t.to_le_bytes());
            }
        } else {
            tokens
                .iter()
                .for_each(|t| self.tokens_buf.extend_from_slice(&t.to_le_bytes()));
        }
        self.layout.count += tokens.len();
        if self.tokens_buf.len() >= WRITE_BUFFER_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DataError> {
        if let Err(e) = self.file.file().write_all(&self.tokens_buf) {
            return Err(self.file.error("writing tokens", e).into());
        }
        if let Err(e) = self.mask_file.file().write_all(&self.mask_buf) {
            return Err(self.mask_file.error("writing the mask", e).into());
        }
        self.tokens_buf.clear();
        self.mask_buf.clear();
        Ok(())
    }

    /// Completes the file and renames it over the target; returns its layout.
    pub fn finish(self) -> Result<Layout, DataError> {
        self.seal()?.commit()
    }

    /// Completes the file under its temporary name: the mask appended, the header written, ready to
    /// [`Sealed::commit`] (so that several files can be completed before any replaces its target).
    pub fn seal(mut self) -> Result<Sealed, DataError> {
        self.flush()?;
        self.layout.masked = self.any_masked;
        let header = self.layout.header(self.file.target())?;
        if self.layout.masked {
            let copied = self.append_mask();
            copied.map_err(|e| DataError::from(self.file.error("appending the mask", e)))?;
        }
        let file = self.file.file();
        let written = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header));
        written.map_err(|e| DataError::from(self.file.error("writing the header", e)))?;
        Ok(Sealed {
            file: self.file,
            layout: self.layout,
        })
    }

    fn append_mask(&mut self) -> std::io::Result<()> {
        let mut mask = File::open(self.mask_file.temp())?;
        let file = self.file.file();
        file.seek(SeekFrom::End(0))?;
        let mut buf = vec![0u8; WRITE_BUFFER_BYTES];
        loop {
            let n = mask.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            file.write_all(&buf[..n])?;
        }
    }
}

/// A complete token file under its temporary name.
pub struct Sealed {
    file: AtomicFile,
    pub layout: Layout,
}

impl Sealed {
    /// Renames the file over its target.
    pub fn commit(self) -> Result<Layout, DataError> {
        self.file.commit()?;
        Ok(self.layout)
    }
}

/// Writes `tokens` as a token file (uint16 or uint32, as `vocab_size` needs) at `path`, atomically.
pub fn write_token_file(
    path: &Path,
    tokens: &[u32],
    mask: Option<&[u8]>,
    vocab_size: usize,
) -> Result<Layout, DataError> {
    let mut w = TokenWriter::create(path, vocab_size)?;
    w.push(tokens, mask)?;
    w.finish()
}
