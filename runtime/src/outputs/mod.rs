//! Output files: every path strata writes is checked before step 1, locked while the run lasts, and written
//! to a unique temporary name beside it that is renamed over it only when whole.
//!
//! [`prepare`] takes the run's inputs and outputs and, before any training work:
//! - resolves each output (symbolic links, `..`, a relative path against the working directory) and refuses
//!   one that is, or links to, an input or another output (same resolved path or same inode: hard links);
//! - refuses an output that exists and is not a regular file (a directory, a device, a FIFO), or whose
//!   directory does not exist;
//! - checks the free space of each file system against the outputs that will land on it;
//! - takes each output's lock ([`OutputLock`]): a second run on the same path fails at once, naming the
//!   process that holds it. Creating the lock file also proves the directory writable.
//!
//! An input may be a directory (a checkpoint being resumed or exported): no output may lie inside it.
//! A run's files are prepared together ([`prepare_run`]): the outputs this process writes, the files other
//! ranks of the run write (kept apart from these, neither counted nor locked here), and a directory of
//! checkpoints ([`ReadyDir`]: made if absent, locked for the run, no other output inside its checkpoints).
//!
//! Files are then written with [`AtomicFile`] (whole files: exported weights, the trace) or [`LineFile`]
//! (the metrics stream). Library code that writes outputs later should go through [`prepare`] at start-up
//! and [`AtomicFile`] when writing.

mod atomic;
pub mod cleanup;
mod dir;
mod lines;
mod lock;
mod space;
mod train;

pub use atomic::{AtomicFile, TEMP_SUFFIX};
pub use dir::{make_parent, MadeDirs, ReadyDir};
pub use lines::LineFile;
pub use lock::{OutputLock, LOCK_SUFFIX};
pub use space::free_bytes;
pub use train::{input_files, TraceFiles, TrainOutputs, EXPORT_KEY};

use crate::inputs::kind_of;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why an output cannot be written; every variant names the key (or the role) and the path.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    // OS errors are part of the messages, not `source`s, so a chain printed with `{:#}` says each once.
    #[error("{key} = {path}: {what}: {error}")]
    Io {
        key: String,
        path: PathBuf,
        what: String,
        error: std::io::Error,
    },
    #[error("{key} = {path} is {kind}; an output must be a regular file or absent")]
    NotRegular {
        key: String,
        path: PathBuf,
        kind: &'static str,
    },
    #[error(
        "{key} = {path} is a symbolic link to {target}, which does not exist; give the path itself"
    )]
    DanglingLink {
        key: String,
        path: PathBuf,
        target: PathBuf,
    },
    #[error("{key} = {path}: the directory {dir} does not exist")]
    NoDirectory {
        key: String,
        path: PathBuf,
        dir: PathBuf,
    },
    #[error("{key} = {path} is the input {input_key} = {input_path}{how}; strata never writes its inputs: choose another path")]
    IsInput {
        key: String,
        path: PathBuf,
        input_key: String,
        input_path: PathBuf,
        how: String,
    },
    #[error("{key} = {path} lies inside the input {input_key} = {input_path}; strata never writes its inputs: choose another path")]
    InsideInput {
        key: String,
        path: PathBuf,
        input_key: String,
        input_path: PathBuf,
    },
    /// `what`: " is a regular file", or ": DIR is a regular file" about a directory above `path`.
    #[error("{key} = {path}{what}; it must be a directory (or absent: it is made)")]
    NotDirectory {
        key: String,
        path: PathBuf,
        what: String,
    },
    #[error("{key} = {path} lies inside the checkpoint {checkpoint} of {dir_key} = {dir}, which saves and retention replace; choose another path")]
    InCheckpoint {
        key: String,
        path: PathBuf,
        checkpoint: PathBuf,
        dir_key: String,
        dir: PathBuf,
    },
    #[error("{key} = {path} and {other_key} = {other_path} are the same file{how}; give each output its own path")]
    SameOutput {
        key: String,
        path: PathBuf,
        other_key: String,
        other_path: PathBuf,
        how: String,
    },
    #[error("{keys}: {dir} has {free_bytes} bytes free, but {need_bytes} are needed ({detail}); free space or choose another directory")]
    NoSpace {
        keys: String,
        dir: PathBuf,
        free_bytes: u64,
        need_bytes: u64,
        detail: String,
    },
    #[error("{key} = {path} is in use by {holder}, which holds its lock {lock}; wait for that run to end or choose another path")]
    Locked {
        key: String,
        path: PathBuf,
        holder: String,
        lock: PathBuf,
    },
    #[error(
        "{path}: {what} failed in the temporary file {temp}: {error}; {path} was left as it was"
    )]
    Write {
        path: PathBuf,
        temp: PathBuf,
        what: &'static str,
        error: std::io::Error,
    },
}

