//! The pipelined ring: a collective is a list of steps; at step t a rank sends chunk `send` to
//! the next rank and receives chunk `recv` from the previous one, adding or copying it in. The
//! chunk sent at step t+1 is the one received at step t, so each block is forwarded as soon as it
//! has arrived. Large operations send and receive on two threads, so a slow reduction never
//! stalls the outgoing stream; small ones run both directions on the caller's thread.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

use super::{Side, StepError};

/// Bytes per block: the unit of forwarding.
const BLOCK_BYTES: usize = 256 << 10;

/// Operations on at most this many bytes run both directions on the calling thread (no thread
/// start-up on the latency path).
const ONE_THREAD_BYTES_MAX: usize = 1 << 20;

/// The two directions of a rank's place in the ring and the runtime whose I/O driver serves them
/// (one worker thread; the futures themselves run on the caller's threads via `block_on`).
pub(super) struct Links {
    pub(super) next: TcpStream,
    pub(super) prev: TcpStream,
    pub(super) runtime: Runtime,
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

/// A buffer cut into chunks and the chunks into blocks.
pub(super) struct Blocks<'a, T> {
    blocks: Vec<Block<T>>,
    /// Index in `blocks` of each chunk's first block; one extra entry at the end.
    first: Vec<usize>,
    _buf: PhantomData<&'a mut [T]>,
}

impl<'a, T: bytemuck::Pod> Blocks<'a, T> {
    /// `chunks` must be ascending, disjoint ranges of `buf`.
    pub(super) fn new(
        buf: &'a mut [T],
        chunks: impl Iterator<Item = std::ops::Range<usize>>,
    ) -> Self {
        let block_elems = (BLOCK_BYTES / std::mem::size_of::<T>()).max(1);
        let (mut blocks, mut first) = (Vec::new(), Vec::new());
        let base = buf.as_mut_ptr();
        for range in chunks {
            assert!(
                range.start <= range.end && range.end <= buf.len(),
                "chunk outside the buffer"
            );
            first.push(blocks.len());
            let mut at = range.start;
            while at < range.end {
                let len = block_elems.min(range.end - at);
                // SAFETY: at + len <= buf.len(); the pieces of ascending disjoint chunks are disjoint.
                blocks.push(Block {
                    ptr: unsafe { base.add(at) },
                    len,
                    state: AtomicU8::new(0),
                });
                at += len;
            }
        }
        first.push(blocks.len());
        Self {
            blocks,
            first,
            _buf: PhantomData,
        }
    }

    fn count(&self, chunk: usize) -> usize {
        self.first[chunk + 1] - self.first[chunk]
    }

    fn block(&self, chunk: usize, block: usize) -> &Block<T> {
        &self.blocks[self.first[chunk] + block]
    }
}

/// Progress shared by the two threads.
struct Shared {
    received: AtomicUsize,
    arrived: Notify,
    sent: AtomicUsize,
    departed: Notify,
    failed: AtomicBool,
}

impl Shared {
    fn fail(&self) {
        self.failed.store(true, Ordering::Release);
        self.arrived.notify_one();
        self.departed.notify_one();
    }
}

/// Waits until `counter >= needed`; false when the other thread failed.
async fn wait_for(
    counter: &AtomicUsize,
    notify: &Notify,
    failed: &AtomicBool,
    needed: usize,
) -> bool {
    loop {
        if failed.load(Ordering::Acquire) {
            return false;
        }
        if counter.load(Ordering::Acquire) >= needed {
            return true;
        }
        notify.notified().await;
    }
}

fn aborted(side: Side) -> StepError {
    StepError {
        side,
        io: Some(std::io::Error::other("aborted: the other direction failed")),
    }
}

fn overlap(side: Side, t: usize, chunk: usize, b: usize) -> StepError {
    let msg = format!("ring schedule touched a block twice (step {t}, chunk {chunk}, block {b})");
    StepError {
        side,
        io: Some(std::io::Error::other(msg)),
    }
}

async fn io_with_timeout<R>(
    side: Side,
    timeout: Duration,
    io: impl std::future::Future<Output = std::io::Result<R>>,
) -> Result<R, StepError> {
    match tokio::time::timeout(timeout, io).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(StepError { side, io: Some(e) }),
        Err(_) => Err(StepError { side, io: None }),
    }
}

