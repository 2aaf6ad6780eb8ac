//! The pipelined ring: a collective is a list of steps; at step t a rank sends chunk `send` to
//! the next rank and receives chunk `recv` from the previous one, adding or copying it in. The
//! chunk sent at step t+1 is the one received at step t.
//!
//! Every chunk is cut into the same number of rows, and the steps run row by row: row i's blocks
//! go through all steps before row i+1's. A block is thus forwarded soon after it arrived, while
//! it is still in cache, and a rank's working set is one row (world blocks) rather than its whole
//! buffer.
//!
//! Both directions advance in one loop on the caller's thread over non-blocking sockets (tokio
//! only sets the links up): no thread hand-offs, and the kernel's socket buffers keep the outgoing
//! stream going while a block is being summed. With nothing to do the loop first yields the core
//! a few times and only then sleeps in poll(2): when ranks outnumber cores a yield hands the core
//! to a rank that has work, and a rank that does not sleep is not woken, so the kernel's wake-up
//! affinity does not pull ring neighbours onto one core.

use std::io::{ErrorKind, Read, Write};
use std::marker::PhantomData;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::{Side, StepError};

/// Largest block, in bytes (the unit of forwarding), unless a call chooses otherwise.
pub(super) const BLOCK_BYTES: usize = 256 << 10;
/// The larger block a long reduction may choose instead (see `TcpComm`'s block choice).
pub(super) const BLOCK_BYTES_LARGE: usize = 4 << 20;
/// Longest single poll(2) sleep (the deadline is checked in between).
const POLL_SLICE: Duration = Duration::from_millis(100);

/// The two directions of a rank's place in the ring, as non-blocking sockets.
pub(super) struct Links {
    pub(super) next: TcpStream,
    pub(super) prev: TcpStream,
}

/// What a received block does to the local chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Apply {
    /// Sum into it (reduce-scatter steps).
    Add,
    /// Replace it (all-gather and broadcast steps).
    Copy,
}

#[derive(Clone, Copy)]
pub(super) struct Step {
    pub(super) send: usize,
    pub(super) recv: usize,
    pub(super) apply: Apply,
}

/// Steps of a ring reduce-scatter after which rank `rank` holds chunk `rank` fully summed.
pub(super) fn reduce_scatter_steps(rank: usize, n: usize) -> impl Iterator<Item = Step> {
    (0..n - 1).map(move |s| Step {
        send: (rank + 2 * n - s - 1) % n,
        recv: (rank + 2 * n - s - 2) % n,
        apply: Apply::Add,
    })
}

/// Steps of a ring all-gather that starts with rank `rank` holding chunk `rank`.
pub(super) fn all_gather_steps(rank: usize, n: usize) -> impl Iterator<Item = Step> {
    (0..n - 1).map(move |s| Step {
        send: (rank + n - s) % n,
        recv: (rank + 2 * n - s - 1) % n,
        apply: Apply::Copy,
    })
}

/// Steps of a chain broadcast over two chunks (0: the buffer, 1: empty).
pub(super) fn broadcast_steps(rank: usize, root: usize, n: usize) -> Vec<Step> {
    let receive = Step {
        send: 1,
        recv: 0,
        apply: Apply::Copy,
    };
    let forward = Step {
        send: 0,
        recv: 1,
        apply: Apply::Copy,
    };
    if rank == root {
        vec![forward]
    } else if (rank + 1) % n == root {
        vec![receive]
    } else {
        vec![receive, forward]
    }
}

/// One block: a disjoint piece of the caller's buffer with a borrow flag, so the two threads can
/// share it; the schedule keeps them off the same block, and the flag turns a slip into an error.
struct Block<T> {
    ptr: *mut T,
    len: usize,
    /// 0 free, 1 read by the sender, 2 written by the receiver.
    state: AtomicU8,
}

// SAFETY: a Block is a view of a `&mut [T]` piece; access goes through the `state` flag, which
// admits one reader or one writer at a time.
unsafe impl<T: Send> Send for Block<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Block<T> {}

struct BlockGuard<'b, T> {
    block: &'b Block<T>,
}

impl<T> Drop for BlockGuard<'_, T> {
    fn drop(&mut self) {
        self.block.state.store(0, Ordering::Release);
    }
}

impl<T> Block<T> {
    fn claim(&self, how: u8) -> Option<BlockGuard<'_, T>> {
        self.state
            .compare_exchange(0, how, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| BlockGuard { block: self })
    }
}

