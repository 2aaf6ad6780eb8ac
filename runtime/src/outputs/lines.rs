//! A stream of lines (the metrics file): written to a temporary file until the first line is whole, then
//! renamed over the target and appended to there, so it can be watched while the run goes on.
//!
//! A run that fails before its first line leaves the previous file whole. A failed write (a full disk) cuts
//! the file back to its last whole line, so the file never ends in half a record.

use super::{AtomicFile, OutputError};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug)]
enum State {
    /// No line yet: the target is untouched.
    Pending(AtomicFile),
    /// Renamed into place; `whole_bytes` is the length up to the last whole line.
    Live { file: File, whole_bytes: u64 },
    /// A write failed; nothing more is written.
    Failed,
}

/// A line-oriented output file.
#[derive(Debug)]
pub struct LineFile {
    /// The config key that names the file, for errors.
    key: String,
    target: PathBuf,
    state: State,
}

impl LineFile {
    /// Starts a stream that will replace `path` (final symbolic link followed) at its first line.
    pub fn create(key: &str, path: &Path) -> Result<LineFile, OutputError> {
        let atomic = AtomicFile::create(path)?;
        Ok(LineFile {
            key: key.into(),
            target: atomic.target().to_path_buf(),
            state: State::Pending(atomic),
        })
    }

    /// The file the lines go to.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Appends `line` and a newline in one write; the first whole line puts the file in place.
    pub fn write_line(&mut self, line: &str) -> Result<(), OutputError> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        match std::mem::replace(&mut self.state, State::Failed) {
            State::Pending(mut atomic) => {
                let written = atomic.file().write_all(&bytes);
                if let Err(e) = written {
                    return Err(atomic.error("writing the first line", e));
                }
                let file = atomic.commit()?;
                self.state = State::Live {
                    file,
                    whole_bytes: bytes.len() as u64,
                };
                Ok(())
            }
            State::Live {
                mut file,
                whole_bytes,
            } => match file.write_all(&bytes) {
                Ok(()) => {
                    self.state = State::Live {
                        file,
                        whole_bytes: whole_bytes + bytes.len() as u64,
                    };
                    Ok(())
                }
                Err(error) => {
                    // Best effort: a file system that refuses the write may refuse this too.
                    let _ = file.set_len(whole_bytes);
                    Err(OutputError::Io {
                        key: self.key.clone(),
                        path: self.target.clone(),
                        what: format!("writing at byte offset {whole_bytes} failed; the file keeps its {whole_bytes} bytes of whole lines"),
                        error,
                    })
                }
            },
            State::Failed => Err(OutputError::Io {
                key: self.key.clone(),
                path: self.target.clone(),
                what: "an earlier write failed".into(),
                error: std::io::ErrorKind::BrokenPipe.into(),
            }),
        }
    }
}
