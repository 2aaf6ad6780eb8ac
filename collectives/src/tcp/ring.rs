//! The pipelined ring: a collective is a list of steps; at step t a rank sends chunk `send` to
//! the next rank and receives chunk `recv` from the previous one, adding or copying it in. The
//! chunk sent at step t+1 is the one received at step t, so each block is forwarded as soon as it
//! has arrived; sending and receiving run concurrently on one thread.

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::{Links, Side, StepError};

/// Bytes per block: the unit of forwarding.
const BLOCK_BYTES: usize = 256 << 10;

/// What a received block does to the local chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Apply {
    /// Sum into it (reduce-scatter steps).
    Add,
    /// Replace it (all-gather steps).
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

/// A buffer cut into chunks and the chunks into blocks, each block borrowable on its own.
pub(super) struct Blocks<'a, T> {
    cells: Vec<RefCell<&'a mut [T]>>,
    /// Index in `cells` of each chunk's first block; one extra entry at the end.
    first: Vec<usize>,
}

impl<'a, T: bytemuck::Pod> Blocks<'a, T> {
    /// `chunks` must be ascending, disjoint ranges of `buf`.
    pub(super) fn new(buf: &'a mut [T], chunks: impl Iterator<Item = Range<usize>>) -> Self {
        let block_elems = (BLOCK_BYTES / std::mem::size_of::<T>()).max(1);
        let mut cells = Vec::new();
        let mut first = Vec::new();
        let mut rest = buf;
        let mut at = 0;
        for range in chunks {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(range.start - at);
            let (mut chunk, tail) = tail.split_at_mut(range.len());
            rest = tail;
            at = range.end;
            first.push(cells.len());
            while !chunk.is_empty() {
                let take = block_elems.min(chunk.len());
                let (block, tail) = std::mem::take(&mut chunk).split_at_mut(take);
                cells.push(RefCell::new(block));
                chunk = tail;
            }
        }
        first.push(cells.len());
        Self { cells, first }
    }

    fn count(&self, chunk: usize) -> usize {
        self.first[chunk + 1] - self.first[chunk]
    }

    fn cell(&self, chunk: usize, block: usize) -> &RefCell<&'a mut [T]> {
        &self.cells[self.first[chunk] + block]
    }
}

fn timed_out(side: Side) -> StepError {
    StepError { side, io: None }
}

fn overlap(side: Side, t: usize, chunk: usize, b: usize) -> StepError {
    // The step schedule never lets the two directions touch one block at once; if it ever did,
    // fail the operation instead of panicking.
    StepError {
        side,
        io: Some(std::io::Error::other(format!(
            "ring schedule touched a block twice (step {t}, chunk {chunk}, block {b})"
        ))),
    }
}

/// Runs `steps` over `blocks`; every wait for a peer is bounded by `timeout`.
pub(super) async fn run<T: bytemuck::Pod>(
    links: &mut Links,
    blocks: &Blocks<'_, T>,
    steps: &[Step],
    add: fn(&mut [T], &[T]),
    timeout: Duration,
) -> Result<(), StepError> {
    let Links { next, prev } = links;
    let n = blocks.first.len() - 1;
    // Blocks received so far, over all steps, and where each step's blocks start in that count.
    let received = Cell::new(0usize);
    let arrived = Notify::new();
    // Blocks sent so far, and where each step's blocks start in that count.
    let sent = Cell::new(0usize);
    let departed = Notify::new();
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
    let sending = async {
        for (t, step) in steps.iter().enumerate() {
            for b in 0..blocks.count(step.send) {
                if t > 0 {
                    // The chunk sent at step t was received at step t - 1: wait for its block b.
                    let needed = recv_start[t - 1] + b + 1;
                    while received.get() < needed {
                        arrived.notified().await;
                    }
                }
                let block = blocks
                    .cell(step.send, b)
                    .try_borrow()
                    .map_err(|_| overlap(Side::Next, t, step.send, b))?;
                let bytes: &[u8] = bytemuck::cast_slice(&block[..]);
                tokio::time::timeout(timeout, next.write_all(bytes))
                    .await
                    .map_err(|_| timed_out(Side::Next))?
                    .map_err(|e| StepError {
                        side: Side::Next,
                        io: Some(e),
                    })?;
                drop(block);
                sent.set(sent.get() + 1);
                departed.notify_one();
            }
        }
        Ok::<(), StepError>(())
    };
    let receiving = async {
        let mut scratch: Vec<T> = Vec::new();
        for (t, step) in steps.iter().enumerate() {
            for b in 0..blocks.count(step.recv) {
                let cell = blocks.cell(step.recv, b);
                // Touch the block only once its previous trip out (at step t - n + 1, which sent
                // the chunk received at t - n) has left; it is not sent again before it is
                // complete here.
                if let Some(earlier) = (t + 1).checked_sub(n) {
                    let needed = send_start[earlier] + b + 1;
                    while sent.get() < needed {
                        departed.notified().await;
                    }
                }
                match step.apply {
                    Apply::Copy => {
                        let mut block = cell
                            .try_borrow_mut()
                            .map_err(|_| overlap(Side::Prev, t, step.recv, b))?;
                        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut block[..]);
                        tokio::time::timeout(timeout, prev.read_exact(bytes))
                            .await
                            .map_err(|_| timed_out(Side::Prev))?
                            .map_err(|e| StepError {
                                side: Side::Prev,
                                io: Some(e),
                            })?;
                    }
                    Apply::Add => {
                        let len = cell
                            .try_borrow()
                            .map_err(|_| overlap(Side::Prev, t, step.recv, b))?
                            .len();
                        scratch.resize(len, T::zeroed());
                        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch[..]);
                        tokio::time::timeout(timeout, prev.read_exact(bytes))
                            .await
                            .map_err(|_| timed_out(Side::Prev))?
                            .map_err(|e| StepError {
                                side: Side::Prev,
                                io: Some(e),
                            })?;
                        let mut block = cell
                            .try_borrow_mut()
                            .map_err(|_| overlap(Side::Prev, t, step.recv, b))?;
                        add(&mut block, &scratch);
                    }
                }
                received.set(received.get() + 1);
                arrived.notify_one();
            }
        }
        Ok::<(), StepError>(())
    };
    tokio::try_join!(sending, receiving).map(|_| ())
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
        assert_eq!(blocks.cell(0, 1).borrow().len(), 1);
        assert_eq!(blocks.cell(1, 2).borrow().len(), len - 3 * BLOCK_BYTES - 1);
    }
}