/// A file the run reads: outputs may not alias it. A directory (a checkpoint) holds no output.
#[derive(Clone, Debug)]
pub struct InputFile {
    /// The config key (`data.train`) or role (`config file`) that names it.
    pub key: String,
    pub path: PathBuf,
}

/// Every file of a run, for [`prepare_run`].
#[derive(Clone, Debug, Default)]
pub struct RunFiles {
    pub inputs: Vec<InputFile>,
    /// The files this process writes: checked, counted against the free space, locked.
    pub outputs: Vec<OutputFile>,
    /// Files other processes of the run write (the other ranks' trace files): kept apart from the
    /// outputs where they can be resolved here; neither counted nor locked.
    pub elsewhere: Vec<OutputFile>,
    /// The directory of checkpoints this process writes (`size_bytes`: one checkpoint).
    pub checkpoints: Option<OutputFile>,
}

/// A run's outputs after checks, with their locks held.
#[derive(Debug, Default)]
pub struct ReadyRun {
    pub files: Vec<ReadyOutput>,
    pub checkpoints: Option<ReadyDir>,
}

/// A file the run will write, with the bytes it will need.
#[derive(Clone, Debug)]
pub struct OutputFile {
    pub key: String,
    pub path: PathBuf,
    /// What the free space must hold for it (an estimate where the exact size is not known yet).
    pub size_bytes: u64,
    /// How `size_bytes` was reckoned, for the message when it does not fit.
    pub size_detail: String,
}

/// An output path after checks, with its lock held.
#[derive(Debug)]
pub struct ReadyOutput {
    pub key: String,
    /// The path as given.
    pub path: PathBuf,
    /// Where the file will be written: `path` with every symbolic link and `..` resolved.
    pub target: PathBuf,
    _lock: OutputLock,
}

/// A path with its links resolved, the inode it names when it exists, and whether that is a directory.
#[derive(Clone, Debug)]
struct Resolved {
    target: PathBuf,
    inode: Option<(u64, u64)>,
    is_dir: bool,
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

fn inode(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// An input as far as it can be resolved (an input that does not exist fails where it is read).
fn resolve_input(path: &Path) -> Resolved {
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| absolute(path));
    let meta = std::fs::metadata(path).ok();
    Resolved {
        target,
        inode: meta.as_ref().map(inode),
        is_dir: meta.is_some_and(|m| m.is_dir()),
    }
}

/// An I/O error about output `key` = `path`, while doing `what`.
fn io_error<'a>(
    key: &'a str,
    path: &'a Path,
    what: &'a str,
) -> impl FnOnce(std::io::Error) -> OutputError + 'a {
    move |error| OutputError::Io {
        key: key.into(),
        path: path.into(),
        what: what.into(),
        error,
    }
}

/// The path an output names, fully resolved: the final component's link is followed (the file it names is
/// written, the link stays); a missing file is resolved through its directory, which must exist.
fn output_target(key: &str, path: &Path) -> Result<PathBuf, OutputError> {
    let io = |what| io_error(key, path, what);
    let abs = absolute(path);
    Ok(match std::fs::symlink_metadata(&abs) {
        Ok(meta) if meta.file_type().is_symlink() => match std::fs::canonicalize(&abs) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(OutputError::DanglingLink {
                    key: key.into(),
                    path: path.into(),
                    target: std::fs::read_link(&abs).unwrap_or_default(),
                })
            }
            Err(e) => return Err(io("cannot resolve its symbolic link")(e)),
        },
        Ok(_) => std::fs::canonicalize(&abs).map_err(io("cannot resolve the path"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
                return Err(OutputError::NotRegular {
                    key: key.into(),
                    path: path.into(),
                    kind: "a directory",
                });
            };
            match std::fs::canonicalize(parent) {
                Ok(dir) => dir.join(name),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(OutputError::NoDirectory {
                        key: key.into(),
                        path: path.into(),
                        dir: parent.into(),
                    })
                }
                Err(e) => return Err(io("cannot resolve its directory")(e)),
            }
        }
        Err(e) => return Err(io("cannot read its metadata")(e)),
    })
}