impl<T> BlockGuard<'_, T> {
    fn slice(&self) -> &[T] {
        // SAFETY: the piece is valid for `len` (it comes from a live `&mut [T]` held by `Blocks`)
        // and the flag excludes a concurrent writer.
        unsafe { std::slice::from_raw_parts(self.block.ptr, self.block.len) }
    }
    fn slice_mut(&mut self) -> &mut [T] {
        debug_assert_eq!(self.block.state.load(Ordering::Relaxed), 2);
        // SAFETY: as above; state 2 excludes any other reader or writer.
        unsafe { std::slice::from_raw_parts_mut(self.block.ptr, self.block.len) }
    }
}

/// A buffer cut into chunks, and every chunk into `rows` near-equal blocks: block (row, chunk).
pub(super) struct Blocks<'a, T> {
    /// Row-major: block (row, chunk) at `row * chunks + chunk`.
    blocks: Vec<Block<T>>,
    chunks: usize,
    rows: usize,
    _buf: PhantomData<&'a mut [T]>,
}

impl<'a, T: bytemuck::Pod> Blocks<'a, T> {
    /// `chunks` must be disjoint ranges of `buf`. Rows: enough that no block exceeds
    /// `block_bytes_max`.
    pub(super) fn new(
        buf: &'a mut [T],
        chunks: impl Iterator<Item = std::ops::Range<usize>>,
        block_bytes_max: usize,
    ) -> Self {
        let block_elems_max = (block_bytes_max / std::mem::size_of::<T>()).max(1);
        let chunks: Vec<_> = chunks.collect();
        let rows = chunks
            .iter()
            .map(|c| c.len().div_ceil(block_elems_max))
            .max()
            .unwrap_or(0);
        let base = buf.as_mut_ptr();
        let mut blocks = Vec::with_capacity(rows * chunks.len());
        for row in 0..rows {
            for range in &chunks {
                assert!(
                    range.start <= range.end && range.end <= buf.len(),
                    "chunk outside the buffer"
                );
                let piece = super::chunk(range.len(), rows, row);
                // SAFETY: range.start + piece.end <= range.end <= buf.len(); pieces of disjoint
                // chunks are disjoint.
                blocks.push(Block {
                    ptr: unsafe { base.add(range.start + piece.start) },
                    len: piece.len(),
                    state: AtomicU8::new(0),
                });
            }
        }
        Self {
            blocks,
            chunks: chunks.len(),
            rows,
            _buf: PhantomData,
        }
    }

    fn block(&self, row: usize, chunk: usize) -> &Block<T> {
        &self.blocks[row * self.chunks + chunk]
    }
}

fn overlap(side: Side, t: usize, row: usize, chunk: usize) -> StepError {
    let msg = format!("ring schedule touched a block twice (step {t}, row {row}, chunk {chunk})");
    StepError {
        side,
        io: Some(std::io::Error::other(msg)),
    }
}

/// One direction's place in the schedule: position `row * steps + t`, bytes of the current block
/// done, and the claim on that block while it is in transfer.
struct Cursor<'b, T> {
    pos: usize,
    done_bytes: usize,
    guard: Option<BlockGuard<'b, T>>,
}

impl<T> Cursor<'_, T> {
    fn new() -> Self {
        Self {
            pos: 0,
            done_bytes: 0,
            guard: None,
        }
    }

    fn advance(&mut self) {
        self.pos += 1;
        self.done_bytes = 0;
        self.guard = None;
    }
}

/// What a direction is stuck on after trying to make progress.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stuck {
    /// Finished, or waiting for the other direction.
    NotOnSocket,
    /// Waiting for the socket (send buffer full / nothing to read).
    OnSocket,
}

