//! The `tcp` backend: ring algorithms over tokio TCP streams, for ranks on different hosts.
//!
//! Rank r writes to rank r+1 and reads from rank r-1. Sums travel as f32 partials (bf16 inputs
//! are widened first), so bf16 accumulates in f32; gathers move the raw element bytes.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::comm::Communicator;
use crate::elem::{add_assign_f32, narrow_to_bf16, widen_bf16, DType};
use crate::error::{CommError, Result};
use crate::store::StoreClient;
use crate::Backend;

/// Elements received before they are added in (pipelines the reduction with the transfer).
const RECV_BLOCK_ELEMS: usize = 64 * 1024;
/// Socket buffer size asked of the kernel.
const SOCKET_BUFFER_BYTES: u32 = 4 << 20;
/// How long survivors wait for rank 0's store to report who closed, after a link failed.
const DIAGNOSE_GRACE: Duration = Duration::from_millis(500);

struct Links {
    next: TcpStream,
    prev: TcpStream,
}

struct Scratch {
    /// The f32 working copy for sums.
    work: Vec<f32>,
    /// Received partial sums.
    recv: Vec<f32>,
}

/// One rank's end of the ring.
pub(crate) struct TcpComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    runtime: tokio::runtime::Runtime,
    /// None for a world of one, or after a failure (dropping the links tells the neighbours).
    links: Mutex<Option<Links>>,
    scratch: Mutex<Scratch>,
    store: Arc<StoreClient>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which end of a ring step was still incomplete.
#[derive(Clone, Copy)]
enum Side {
    Next,
    Prev,
}

struct StepError {
    side: Side,
    /// None: timed out.
    io: Option<std::io::Error>,
}

fn socket_error(side: Side) -> impl Fn(std::io::Error) -> StepError {
    move |e| StepError { side, io: Some(e) }
}

/// Sends `send` to next while receiving `recv_len` elements from prev in blocks, handing each
/// block to `on_block(offset, block)`; bounded by `timeout`.
async fn ring_step<T: bytemuck::Pod>(
    links: &mut Links,
    send: &[u8],
    recv: &mut [T],
    timeout: Duration,
    mut on_block: impl FnMut(usize, &[T]),
) -> std::result::Result<(), StepError> {
    let Links { next, prev } = links;
    let mut recv_done = recv.is_empty();
    let work = async {
        let sending = async {
            next.write_all(send)
                .await
                .map_err(socket_error(Side::Next))?;
            Ok::<(), StepError>(())
        };
        let receiving = async {
            let mut off = 0;
            while off < recv.len() {
                let end = (off + RECV_BLOCK_ELEMS).min(recv.len());
                let block = &mut recv[off..end];
                prev.read_exact(bytemuck::cast_slice_mut(block))
                    .await
                    .map_err(socket_error(Side::Prev))?;
                on_block(off, block);
                off = end;
            }
            recv_done = true;
            Ok::<(), StepError>(())
        };
        tokio::try_join!(sending, receiving).map(|_| ())
    };
    let outcome = tokio::time::timeout(timeout, work).await;
    match outcome {
        Ok(result) => result,
        Err(_) => Err(StepError {
            side: if recv_done { Side::Next } else { Side::Prev },
            io: None,
        }),
    }
}

/// Element range of chunk k of n over `len` elements (uneven: the first `len % n` get one more).
fn chunk(len: usize, n: usize, k: usize) -> Range<usize> {
    let (per, rem) = (len / n, len % n);
    let at = |k: usize| k * per + k.min(rem);
    at(k)..at(k + 1)
}

