//! A directory of checkpoints (`train.checkpoint_dir`) as an output: checked before step 1 — a directory, or
//! absent and then made with its missing parents — and locked for the whole run by a lock file inside it
//! (`.strata-lock`), so two runs never write into one directory. No other output may lie inside one of its
//! checkpoints (`step-*`), which saves replace and retention removes. The directories made here are removed
//! again when the run ends (or a signal ends it) if nothing was saved in them.

use super::{OutputError, OutputFile, OutputLock};
use crate::inputs::kind_of;
use std::path::{Component, Path, PathBuf};

/// The lock file inside a locked directory.
pub const DIR_LOCK_NAME: &str = ".strata-lock";
/// What every checkpoint's directory name starts with (`step-NNNNNNNN`, and `step-NNNNNNNN.tmp` while saved).
const CHECKPOINT_PREFIX: &str = "step-";

/// A directory output's path resolved, before anything is made.
#[derive(Debug)]
pub(super) struct ResolvedDir {
    /// The directory, every symbolic link and `..` resolved (through its nearest existing ancestor).
    pub(super) target: PathBuf,
    /// The nearest existing ancestor of `target` (`target` itself when it exists).
    pub(super) existing: PathBuf,
    /// The missing directories below `existing`, outermost first.
    missing: Vec<PathBuf>,
}

/// Resolves a directory output: an existing directory (or a link to one), or a path whose nearest existing
/// ancestor is a directory.
pub(super) fn resolve(key: &str, path: &Path) -> Result<ResolvedDir, OutputError> {
    resolve_for(key, path, path)
}

/// [`resolve`] of `dir`, the directory that output `key` = `path` needs (itself, or the directory of a
/// file output); errors name `path`.
fn resolve_for(key: &str, path: &Path, dir: &Path) -> Result<ResolvedDir, OutputError> {
    let abs = super::absolute(dir);
    let io = |what: &str| {
        let what = what.to_string();
        move |error| OutputError::Io {
            key: key.into(),
            path: path.into(),
            what,
            error,
        }
    };
    let not_dir = |at: &Path, meta: std::fs::Metadata| OutputError::NotDirectory {
        key: key.into(),
        path: path.into(),
        what: if at == abs && dir == path {
            format!(" is {}", kind_of(meta.file_type()))
        } else {
            format!(": {} is {}", at.display(), kind_of(meta.file_type()))
        },
    };
    match std::fs::metadata(&abs) {
        Ok(meta) if meta.is_dir() => {
            let target = std::fs::canonicalize(&abs).map_err(io("cannot resolve the path"))?;
            return Ok(ResolvedDir {
                existing: target.clone(),
                target,
                missing: Vec::new(),
            });
        }
        Ok(meta) => return Err(not_dir(&abs, meta)),
        // Absent, or below something that is not a directory: the ancestors say which.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
        Err(e) => return Err(io("cannot read its metadata")(e)),
    }
    if std::fs::symlink_metadata(&abs).is_ok() {
        return Err(OutputError::DanglingLink {
            key: key.into(),
            path: path.into(),
            target: std::fs::read_link(&abs).unwrap_or_default(),
        });
    }
    let base = abs
        .ancestors()
        .skip(1)
        .find(|a| std::fs::symlink_metadata(a).is_ok())
        .unwrap_or(Path::new("/"));
    match std::fs::metadata(base) {
        Ok(meta) if meta.is_dir() => {}
        Ok(meta) => return Err(not_dir(base, meta)),
        Err(e) => return Err(io("cannot read the metadata of an enclosing directory")(e)),
    }
    let rest = abs.strip_prefix(base).unwrap_or(Path::new(""));
    if rest
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(io("cannot make it")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "`..` after a directory that does not exist",
        )));
    }
    let existing = std::fs::canonicalize(base).map_err(io("cannot resolve its directory"))?;
    let target = existing.join(rest);
    let mut missing: Vec<PathBuf> = target
        .ancestors()
        .take_while(|a| *a != existing)
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    Ok(ResolvedDir {
        target,
        existing,
        missing,
    })
}

