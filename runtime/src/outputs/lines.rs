//! A stream of lines (the metrics file): written to a temporary file until the first line is whole, then
//! renamed over the target and appended to there, so it can be watched while the run goes on.
//!
//! A run that fails before its first line leaves the previous file whole. A failed write (a full disk) cuts
//! the file back to its last whole line, so the file never ends in half a record.
//!
//! A resumed run continues the file ([`LineFile::continuing`]): the temporary file starts with the old
//! file's lines up to the checkpoint's step, so that at the first new line the file is the whole run.

use super::{AtomicFile, OutputError};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

#[derive(Debug)]
enum State {
    /// No new line yet: the target is untouched; the temporary file holds `kept_bytes` of earlier lines.
    Pending(AtomicFile, u64),
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
            state: State::Pending(atomic, 0),
        })
    }

    /// Starts a stream that continues the file at `path`: its lines whose JSON `"step"` is at most
    /// `last_step` are kept (in order), the others dropped, and the file is replaced with them and the
    /// new lines at the first new line. Returns the stream and the lines kept and dropped.
    pub fn continuing(
        key: &str,
        path: &Path,
        last_step: usize,
    ) -> Result<(LineFile, usize, usize), OutputError> {
        let mut atomic = AtomicFile::create(path)?;
        let old = match File::open(atomic.target()) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => {
                return Err(OutputError::Io {
                    key: key.into(),
                    path: path.into(),
                    what: "cannot read the lines to continue".into(),
                    error,
                })
            }
        };
        let (mut kept, mut dropped, mut kept_bytes) = (0, 0, 0u64);
        let read_error = |error| OutputError::Io {
            key: key.into(),
            path: path.into(),
            what: "cannot read the lines to continue".into(),
            error,
        };
        for line in old.map(|f| BufReader::new(f).lines()).into_iter().flatten() {
            let line = line.map_err(read_error)?;
            let step = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
            if step.is_some_and(|s| s <= last_step as u64) {
                let written = atomic
                    .file()
                    .write_all(line.as_bytes())
                    .and_then(|()| atomic.file().write_all(b"\n"));
                written.map_err(|e| atomic.error("copying the earlier lines", e))?;
                kept += 1;
                kept_bytes += line.len() as u64 + 1;
            } else {
                dropped += 1;
            }
        }
        let lines = LineFile {
            key: key.into(),
            target: atomic.target().to_path_buf(),
            state: State::Pending(atomic, kept_bytes),
        };
        Ok((lines, kept, dropped))
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
            State::Pending(mut atomic, kept_bytes) => {
                let written = atomic.file().write_all(&bytes);
                if let Err(e) = written {
                    return Err(atomic.error("writing the first line", e));
                }
                let file = atomic.commit()?;
                self.state = State::Live {
                    file,
                    whole_bytes: kept_bytes + bytes.len() as u64,
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