/// Runs `steps` over `blocks`, row by row. Waits for a peer are bounded by `timeout` without any
/// progress; `yields_max` yields precede every sleep.
///
/// Position of (row, step t) in either direction's sequence: `row * steps.len() + t`. The block
/// sent at (row, t > 0) is the one received at (row, t - 1); the block received at (row, t) was
/// last sent at (row, t + 1 - chunks), if that step exists, and must have left first.
pub(super) fn run<T: bytemuck::Pod>(
    links: &mut Links,
    blocks: &Blocks<'_, T>,
    steps: &[Step],
    add: fn(&mut [T], &[T]),
    timeout: Duration,
    yields_max: u32,
) -> Result<(), StepError> {
    let steps_per_row = steps.len();
    let total = blocks.rows * steps_per_row;
    let mut send = Cursor::new();
    let mut recv = Cursor::new();
    let mut scratch: Vec<T> = Vec::new();
    let mut last_progress = Instant::now();
    let mut idle_rounds = 0u32;
    loop {
        let before = (send.pos, send.done_bytes, recv.pos, recv.done_bytes);
        let send_stuck = send_some(&mut links.next, blocks, steps, &mut send, recv.pos, total)?;
        let recv_stuck = recv_some(
            &mut links.prev,
            blocks,
            steps,
            &mut recv,
            send.pos,
            total,
            &mut scratch,
            add,
        )?;
        if send.pos == total && recv.pos == total {
            return Ok(());
        }
        if (send.pos, send.done_bytes, recv.pos, recv.done_bytes) != before {
            last_progress = Instant::now();
            idle_rounds = 0;
            continue;
        }
        let (want_write, want_read) =
            (send_stuck == Stuck::OnSocket, recv_stuck == Stuck::OnSocket);
        if !want_write && !want_read {
            // Each direction waits for the other: the schedule is wrong.
            let msg = format!(
                "ring schedule stalled: each direction waits for the other (sent {}, received {})",
                send.pos, recv.pos
            );
            return Err(StepError {
                side: Side::Prev,
                io: Some(std::io::Error::other(msg)),
            });
        }
        if idle_rounds < yields_max {
            idle_rounds += 1;
            std::thread::yield_now();
            continue;
        }
        let waited = last_progress.elapsed();
        if waited >= timeout {
            let side = if want_read { Side::Prev } else { Side::Next };
            return Err(StepError { side, io: None });
        }
        wait_ready(
            links,
            want_write,
            want_read,
            (timeout - waited).min(POLL_SLICE),
        )?;
    }
}

/// Sends as much as the socket takes; returns what it is stuck on.
fn send_some<'b, T: bytemuck::Pod>(
    next: &mut TcpStream,
    blocks: &'b Blocks<'_, T>,
    steps: &[Step],
    send: &mut Cursor<'b, T>,
    received: usize,
    total: usize,
) -> Result<Stuck, StepError> {
    let steps_per_row = steps.len();
    while send.pos < total {
        let (row, t) = (send.pos / steps_per_row, send.pos % steps_per_row);
        // The chunk sent at step t was received at step t - 1: wait for that block.
        if t > 0 && received < send.pos {
            return Ok(Stuck::NotOnSocket);
        }
        // A block stays claimed from its first byte out to its last.
        let guard = match send.guard.take() {
            Some(guard) => guard,
            None => {
                let chunk = steps[t].send;
                blocks
                    .block(row, chunk)
                    .claim(1)
                    .ok_or_else(|| overlap(Side::Next, t, row, chunk))?
            }
        };
        let guard = send.guard.insert(guard);
        let bytes: &[u8] = bytemuck::cast_slice(guard.slice());
        if send.done_bytes == bytes.len() {
            send.advance();
            continue;
        }
        match moved(next.write(&bytes[send.done_bytes..]), Side::Next)? {
            Some(n) => send.done_bytes += n,
            None => return Ok(Stuck::OnSocket),
        }
    }
    Ok(Stuck::NotOnSocket)
}

/// The outcome of one non-blocking read or write on the `side` socket: Some(bytes moved, 0 after
/// EINTR), None when the socket would block; 0 bytes from a read is the peer's EOF, from a write a
/// closed connection.
fn moved(result: std::io::Result<usize>, side: Side) -> Result<Option<usize>, StepError> {
    let eof = match side {
        Side::Prev => ErrorKind::UnexpectedEof,
        Side::Next => ErrorKind::WriteZero,
    };
    match result {
        Ok(0) => Err(StepError {
            side,
            io: Some(eof.into()),
        }),
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(Some(0)),
        Err(e) => Err(StepError { side, io: Some(e) }),
    }
}