/// Resolves an output and checks it: a regular file or absent, in an existing directory.
fn resolve_output(key: &str, path: &Path) -> Result<Resolved, OutputError> {
    let io = |what| io_error(key, path, what);
    let target = output_target(key, path)?;
    let inode = match std::fs::metadata(&target) {
        Ok(meta) if meta.is_file() => Some(inode(&meta)),
        Ok(meta) => {
            return Err(OutputError::NotRegular {
                key: key.into(),
                path: path.into(),
                kind: kind_of(meta.file_type()),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("cannot read its metadata")(e)),
    };
    let dir = target.parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(Resolved {
            target,
            inode,
            is_dir: false,
        }),
        Ok(meta) => Err(OutputError::NotRegular {
            key: key.into(),
            path: dir.into(),
            kind: kind_of(meta.file_type()),
        }),
        Err(e) => Err(io("cannot read its directory's metadata")(e)),
    }
}

/// How two resolved paths are the same file: "" when they are the same path, a note otherwise.
fn same_file(a: &Resolved, b: &Resolved) -> Option<String> {
    if a.target == b.target {
        return Some(if a.inode.is_some() {
            String::new()
        } else {
            format!(" (both resolve to {})", a.target.display())
        });
    }
    match (a.inode, b.inode) {
        (Some(x), Some(y)) if x == y => Some(format!(
            " ({} and {} are hard links to one file)",
            a.target.display(),
            b.target.display()
        )),
        _ => None,
    }
}

/// Resolves and checks every output against the inputs and each other, checks free space, and locks each.
pub fn prepare(
    inputs: &[InputFile],
    outputs: &[OutputFile],
) -> Result<Vec<ReadyOutput>, OutputError> {
    let files = RunFiles {
        inputs: inputs.to_vec(),
        outputs: outputs.to_vec(),
        ..RunFiles::default()
    };
    prepare_run(&files).map(|ready| ready.files)
}

/// Refuses output `out` (resolved to `r`) when it is an input or lies inside an input directory.
fn apart_from_inputs(
    out: &OutputFile,
    r: &Resolved,
    inputs: &[(&InputFile, Resolved)],
) -> Result<(), OutputError> {
    for (input, ir) in inputs {
        if let Some(how) = same_file(r, ir) {
            return Err(OutputError::IsInput {
                key: out.key.clone(),
                path: out.path.clone(),
                input_key: input.key.clone(),
                input_path: input.path.clone(),
                how,
            });
        }
        if ir.is_dir && r.target.starts_with(&ir.target) {
            return Err(OutputError::InsideInput {
                key: out.key.clone(),
                path: out.path.clone(),
                input_key: input.key.clone(),
                input_path: input.path.clone(),
            });
        }
    }
    Ok(())
}

/// Resolves and checks every output of a run — against the inputs, each other, the files other ranks
/// write and the directory of checkpoints — then checks the free space, makes the directory of
/// checkpoints if it is absent, and takes every lock.
pub fn prepare_run(files: &RunFiles) -> Result<ReadyRun, OutputError> {
    let inputs: Vec<(&InputFile, Resolved)> = files
        .inputs
        .iter()
        .map(|i| (i, resolve_input(&i.path)))
        .collect();
    let checkpoints = match &files.checkpoints {
        Some(out) => {
            let d = dir::resolve(&out.key, &out.path)?;
            let r = Resolved {
                target: d.target.clone(),
                inode: None,
                is_dir: true,
            };
            apart_from_inputs(out, &r, &inputs)?;
            Some((out, d))
        }
        None => None,
    };
    // (output, resolved, written by this process)
    let mut resolved: Vec<(&OutputFile, Resolved, bool)> = Vec::new();
    let here = files.outputs.iter().map(|o| (o, true));
    for (out, written_here) in here.chain(files.elsewhere.iter().map(|o| (o, false))) {
        let r = match resolve_output(&out.key, &out.path) {
            Ok(r) => r,
            Err(e) if written_here => return Err(e),
            // Another rank's file that cannot be resolved here is that rank's to check.
            Err(_) => continue,
        };
        apart_from_inputs(out, &r, &inputs)?;
        if let Some((other, how)) = resolved
            .iter()
            .find_map(|(o, or, _)| same_file(&r, or).map(|how| (o, how)))
        {
            return Err(OutputError::SameOutput {
                key: other.key.clone(),
                path: other.path.clone(),
                other_key: out.key.clone(),
                other_path: out.path.clone(),
                how,
            });
        }
        if let Some((dir_out, d)) = &checkpoints {
            d.keep_apart(out, &r.target, dir_out)?;
        }
        resolved.push((out, r, written_here));
    }
    resolved.retain(|(_, _, written_here)| *written_here);
    let mut placed: Vec<(&OutputFile, &Path)> = resolved
        .iter()
        .map(|(o, r, _)| (*o, r.target.parent().unwrap_or(Path::new("/"))))
        .collect();
    if let Some((out, d)) = &checkpoints {
        placed.push((out, d.existing.as_path()));
    }
    space::check(&placed)?;
    let checkpoints = checkpoints
        .map(|(out, d)| ReadyDir::make(&out.key, &out.path, d))
        .transpose()?;
    let files = resolved
        .into_iter()
        .map(|(out, r, _)| {
            let lock = OutputLock::acquire(&out.key, &out.path, &r.target)?;
            Ok(ReadyOutput {
                key: out.key.clone(),
                path: out.path.clone(),
                target: r.target,
                _lock: lock,
            })
        })
        .collect::<Result<_, OutputError>>()?;
    Ok(ReadyRun { files, checkpoints })
}

#[cfg(test)]
mod tests;