/// Runs `steps` over `blocks`; every wait for a peer is bounded by `timeout`.
pub(super) fn run<T: bytemuck::Pod + Send + Sync>(
    links: &mut Links,
    blocks: &Blocks<'_, T>,
    steps: &[Step],
    add: fn(&mut [T], &[T]),
    timeout: Duration,
) -> Result<(), StepError> {
    let n = blocks.first.len() - 1;
    let (mut recv_start, mut send_start) = (
        Vec::with_capacity(steps.len()),
        Vec::with_capacity(steps.len()),
    );
    let (mut recv_total, mut send_total) = (0, 0);
    for step in steps {
        recv_start.push(recv_total);
        send_start.push(send_total);
        recv_total += blocks.count(step.recv);
        send_total += blocks.count(step.send);
    }
    let shared = Shared {
        received: AtomicUsize::new(0),
        arrived: Notify::new(),
        sent: AtomicUsize::new(0),
        departed: Notify::new(),
        failed: AtomicBool::new(false),
    };
    let Links {
        next,
        prev,
        runtime,
    } = links;
    let handle = runtime.handle();
    let op_bytes: usize =
        blocks.blocks.iter().map(|b| b.len).sum::<usize>() * std::mem::size_of::<T>();
    let sending = async {
        for (t, step) in steps.iter().enumerate() {
            for b in 0..blocks.count(step.send) {
                // The chunk sent at step t was received at step t - 1: wait for its block b.
                if t > 0
                    && !wait_for(
                        &shared.received,
                        &shared.arrived,
                        &shared.failed,
                        recv_start[t - 1] + b + 1,
                    )
                    .await
                {
                    return Err(aborted(Side::Next));
                }
                let guard = blocks
                    .block(step.send, b)
                    .claim(1)
                    .ok_or_else(|| overlap(Side::Next, t, step.send, b))?;
                io_with_timeout(
                    Side::Next,
                    timeout,
                    next.write_all(bytemuck::cast_slice(guard.slice())),
                )
                .await?;
                drop(guard);
                shared.sent.fetch_add(1, Ordering::AcqRel);
                shared.departed.notify_one();
            }
        }
        Ok(())
    };
    let receiving = async {
        let mut scratch: Vec<T> = Vec::new();
        for (t, step) in steps.iter().enumerate() {
            for b in 0..blocks.count(step.recv) {
                let block = blocks.block(step.recv, b);
                // Touch the block only once its previous trip out (at step t - n + 1, which sent
                // the chunk received at t - n) has left; it is not sent again before it is
                // complete here.
                if let Some(earlier) = (t + 1).checked_sub(n) {
                    let needed = send_start[earlier] + b + 1;
                    if !wait_for(&shared.sent, &shared.departed, &shared.failed, needed).await {
                        return Err(aborted(Side::Prev));
                    }
                }
                match step.apply {
                    Apply::Copy => {
                        let mut guard = block
                            .claim(2)
                            .ok_or_else(|| overlap(Side::Prev, t, step.recv, b))?;
                        io_with_timeout(
                            Side::Prev,
                            timeout,
                            prev.read_exact(bytemuck::cast_slice_mut(guard.slice_mut())),
                        )
                        .await?;
                    }
                    Apply::Add => {
                        scratch.resize(block.len, T::zeroed());
                        io_with_timeout(
                            Side::Prev,
                            timeout,
                            prev.read_exact(bytemuck::cast_slice_mut(&mut scratch[..])),
                        )
                        .await?;
                        let mut guard = block
                            .claim(2)
                            .ok_or_else(|| overlap(Side::Prev, t, step.recv, b))?;
                        add(guard.slice_mut(), &scratch);
                    }
                }
                shared.received.fetch_add(1, Ordering::AcqRel);
                shared.arrived.notify_one();
            }
        }
        Ok(())
    };
    if op_bytes <= ONE_THREAD_BYTES_MAX {
        return handle
            .block_on(async { tokio::try_join!(sending, receiving) })
            .map(|_| ());
    }
    let (sent, received) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let result = handle.block_on(sending);
            if result.is_err() {
                shared.fail();
            }
            result
        });
        let received = handle.block_on(receiving);
        if received.is_err() {
            shared.fail();
        }
        let sent = sender.join().unwrap_or_else(|_| Err(aborted(Side::Next)));
        (sent, received)
    });
    // Report the direction that failed first, not the one that stopped because of it.
    match (sent, received) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(s), Err(r)) => Err(if is_abort(&s) { r } else { s }),
    }
}

fn is_abort(e: &StepError) -> bool {
    e.io.as_ref()
        .is_some_and(|io| io.to_string().starts_with("aborted:"))
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
        let blocks = Blocks::new(
            &mut buf,
            [0..BLOCK_BYTES + 1, BLOCK_BYTES + 1..len].into_iter(),
        );
        assert_eq!((blocks.count(0), blocks.count(1)), (2, 3));
        assert_eq!(blocks.block(0, 1).len, 1);
        assert_eq!(blocks.block(1, 2).len, len - 3 * BLOCK_BYTES - 1);
        let reading = blocks.block(0, 0).claim(1);
        assert!(reading.is_some() && blocks.block(0, 0).claim(2).is_none());
        drop(reading);
        assert!(blocks.block(0, 0).claim(2).is_some());
    }
}