/// Receives what the socket has, adding or copying whole blocks in; returns what it is stuck on.
#[allow(clippy::too_many_arguments)]
fn recv_some<'b, T: bytemuck::Pod>(
    prev: &mut TcpStream,
    blocks: &'b Blocks<'_, T>,
    steps: &[Step],
    recv: &mut Cursor<'b, T>,
    sent: usize,
    total: usize,
    scratch: &mut Vec<T>,
    add: fn(&mut [T], &[T]),
) -> Result<Stuck, StepError> {
    let steps_per_row = steps.len();
    while recv.pos < total {
        let (row, t) = (recv.pos / steps_per_row, recv.pos % steps_per_row);
        let step = steps[t];
        // Touch the block only once its previous trip out has left.
        if let Some(earlier) = (t + 1).checked_sub(blocks.chunks) {
            if sent < row * steps_per_row + earlier + 1 {
                return Ok(Stuck::NotOnSocket);
            }
        }
        let block = blocks.block(row, step.recv);
        let into: &mut [u8] = match step.apply {
            Apply::Copy => {
                let guard = match recv.guard.take() {
                    Some(guard) => guard,
                    None => block
                        .claim(2)
                        .ok_or_else(|| overlap(Side::Prev, t, row, step.recv))?,
                };
                let guard = recv.guard.insert(guard);
                bytemuck::cast_slice_mut(guard.slice_mut())
            }
            Apply::Add => {
                // Same length as the last block almost always: no reallocation, no fill.
                scratch.resize(block.len, T::zeroed());
                bytemuck::cast_slice_mut(&mut scratch[..])
            }
        };
        if recv.done_bytes < into.len() {
            match moved(prev.read(&mut into[recv.done_bytes..]), Side::Prev)? {
                Some(n) => recv.done_bytes += n,
                None => return Ok(Stuck::OnSocket),
            }
            continue;
        }
        if step.apply == Apply::Add {
            let mut guard = block
                .claim(2)
                .ok_or_else(|| overlap(Side::Prev, t, row, step.recv))?;
            add(guard.slice_mut(), scratch);
        }
        recv.advance();
    }
    Ok(Stuck::NotOnSocket)
}

/// Sleeps until `next` can take data (`want_write`) or `prev` has some (`want_read`), an error
/// shows on either, or `slice` passes.
fn wait_ready(
    links: &Links,
    want_write: bool,
    want_read: bool,
    slice: Duration,
) -> Result<(), StepError> {
    let mut fds = [
        libc::pollfd {
            fd: links.next.as_raw_fd(),
            events: if want_write { libc::POLLOUT } else { 0 },
            revents: 0,
        },
        libc::pollfd {
            fd: links.prev.as_raw_fd(),
            events: if want_read { libc::POLLIN } else { 0 },
            revents: 0,
        },
    ];
    let timeout_ms = libc::c_int::try_from(slice.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is a valid array of two pollfd for the duration of the call, and both
    // descriptors are open sockets owned by `links`.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if ready < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != ErrorKind::Interrupted {
            let side = if want_read { Side::Prev } else { Side::Next };
            return Err(StepError {
                side,
                io: Some(err),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_chain_and_end_where_expected() {
        for n in 2..6 {
            for rank in 0..n {
                let steps: Vec<Step> = reduce_scatter_steps(rank, n)
                    .chain(all_gather_steps(rank, n))
                    .collect();
                assert!(
                    steps.windows(2).all(|w| w[1].send == w[0].recv),
                    "n={n} rank={rank}"
                );
                assert_eq!(
                    steps[n - 2].recv,
                    rank,
                    "reduce-scatter ends on the rank's own chunk"
                );
                assert_eq!(steps[n - 1].send, rank);
            }
        }
    }

    #[test]
    fn blocks_cover_the_chunks() {
        let mut buf = vec![0u8; 3 * BLOCK_BYTES + 10];
        let len = buf.len();
        let split = BLOCK_BYTES + 1;
        let chunks = [0..split, split..len, len..len];
        let blocks = Blocks::new(&mut buf, chunks.into_iter(), BLOCK_BYTES);
        // The longer chunk needs 3 blocks, so every chunk is cut into 3 rows.
        assert_eq!((blocks.rows, blocks.chunks), (3, 3));
        for chunk in 0..3 {
            let lens: Vec<_> = (0..3).map(|row| blocks.block(row, chunk).len).collect();
            let total = [split, len - split, 0][chunk];
            assert_eq!(lens.iter().sum::<usize>(), total);
            assert!(lens.iter().all(|&l| l <= BLOCK_BYTES));
        }
        assert_eq!(
            blocks.block(1, 1).ptr,
            blocks.block(0, 1).ptr.wrapping_add(blocks.block(0, 1).len)
        );
        let reading = blocks.block(0, 0).claim(1);
        assert!(reading.is_some() && blocks.block(0, 0).claim(2).is_none());
        drop(reading);
        assert!(blocks.block(0, 0).claim(2).is_some());
    }
}