impl ResolvedDir {
    /// The checkpoint of this directory that `target` lies in, if any.
    fn checkpoint_holding(&self, target: &Path) -> Option<PathBuf> {
        let rest = target.strip_prefix(&self.target).ok()?;
        let first = rest.components().next()?;
        let name = first.as_os_str().to_string_lossy();
        name.starts_with(CHECKPOINT_PREFIX)
            .then(|| self.target.join(first))
    }

    /// Refuses output `out` (resolved to `target`) when it is this directory or lies in one of its
    /// checkpoints; `dir` names the directory's key.
    pub(super) fn keep_apart(
        &self,
        out: &OutputFile,
        target: &Path,
        dir: &OutputFile,
    ) -> Result<(), OutputError> {
        if target == self.target {
            return Err(OutputError::SameOutput {
                key: dir.key.clone(),
                path: dir.path.clone(),
                other_key: out.key.clone(),
                other_path: out.path.clone(),
                how: String::new(),
            });
        }
        match self.checkpoint_holding(target) {
            Some(checkpoint) => Err(OutputError::InCheckpoint {
                key: out.key.clone(),
                path: out.path.clone(),
                checkpoint,
                dir_key: dir.key.clone(),
                dir: dir.path.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// Directories made for outputs, outermost first: removed when dropped, each only if empty (as a
/// signal's handler removes them), so a run that wrote nothing into them leaves nothing.
#[derive(Debug, Default)]
pub struct MadeDirs {
    made: Vec<PathBuf>,
    /// Removes the directories if a signal ends the process (each only when empty).
    _on_signal: Vec<super::cleanup::Registration>,
}

impl MadeDirs {
    /// Makes `dirs` in order (outermost first); those that appeared meanwhile are someone else's.
    fn make(key: &str, path: &Path, dirs: Vec<PathBuf>) -> Result<MadeDirs, OutputError> {
        let mut made = MadeDirs::default();
        for dir in dirs {
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    made._on_signal.push(super::cleanup::register(&dir));
                    made.made.push(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(error) => {
                    return Err(OutputError::Io {
                        key: key.into(),
                        path: path.into(),
                        what: format!("cannot make the directory {}", dir.display()),
                        error,
                    })
                }
            }
        }
        Ok(made)
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Makes the directory that will hold output `key` = `path` (a file), with its missing parents,
/// once the file's place is known not to be one of `inputs` or inside one; the directories are
/// removed again when the result is dropped if nothing was written into them.
pub fn make_parent(
    key: &str,
    path: &Path,
    inputs: &[super::InputFile],
) -> Result<MadeDirs, OutputError> {
    let abs = super::absolute(path);
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Ok(MadeDirs::default());
    };
    let dir = resolve_for(key, path, parent)?;
    let out = OutputFile {
        key: key.into(),
        path: path.into(),
        size_bytes: 0,
        size_detail: String::new(),
    };
    let target = super::Resolved {
        target: dir.target.join(name),
        inode: None,
        is_dir: false,
    };
    let inputs: Vec<_> = inputs
        .iter()
        .map(|i| (i, super::resolve_input(&i.path)))
        .collect();
    super::apart_from_inputs(&out, &target, &inputs)?;
    MadeDirs::make(key, path, dir.missing)
}

/// A directory output made (if it was absent) and locked for the run.
#[derive(Debug)]
pub struct ReadyDir {
    /// The path as given.
    pub path: PathBuf,
    /// The directory, resolved.
    pub target: PathBuf,
    _lock: OutputLock,
    /// Declared after the lock: dropped after it, so a directory left empty can be removed.
    _made: MadeDirs,
}

impl ReadyDir {
    /// Makes the missing directories of `resolved` and takes the directory's lock.
    pub(super) fn make(
        key: &str,
        path: &Path,
        resolved: ResolvedDir,
    ) -> Result<ReadyDir, OutputError> {
        let made = MadeDirs::make(key, path, resolved.missing)?;
        let lock = OutputLock::acquire_file(key, path, &resolved.target.join(DIR_LOCK_NAME))?;
        Ok(ReadyDir {
            path: path.into(),
            target: resolved.target,
            _lock: lock,
            _made: made,
        })
    }
}
