//! Whole-file writes: a unique temporary file beside the target, renamed over it only when complete, and
//! only over a regular file (or none). Dropped before [`AtomicFile::commit`], the temporary file is removed
//! and the target is as it was.

use super::OutputError;
use crate::inputs::kind_of;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Every temporary file strata writes ends with this (`.<name>.<pid>-<n>-<nonce>.strata-tmp`).
pub const TEMP_SUFFIX: &str = ".strata-tmp";
/// Attempts at a fresh temporary name before giving up (each is unique unless another process guessed it).
const TEMP_NAME_TRIES_MAX: u32 = 16;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file being written under a temporary name; [`AtomicFile::commit`] renames it over the target.
#[derive(Debug)]
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    /// Removes the temporary file if a signal ends the process first.
    cleanup: super::cleanup::Registration,
}

fn write_error(
    target: &Path,
    temp: &Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> OutputError {
    let (path, temp) = (target.to_path_buf(), temp.to_path_buf());
    move |error| OutputError::Write {
        path,
        temp,
        what,
        error,
    }
}

/// The target with its final symbolic link followed, checked to be a regular file or absent.
fn writable_target(path: &Path) -> Result<PathBuf, OutputError> {
    let not_regular = |kind| OutputError::NotRegular {
        key: "output".into(),
        path: path.into(),
        kind,
    };
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(path).map_err(|_| OutputError::DanglingLink {
                key: "output".into(),
                path: path.into(),
                target: std::fs::read_link(path).unwrap_or_default(),
            })?
        }
        _ => path.to_path_buf(),
    };
    match std::fs::metadata(&target) {
        Ok(m) if !m.is_file() => Err(not_regular(kind_of(m.file_type()))),
        _ => Ok(target),
    }
}

impl AtomicFile {
    /// Creates a fresh temporary file beside `path` (whose final symbolic link is followed), refusing a
    /// target that exists and is not a regular file. A replaced file's permissions carry over.
    pub fn create(path: &Path) -> Result<AtomicFile, OutputError> {
        let target = writable_target(path)?;
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_else(|| "output".into());
        let mode = std::fs::metadata(&target)
            .map(|m| m.permissions().mode() & 0o7777)
            .ok();
        let mut last = None;
        for _ in 0..TEMP_NAME_TRIES_MAX {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let temp = dir.join(format!(
                ".{name}.{}-{n}-{nonce:08x}{TEMP_SUFFIX}",
                std::process::id()
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&temp)
            {
                Ok(file) => {
                    let atomic = AtomicFile {
                        cleanup: super::cleanup::register(&temp),
                        target,
                        temp,
                        file: Some(file),
                    };
                    if let (Some(mode), Some(file)) = (mode, &atomic.file) {
                        file.set_permissions(std::fs::Permissions::from_mode(mode))
                            .map_err(write_error(
                                &atomic.target,
                                &atomic.temp,
                                "copying permissions",
                            ))?;
                    }
                    return Ok(atomic);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(write_error(&target, &temp, "creating the file")(e)),
            }
        }
        let e = last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into());
        Err(write_error(&target, &dir, "finding a free temporary name")(
            e,
        ))
    }

    /// The path that [`AtomicFile::commit`] replaces.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary path being written.
    pub fn temp(&self) -> &Path {
        &self.temp
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        // Only `commit`, which consumes `self`, takes the file.
        self.file
            .as_mut()
            .expect("the temporary file is open until commit")
    }

    /// An error about writing this file (for callers that write through [`AtomicFile::file`]).
    pub fn error(&self, what: &'static str, source: std::io::Error) -> OutputError {
        write_error(&self.target, &self.temp, what)(source)
    }

    /// Syncs the temporary file and renames it over the target, which must still be a regular file or
    /// absent; returns the file, open, now under the target's name.
    pub fn commit(mut self) -> Result<File, OutputError> {
        let Some(file) = self.file.take() else {
            return Err(self.error("committing", std::io::ErrorKind::NotFound.into()));
        };
        file.sync_all().map_err(|e| self.error("syncing", e))?;
        rename_over_regular(&self.temp, &self.target).map_err(|e| match e {
            RenameError::NotRegular(kind) => OutputError::NotRegular {
                key: "output".into(),
                path: self.target.clone(),
                kind,
            },
            RenameError::Io(e) => self.error("renaming over the target", e),
        })?;
        // The rename is done: nothing is left to remove.
        self.temp = PathBuf::new();
        self.cleanup = super::cleanup::Registration::none();
        sync_dir(&self.target);
        Ok(file)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

enum RenameError {
    NotRegular(&'static str),
    Io(std::io::Error),
}

/// Renames `from` over `to` if `to` is a regular file; creates `to` only if nothing appeared there meanwhile
/// (renameat2 with RENAME_NOREPLACE where the file system has it).
fn rename_over_regular(from: &Path, to: &Path) -> Result<(), RenameError> {
    match std::fs::symlink_metadata(to) {
        Ok(m) if m.is_file() => std::fs::rename(from, to).map_err(RenameError::Io),
        Ok(m) => Err(RenameError::NotRegular(kind_of(m.file_type()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => rename_no_replace(from, to),
        Err(e) => Err(RenameError::Io(e)),
    }
}

fn rename_no_replace(from: &Path, to: &Path) -> Result<(), RenameError> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes());
    let (Ok(cf), Ok(ct)) = (c(from), c(to)) else {
        return Err(RenameError::Io(std::io::ErrorKind::InvalidInput.into()));
    };
    // SAFETY: two valid NUL-terminated paths; renameat2 reads them and touches no other memory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // File systems without RENAME_NOREPLACE: the check above is all there is.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            std::fs::rename(from, to).map_err(RenameError::Io)
        }
        Some(libc::EEXIST) => rename_over_regular(from, to),
        _ => Err(RenameError::Io(e)),
    }
}

/// Makes the rename durable (best effort: some file systems refuse fsync on directories).
fn sync_dir(target: &Path) {
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