/// (shared view of a, mutable view of b) for disjoint ranges of one buffer.
fn split_pair<T>(buf: &mut [T], a: Range<usize>, b: Range<usize>) -> (&[T], &mut [T]) {
    assert!(
        a.end <= b.start || b.end <= a.start,
        "split_pair: ranges overlap"
    );
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

impl TcpComm {
    /// Listens, publishes `ip:port` through the store, connects to the next rank and accepts the previous.
    pub(crate) fn new(
        store: Arc<StoreClient>,
        rank: usize,
        world: usize,
        timeout: Duration,
        local_ip: std::net::IpAddr,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| CommError::Launch(format!("cannot start the tokio runtime: {e}")))?;
        let scratch = Mutex::new(Scratch {
            work: Vec::new(),
            recv: Vec::new(),
        });
        if world == 1 {
            return Ok(Self {
                rank,
                world,
                timeout,
                runtime,
                links: Mutex::new(None),
                scratch,
                store,
            });
        }
        let (next_rank, prev_rank) = ((rank + 1) % world, (rank + world - 1) % world);
        let io = |peer: usize, op: &'static str| {
            move |source: std::io::Error| CommError::PeerIo {
                rank,
                peer,
                op,
                source,
            }
        };
        let links = runtime.block_on(async {
            let socket = TcpSocket::new_v4().map_err(io(prev_rank, "listen"))?;
            let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
            socket
                .bind((std::net::Ipv4Addr::UNSPECIFIED, 0).into())
                .map_err(io(prev_rank, "listen"))?;
            let listener: TcpListener = socket.listen(16).map_err(io(prev_rank, "listen"))?;
            let port = listener
                .local_addr()
                .map_err(io(prev_rank, "listen"))?
                .port();
            let addrs =
                store.all_gather("tcp/addr", world, format!("{local_ip}:{port}").as_bytes())?;
            let next_addr: std::net::SocketAddr = String::from_utf8_lossy(&addrs[next_rank])
                .parse()
                .map_err(|_| CommError::Store {
                    rank,
                    addr: "store".into(),
                    detail: format!("rank {next_rank} published a bad address"),
                })?;
            let connect = async {
                let socket = TcpSocket::new_v4().map_err(io(next_rank, "connect"))?;
                let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
                let mut stream = socket
                    .connect(next_addr)
                    .await
                    .map_err(io(next_rank, "connect"))?;
                stream
                    .write_all(&(rank as u64).to_le_bytes())
                    .await
                    .map_err(io(next_rank, "connect"))?;
                Ok::<TcpStream, CommError>(stream)
            };
            let accept = async {
                let (mut stream, _) = listener.accept().await.map_err(io(prev_rank, "accept"))?;
                let mut hello = [0u8; 8];
                stream
                    .read_exact(&mut hello)
                    .await
                    .map_err(io(prev_rank, "accept"))?;
                let from = u64::from_le_bytes(hello);
                if from != prev_rank as u64 {
                    return Err(CommError::Store {
                        rank,
                        addr: "tcp".into(),
                        detail: format!("rank {from} connected, expected rank {prev_rank}"),
                    });
                }
                Ok(stream)
            };
            let joined =
                tokio::time::timeout(timeout, async { tokio::try_join!(connect, accept) }).await;
            let (next, prev) = joined.map_err(|_| CommError::Timeout {
                rank,
                peer: prev_rank,
                op: "tcp connect",
                timeout,
            })??;
            for s in [&next, &prev] {
                let _ = s.set_nodelay(true);
            }
            Ok::<Links, CommError>(Links { next, prev })
        })?;
        Ok(Self {
            rank,
            world,
            timeout,
            runtime,
            links: Mutex::new(Some(links)),
            scratch,
            store,
        })
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }
    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Turns a failed step into an error that names the rank that is gone, if the store knows one.
    fn step_error(&self, op: &'static str, err: StepError) -> CommError {
        let peer = match err.side {
            Side::Next => self.next_rank(),
            Side::Prev => self.prev_rank(),
        };
        let direct = match err.io {
            None => CommError::Timeout {
                rank: self.rank,
                peer,
                op,
                timeout: self.timeout,
            },
            Some(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                CommError::PeerGone {
                    rank: self.rank,
                    peer,
                    op,
                    detail: format!("connection to rank {peer} closed: {e}"),
                }
            }
            Some(source) => CommError::PeerIo {
                rank: self.rank,
                peer,
                op,
                source,
            },
        };
        let closed = match self.store.closed_ranks(DIAGNOSE_GRACE) {
            Ok(closed) => closed.into_iter().find(|&r| r != self.rank),
            Err(_) if self.rank != 0 => Some(0),
            Err(_) => None,
        };
        match closed {
            Some(gone) => CommError::PeerGone {
                rank: self.rank,
                peer: gone,
                op,
                detail: format!("it exited or was killed: its rendezvous connection closed first; seen here as: {direct}"),
            },
            None => direct,
        }
    }

    /// Runs `f` on the links; on failure drops them (the neighbours see EOF) and names the culprit.
    fn with_links<R>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(&mut Links) -> std::result::Result<R, StepError>,
    ) -> Result<R> {
        let mut guard = lock(&self.links);
        let Some(links) = guard.as_mut() else {
            return Err(CommError::Poisoned {
                rank: self.rank,
                op,
                cause: "the ring links were closed by an earlier failure".into(),
            });
        };
        match self.runtime.block_on(f(links)) {
            Ok(r) => Ok(r),
            Err(e) => {
                *guard = None;
                drop(guard);
                Err(self.step_error(op, e))
            }
        }
    }

    /// Ring reduce-scatter on f32 `work`, chunked by `ranges`: rank r ends with chunk r fully summed.
    fn ring_reduce_scatter(
        &self,
        op: &'static str,
        work: &mut [f32],
        recv_tmp: &mut Vec<f32>,
        ranges: &dyn Fn(usize) -> Range<usize>,
    ) -> Result<()> {
        let n = self.world;
        let timeout = self.timeout;
        let rank = self.rank;
        self.with_links(op, async |links| {
            for s in 0..n - 1 {
                let send_k = (rank + 2 * n - s - 1) % n;
                let recv_k = (rank + 2 * n - s - 2) % n;
                let (send_r, recv_r) = (ranges(send_k), ranges(recv_k));
                recv_tmp.resize(recv_r.len(), 0.0);
                let (send, acc) = split_pair(work, send_r, recv_r);
                ring_step(
                    links,
                    bytemuck::cast_slice(send),
                    &mut recv_tmp[..],
                    timeout,
                    |off, block| add_assign_f32(&mut acc[off..off + block.len()], block),
                )
                .await?;
            }
            Ok(())
        })
    }

    /// Ring all-gather on bytes: rank r starts with chunk r (byte `ranges`), ends with all.
    fn ring_all_gather(
        &self,
        op: &'static str,
        buf: &mut [u8],
        ranges: &dyn Fn(usize) -> Range<usize>,
    ) -> Result<()> {
        let n = self.world;
        let timeout = self.timeout;
        let rank = self.rank;
        self.with_links(op, async |links| {
            for s in 0..n - 1 {
                let send_k = (rank + n - s) % n;
                let recv_k = (rank + 2 * n - s - 1) % n;
                let (send, recv) = split_pair(buf, ranges(send_k), ranges(recv_k));
                ring_step(links, send, recv, timeout, |_, _| {}).await?;
            }
            Ok(())
        })
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> Backend {
        Backend::Tcp
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_gather_bytes(&self, _dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let m = send.len();
        recv[self.rank * m..(self.rank + 1) * m].copy_from_slice(send);
        if self.world == 1 || m == 0 {
            return Ok(());
        }
        self.ring_all_gather("all_gather", recv, &|k| k * m..(k + 1) * m)
    }

    fn reduce_scatter_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let elem = dtype.size_bytes();
        let m = recv.len() / elem;
        let mut scratch = lock(&self.scratch);
        let Scratch {
            work,
            recv: recv_tmp,
        } = &mut *scratch;
        work.resize(send.len() / elem, 0.0);
        match dtype {
            DType::F32 => bytemuck::cast_slice_mut(&mut work[..]).copy_from_slice(send),
            DType::Bf16 => widen_bf16(send, work),
        }
        if self.world > 1 && m > 0 {
            self.ring_reduce_scatter("reduce_scatter", work, recv_tmp, &|k| k * m..(k + 1) * m)?;
        }
        let mine = &work[self.rank * m..(self.rank + 1) * m];
        match dtype {
            DType::F32 => recv.copy_from_slice(bytemuck::cast_slice(mine)),
            DType::Bf16 => narrow_to_bf16(mine, recv),
        }
        Ok(())
    }

    fn all_reduce_bytes(&self, dtype: DType, buf: &mut [u8]) -> Result<()> {
        let elem = dtype.size_bytes();
        let len = buf.len() / elem;
        let n = self.world;
        if n == 1 || len == 0 {
            return Ok(());
        }
        let mut scratch = lock(&self.scratch);
        let Scratch {
            work,
            recv: recv_tmp,
        } = &mut *scratch;
        let ranges = |k: usize| chunk(len, n, k);
        let mine = ranges(self.rank);
        match (dtype, bytemuck::try_cast_slice_mut::<u8, f32>(buf)) {
            (DType::F32, Ok(in_place)) => {
                self.ring_reduce_scatter("all_reduce", in_place, recv_tmp, &ranges)?
            }
            (DType::F32, Err(_)) => {
                work.resize(len, 0.0);
                bytemuck::cast_slice_mut(&mut work[..]).copy_from_slice(buf);
                self.ring_reduce_scatter("all_reduce", work, recv_tmp, &ranges)?;
                buf[mine.start * 4..mine.end * 4]
                    .copy_from_slice(bytemuck::cast_slice(&work[mine.clone()]));
            }
            (DType::Bf16, _) => {
                work.resize(len, 0.0);
                widen_bf16(buf, work);
                self.ring_reduce_scatter("all_reduce", work, recv_tmp, &ranges)?;
                narrow_to_bf16(&work[mine.clone()], &mut buf[mine.start * 2..mine.end * 2]);
            }
        }
        drop(scratch);
        self.ring_all_gather("all_reduce", buf, &|k| {
            let r = ranges(k);
            r.start * elem..r.end * elem
        })
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        let (rank, timeout) = (self.rank, self.timeout);
        let forward = self.next_rank() != root;
        self.with_links("broadcast", async |links| {
            let block_bytes = RECV_BLOCK_ELEMS * 4;
            let work = async {
                let mut off = 0;
                while off < buf.len() {
                    let end = (off + block_bytes).min(buf.len());
                    if rank != root {
                        links
                            .prev
                            .read_exact(&mut buf[off..end])
                            .await
                            .map_err(socket_error(Side::Prev))?;
                    }
                    if forward {
                        links
                            .next
                            .write_all(&buf[off..end])
                            .await
                            .map_err(socket_error(Side::Next))?;
                    }
                    off = end;
                }
                Ok(())
            };
            tokio::time::timeout(timeout, work)
                .await
                .unwrap_or(Err(StepError {
                    side: if rank == root { Side::Next } else { Side::Prev },
                    io: None,
                }))
        })
    }

    fn barrier(&self) -> Result<()> {
        let mut token = [0f32; 1];
        self.all_reduce_bytes(DType::F32, bytemuck::cast_slice_mut(&mut token))
    }

    fn as_dyn(&self) -> &dyn Communicator {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_uneven_lengths() {
        for (len, n) in [(10, 3), (2, 4), (0, 2), (8, 4)] {
            let parts: Vec<_> = (0..n).map(|k| chunk(len, n, k)).collect();
            assert_eq!((parts[0].start, parts[n - 1].end), (0, len));
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
        }
        let mut v = [0, 1, 2, 3, 4, 5];
        let (a, b) = split_pair(&mut v, 4..6, 0..2);
        assert_eq!(a, &[4, 5]);
        b[0] = 9;
        assert_eq!(v[0], 9);
    }
}
