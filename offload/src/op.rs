//! One I/O operation: its blocks, its shared completion state and the caller's handle.
//!
//! The operation owns its buffer (inside `OpState`) until every block's completion has been seen;
//! each in-flight block holds an `Arc<OpState>`, so dropping the `IoHandle` early never frees memory
//! the kernel may still write.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{OffloadError, Result};
use crate::files::SwapFiles;
use crate::pool::HostBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Read,
    Write,
}

struct OpInner {
    buf: Option<HostBuf>,
    error: Option<OffloadError>,
    done: bool,
    /// False once the IoHandle is dropped: the buffer then goes back to its pool at completion.
    handle_alive: bool,
}

/// Completion state shared by an operation's blocks and its handle.
pub(crate) struct OpState {
    pub(crate) key: String,
    pub(crate) dir: Dir,
    remaining: AtomicUsize,
    failed: AtomicBool,
    inner: Mutex<OpInner>,
    done_cv: Condvar,
}

impl OpState {
    pub(crate) fn new(key: String, dir: Dir, buf: HostBuf, blocks: usize) -> Arc<OpState> {
        Arc::new(OpState {
            key,
            dir,
            remaining: AtomicUsize::new(blocks),
            failed: AtomicBool::new(false),
            inner: Mutex::new(OpInner {
                buf: Some(buf),
                error: None,
                done: blocks == 0,
                handle_alive: true,
            }),
            done_cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OpInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record one block's outcome; the last one marks the operation done and wakes waiters.
    pub(crate) fn block_done(&self, result: Result<()>) {
        if let Err(e) = result {
            self.failed.store(true, Ordering::Release);
            let mut inner = self.lock();
            if inner.error.is_none() {
                inner.error = Some(e);
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let orphan = {
                let mut inner = self.lock();
                inner.done = true;
                if inner.handle_alive {
                    None
                } else {
                    inner.buf.take()
                }
            };
            self.done_cv.notify_all();
            // Nobody will wait for this buffer: return it to the pool now, outside the lock.
            drop(orphan);
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    /// Whether any block failed (meaningful once done).
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Wait until done, up to `timeout`. Returns false on timeout.
    pub(crate) fn wait_done(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        while !inner.done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = match self.done_cv.wait_timeout(inner, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

/// One unit of I/O handed to a ring or worker: at most `block_size` bytes at one file offset.
pub(crate) struct Block {
    pub op: Arc<OpState>,
    pub file: usize,
    pub file_offset: u64,
    pub ptr: *mut u8,
    pub len: usize,
    /// Bytes already transferred (a partial transfer is resubmitted for the rest).
    pub done: usize,
    /// Index of the registered (fixed) buffer holding `ptr`, if any.
    pub fixed: Option<u16>,
}

// SAFETY: `ptr` points into the HostBuf owned by `op`, which this block keeps alive; only the
// thread driving the block touches the range until the block completes.
unsafe impl Send for Block {}

impl Block {
    pub(crate) fn io_error(&self, files: &SwapFiles, source: std::io::Error) -> OffloadError {
        OffloadError::Io {
            key: self.op.key.clone(),
            op: match self.op.dir {
                Dir::Read => crate::error::IoOp::Read,
                Dir::Write => crate::error::IoOp::Write,
            },
            path: files.path(self.file).to_path_buf(),
            offset: self.file_offset + self.done as u64,
            len: (self.len - self.done) as u64,
            source,
        }
    }

    /// Error for a transfer that returned 0 bytes before the block was complete.
    pub(crate) fn short_error(&self, files: &SwapFiles) -> OffloadError {
        let path = files.path(self.file).to_path_buf();
        let (key, offset, expected, got) = (
            self.op.key.clone(),
            self.file_offset,
            self.len as u64,
            self.done as u64,
        );
        match self.op.dir {
            Dir::Read => OffloadError::ShortRead {
                key,
                path,
                offset,
                expected,
                got,
            },
            Dir::Write => OffloadError::ShortWrite {
                key,
                path,
                offset,
                expected,
                got,
            },
        }
    }

    /// Account for `n` more bytes; true when the block is complete.
    pub(crate) fn advance(&mut self, n: usize) -> bool {
        self.done = (self.done + n).min(self.len);
        self.done == self.len
    }

    /// Pointer and file offset of the part not yet transferred.
    pub(crate) fn rest(&self) -> (*mut u8, u64, usize) {
        // SAFETY: done <= len, so the result stays inside this block's range of the buffer.
        let ptr = unsafe { self.ptr.add(self.done) };
        (
            ptr,
            self.file_offset + self.done as u64,
            self.len - self.done,
        )
    }
}

/// A crc32c to check on a block once a read is complete.
#[derive(Debug, Clone)]
pub(crate) struct BlockCheck {
    pub buf_offset: usize,
    pub len: usize,
    pub crc: u32,
    pub file: usize,
    pub file_offset: u64,
}

/// The caller's side of one operation: wait on it, poll it, or drop it (the I/O still finishes,
/// and the buffer goes back to its pool only after the kernel is done with it).
pub struct IoHandle {
    op: Arc<OpState>,
    files: Arc<SwapFiles>,
    checks: Vec<BlockCheck>,
    payload_len: usize,
}

impl IoHandle {
    pub(crate) fn new(
        op: Arc<OpState>,
        files: Arc<SwapFiles>,
        checks: Vec<BlockCheck>,
        payload_len: usize,
    ) -> IoHandle {
        IoHandle {
            op,
            files,
            checks,
            payload_len,
        }
    }

    pub fn key(&self) -> &str {
        &self.op.key
    }

    pub(crate) fn op_state(&self) -> Arc<OpState> {
        self.op.clone()
    }

    /// True once every block of the operation has completed (successfully or not).
    pub fn is_done(&self) -> bool {
        self.op.is_done()
    }

    /// Wait up to `timeout` for completion and take the buffer back. On `Timeout` the handle stays
    /// valid and may be waited on again; on an I/O error the buffer returns to its pool.
    pub fn wait(&mut self, timeout: Duration) -> Result<HostBuf> {
        if !self.op.wait_done(timeout) {
            let what = match self.op.dir {
                Dir::Read => "read",
                Dir::Write => "write",
            };
            return Err(OffloadError::Timeout {
                what: format!("{what} of key {:?}", self.op.key),
                timeout,
            });
        }
        let (buf, error) = {
            let mut inner = self.op.lock();
            (inner.buf.take(), inner.error.take())
        };
        if let Some(e) = error {
            return Err(e);
        }
        let Some(mut buf) = buf else {
            return Err(OffloadError::AlreadyTaken);
        };
        if self.op.dir == Dir::Read {
            buf.set_len(self.payload_len)?;
            self.verify(&mut buf)?;
        }
        Ok(buf)
    }

    fn verify(&self, buf: &mut HostBuf) -> Result<()> {
        let bytes = buf.capacity_slice_mut();
        for c in &self.checks {
            let actual = crc32c::crc32c(&bytes[c.buf_offset..c.buf_offset + c.len]);
            if actual != c.crc {
                return Err(OffloadError::Checksum {
                    key: self.op.key.clone(),
                    path: self.files.path(c.file).to_path_buf(),
                    offset: c.file_offset,
                    len: c.len as u64,
                    expected: c.crc,
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Indices of the handles in `handles` that are done (poll many; never blocks).
    pub fn ready(handles: &[IoHandle]) -> Vec<usize> {
        handles
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_done())
            .map(|(i, _)| i)
            .collect()
    }
}

impl Drop for IoHandle {
    /// The operation keeps running; its buffer returns to the pool when the last block completes
    /// (at once, if it already has). Memory the kernel may still write is never freed here.
    fn drop(&mut self) {
        let orphan = {
            let mut inner = self.op.lock();
            inner.handle_alive = false;
            if inner.done {
                inner.buf.take()
            } else {
                None
            }
        };
        drop(orphan);
    }
}

impl std::fmt::Debug for IoHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoHandle")
            .field("key", &self.op.key)
            .field("dir", &self.op.dir)
            .field("done", &self.op.is_done())
            .finish()
    }
}
