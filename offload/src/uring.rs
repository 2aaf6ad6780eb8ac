//! io_uring backend: one thread per ring, at most `queue_depth` blocks in flight per ring.

use std::collections::VecDeque;
use std::io;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use crate::files::SwapFiles;
use crate::op::{Block, Dir};
use crate::pool::PoolInner;

pub(crate) struct RingSetup {
    pub ring: IoUring,
    pub fixed_files: bool,
    pub fixed_buffers: bool,
}

/// Create one ring with `entries` slots; register the files and (optionally) the pool's slabs.
pub(crate) fn setup(
    entries: u32,
    files: &SwapFiles,
    pool: Option<&PoolInner>,
    register: bool,
) -> io::Result<RingSetup> {
    let ring = match IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(entries)
    {
        Ok(r) => r,
        // Older kernels refuse the flags: plain setup.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries)?,
        Err(e) => return Err(e),
    };
    let mut fixed_files = false;
    let mut fixed_buffers = false;
    if register {
        fixed_files = ring.submitter().register_files(&files.fds()).is_ok();
        if let Some(pool) = pool {
            let iovecs = pool.iovecs();
            // SAFETY: the iovecs describe the pool's slabs, which stay mapped while the ring
            // lives: the ring thread holds an Arc<PoolInner> and drops the ring first.
            fixed_buffers = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        }
    }
    Ok(RingSetup {
        ring,
        fixed_files,
        fixed_buffers,
    })
}

fn build_sqe(
    block: &Block,
    slot: usize,
    fd: types::Fd,
    fixed_file: Option<types::Fixed>,
) -> squeue::Entry {
    let (ptr, offset, len) = block.rest();
    let len = len as u32;
    let entry = match (block.op.dir, block.fixed, fixed_file) {
        (Dir::Read, Some(idx), Some(f)) => opcode::ReadFixed::new(f, ptr, len, idx)
            .offset(offset)
            .build(),
        (Dir::Read, Some(idx), None) => opcode::ReadFixed::new(fd, ptr, len, idx)
            .offset(offset)
            .build(),
        (Dir::Read, None, Some(f)) => opcode::Read::new(f, ptr, len).offset(offset).build(),
        (Dir::Read, None, None) => opcode::Read::new(fd, ptr, len).offset(offset).build(),
        (Dir::Write, Some(idx), Some(f)) => opcode::WriteFixed::new(f, ptr, len, idx)
            .offset(offset)
            .build(),
        (Dir::Write, Some(idx), None) => opcode::WriteFixed::new(fd, ptr, len, idx)
            .offset(offset)
            .build(),
        (Dir::Write, None, Some(f)) => opcode::Write::new(f, ptr, len).offset(offset).build(),
        (Dir::Write, None, None) => opcode::Write::new(fd, ptr, len).offset(offset).build(),
    };
    entry.user_data(slot as u64)
}

/// What a completion means for its block.
enum Outcome {
    Again,
    Finished(crate::error::Result<()>),
}

fn classify(block: &mut Block, res: i32, files: &SwapFiles) -> Outcome {
    if res < 0 {
        return match -res {
            libc::EINTR | libc::EAGAIN => Outcome::Again,
            errno => Outcome::Finished(Err(
                block.io_error(files, io::Error::from_raw_os_error(errno))
            )),
        };
    }
    if res == 0 {
        return Outcome::Finished(Err(block.short_error(files)));
    }
    if block.advance(res as usize) {
        Outcome::Finished(Ok(()))
    } else {
        Outcome::Again
    }
}

/// The ring thread: take blocks from `rx`, keep up to `queue_depth` in flight, finish each block
/// when its completion arrives. Runs until `rx` is closed and every block has completed.
pub(crate) fn ring_loop(
    setup: RingSetup,
    rx: Receiver<Vec<Block>>,
    files: Arc<SwapFiles>,
    pool: Option<Arc<PoolInner>>,
    queue_depth: usize,
) {
    let RingSetup {
        mut ring,
        fixed_files,
        fixed_buffers,
    } = setup;
    let mut pending: VecDeque<Block> = VecDeque::new();
    let mut slots: Vec<Option<Block>> = (0..queue_depth).map(|_| None).collect();
    let mut free_slots: Vec<usize> = (0..queue_depth).rev().collect();
    let mut open = true;
    let mut completions: Vec<(u64, i32)> = Vec::with_capacity(queue_depth);
    loop {
        let in_flight = queue_depth - free_slots.len();
        if open {
            if in_flight == 0 && pending.is_empty() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(blocks) => pending.extend(blocks),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(blocks) => pending.extend(blocks),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
        }
        while let Some(slot) = free_slots.pop() {
            let Some(block) = pending.pop_front() else {
                free_slots.push(slot);
                break;
            };
            let fixed = fixed_files.then_some(types::Fixed(block.file as u32));
            let sqe = build_sqe(&block, slot, types::Fd(files.fd(block.file)), fixed);
            // SAFETY: the buffer range in the SQE stays valid until its CQE is reaped: the block
            // (holding the Arc that owns the buffer) sits in `slots[slot]` until then.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                pending.push_front(block);
                free_slots.push(slot);
                break;
            }
            slots[slot] = Some(block);
        }
        let in_flight = queue_depth - free_slots.len();
        if in_flight == 0 {
            if !open && pending.is_empty() {
                break;
            }
            continue;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {}
                _ => {
                    tracing::error!("io_uring_enter failed: {e}; failing queued blocks");
                    for block in pending.drain(..) {
                        let err = block.io_error(&files, io::Error::new(e.kind(), e.to_string()));
                        block.op.block_done(Err(err));
                    }
                    // In-flight blocks keep their buffers until their completions arrive.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        completions.clear();
        completions.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &completions {
            let slot = user_data as usize;
            let Some(mut block) = slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            free_slots.push(slot);
            match classify(&mut block, res, &files) {
                Outcome::Again => pending.push_front(block),
                Outcome::Finished(result) => block.op.block_done(result),
            }
        }
    }
    // Let go of registered files and buffers now: ring teardown in the kernel is asynchronous,
    // and a file it still holds would keep the swap file's lock after the store is gone.
    if fixed_files {
        let _ = ring.submitter().unregister_files();
    }
    if fixed_buffers {
        let _ = ring.submitter().unregister_buffers();
    }
    // The ring (and its buffer registration) goes before the pool it registered.
    drop(ring);
    drop(pool);
}
