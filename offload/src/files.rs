//! Swap files: one per path, opened once (O_DIRECT where allowed), locked, preallocated.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::AioConfig;
use crate::error::{IoOp, OffloadError, Result};
use crate::sys::warn_once;

pub(crate) struct SwapFile {
    file: File,
    path: PathBuf,
    direct: bool,
}

/// The store's files, shared by the engine's threads (for fds and for paths in errors).
pub(crate) struct SwapFiles {
    files: Vec<SwapFile>,
}

fn open_error(path: &Path, what: &str, source: io::Error) -> OffloadError {
    OffloadError::Os {
        what: format!("{what} {}", path.display()),
        source,
    }
}

impl SwapFile {
    /// Open (or reuse) `dir/<file_name>`; fall back to buffered I/O where O_DIRECT is refused.
    pub(crate) fn open(dir: &Path, cfg: &AioConfig) -> Result<SwapFile> {
        std::fs::create_dir_all(dir).map_err(|e| open_error(dir, "create directory", e))?;
        let path = dir.join(&cfg.file_name);
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(&path)
        };
        let (file, direct) = if cfg.use_direct {
            match open(libc::O_DIRECT) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    warn_once(
                        "o_direct",
                        &format!(
                            "O_DIRECT refused on {} ({e}); using buffered I/O (the page cache is dropped before timed reads)",
                            path.display()
                        ),
                    );
                    (open(0).map_err(|e| open_error(&path, "open", e))?, false)
                }
                Err(e) => return Err(open_error(&path, "open", e)),
            }
        } else {
            (open(0).map_err(|e| open_error(&path, "open", e))?, false)
        };
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(open_error(
                &path,
                "lock (another process, or another swap store of this one, holds it: give each run its own nvme_path directory)",
                e,
            ));
        }
        Ok(SwapFile { file, path, direct })
    }

    pub(crate) fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| open_error(&self.path, "stat", e))
    }

    pub(crate) fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|source| OffloadError::Io {
            key: String::new(),
            op: IoOp::Truncate,
            path: self.path.clone(),
            offset: len,
            len: 0,
            source,
        })
    }

    /// Reserve `[offset, offset + len)` on disk (the file grows; no data is written).
    pub(crate) fn fallocate(&self, key: &str, offset: u64, len: u64) -> Result<()> {
        let err = |source| OffloadError::Io {
            key: key.to_string(),
            op: IoOp::Fallocate,
            path: self.path.clone(),
            offset,
            len,
            source,
        };
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(err(io::Error::from_raw_os_error(libc::EFBIG)));
        };
        loop {
            // SAFETY: fallocate on an fd we own; no memory is involved.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, off, n) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // File systems without fallocate: extend the file instead (sparse).
                Some(libc::EOPNOTSUPP) => {
                    return self.file.set_len(offset + len).map_err(err);
                }
                _ => return Err(err(e)),
            }
        }
    }
}

impl SwapFiles {
    pub(crate) fn new(files: Vec<SwapFile>) -> SwapFiles {
        SwapFiles { files }
    }

    pub(crate) fn len(&self) -> usize {
        self.files.len()
    }

    pub(crate) fn get(&self, i: usize) -> &SwapFile {
        &self.files[i]
    }

    pub(crate) fn path(&self, i: usize) -> &Path {
        self.files
            .get(i)
            .map_or(Path::new("?"), |f| f.path.as_path())
    }

    pub(crate) fn fd(&self, i: usize) -> RawFd {
        self.files[i].file.as_raw_fd()
    }

    pub(crate) fn fds(&self) -> Vec<RawFd> {
        self.files.iter().map(|f| f.file.as_raw_fd()).collect()
    }

    pub(crate) fn all_direct(&self) -> bool {
        self.files.iter().all(|f| f.direct)
    }

    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    pub(crate) fn sync(&self) -> Result<()> {
        for f in &self.files {
            f.file.sync_data().map_err(|source| OffloadError::Io {
                key: String::new(),
                op: IoOp::Sync,
                path: f.path.clone(),
                offset: 0,
                len: 0,
                source,
            })?;
        }
        Ok(())
    }

    /// Write back and evict the page cache of buffered (non-O_DIRECT) files, so reads hit the disk.
    pub(crate) fn drop_cache(&self) -> Result<()> {
        for f in self.files.iter().filter(|f| !f.direct) {
            f.file
                .sync_data()
                .map_err(|e| open_error(&f.path, "fdatasync", e))?;
            // SAFETY: posix_fadvise on an fd we own; no memory is involved.
            let rc =
                unsafe { libc::posix_fadvise(f.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                return Err(open_error(
                    &f.path,
                    "posix_fadvise(DONTNEED)",
                    io::Error::from_raw_os_error(rc),
                ));
            }
        }
        Ok(())
    }
}
