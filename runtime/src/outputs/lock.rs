//! Exclusive outputs: `flock` on a lock file beside the output (`.<name>.strata-lock`), as the swap store
//! locks its files. The output itself is replaced by renames, so it cannot carry the lock; the lock file
//! holds the owner's pid, so a second run names the process it waits for. The lock is released by the
//! kernel when the process exits however it exits; the file is removed on drop.

use super::OutputError;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Every lock file strata creates ends with this.
pub const LOCK_SUFFIX: &str = ".strata-lock";
/// Opens of the lock file before giving up, when a previous holder removes it between open and lock.
const LOCK_TRIES_MAX: u32 = 8;
/// Bytes read from a lock file or /proc to name its holder.
const HOLDER_BYTES_MAX: u64 = 256;

/// The lock on one output path, held until dropped.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    _file: File,
    /// Removes the lock file if a signal ends the process first.
    _cleanup: super::cleanup::Registration,
}

/// The lock file of the output `target`.
pub fn lock_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}{LOCK_SUFFIX}"))
}

fn read_bounded(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(HOLDER_BYTES_MAX).read_to_string(&mut text);
    }
    text
}

/// "process 1234 (strata train …)", from the pid in the lock file and /proc.
fn describe_holder(lock: &Path) -> String {
    let Ok(pid) = read_bounded(lock).trim().parse::<u32>() else {
        return "another process".into();
    };
    let cmdline = read_bounded(Path::new(&format!("/proc/{pid}/cmdline")));
    let words: Vec<&str> = cmdline
        .split('\0')
        .filter(|w| !w.is_empty())
        .take(3)
        .collect();
    if words.is_empty() {
        format!("process {pid}")
    } else {
        format!("process {pid} ({} …)", words.join(" "))
    }
}

impl OutputLock {
    /// Takes the lock of the output `target` (named `key` = `path` in errors), or fails at once naming the
    /// process that holds it.
    pub fn acquire(key: &str, path: &Path, target: &Path) -> Result<OutputLock, OutputError> {
        OutputLock::acquire_file(key, path, &lock_path(target))
    }

    /// Takes the lock file `lock` for the output `key` = `path` (a directory's lock file is inside it).
    pub fn acquire_file(key: &str, path: &Path, lock: &Path) -> Result<OutputLock, OutputError> {
        let lock = lock.to_path_buf();
        let io = |what: String| {
            let lock = lock.clone();
            move |error| OutputError::Io {
                key: key.into(),
                path: path.into(),
                what: format!("{what} {}", lock.display()),
                error,
            }
        };
        for _ in 0..LOCK_TRIES_MAX {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&lock)
                .map_err(io("cannot create its lock file".into()))?;
            let meta = file.metadata().map_err(io("cannot stat".into()))?;
            if !meta.is_file() {
                return Err(OutputError::NotRegular {
                    key: format!("the lock file of {key}"),
                    path: lock,
                    kind: crate::inputs::kind_of(meta.file_type()),
                });
            }
            // SAFETY: flock on an fd we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(OutputError::Locked {
                        key: key.into(),
                        path: path.into(),
                        holder: describe_holder(&lock),
                        lock,
                    });
                }
                return Err(io("cannot lock".into())(e));
            }
            // The previous holder removes the file as it lets go: a lock on a removed file is no lock.
            let current = std::fs::symlink_metadata(&lock).map(|m| (m.dev(), m.ino()));
            if current.ok() != Some((meta.dev(), meta.ino())) {
                continue;
            }
            file.set_len(0)
                .and_then(|()| writeln!(file, "{}", std::process::id()))
                .map_err(io("cannot write".into()))?;
            return Ok(OutputLock {
                _cleanup: super::cleanup::register(&lock),
                path: lock,
                _file: file,
            });
        }
        Err(io("cannot keep hold of".into())(
            std::io::ErrorKind::WouldBlock.into(),
        ))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked (the file closes after this), so no one locks a file about to vanish.
        let _ = std::fs::remove_file(&self.path);
    }
}
