//! The `tcp` backend: ring algorithms over TCP, for ranks on different hosts. tokio connects the
//! ring (with timeouts); the collectives then run on the caller's thread over the non-blocking
//! sockets (see `ring`).
//!
//! Rank r writes to rank r+1 and reads from rank r-1. Sums travel as f32 partials (bf16 inputs
//! are widened first), so bf16 accumulates in f32; gathers move the raw element bytes.
//!
//! Block size of the long reductions when ranks outnumber their host's cores: 256 KiB blocks are
//! forwarded while still in cache, which wins when the cores share a cache (4 ranks on the 2-vCPU
//! dev VM: 1.2–1.4 GB/s busbw against 0.9–1.0 with 4 MiB blocks); where they share none every
//! block crosses between caches anyway, and the fewer hand-offs of 4 MiB blocks win (0.85–1.0
//! against 0.65). Which holds can change while a job runs, so rank 0 times the calls and chooses
//! (`crate::choose`); every rank must cut the buffer the same way, so rank 0 sends its choice down
//! the ring before each such call (4 bytes, world - 1 hops). With a core per rank 256 KiB won in
//! both placements, so nothing is chosen and nothing is sent.

mod ring;

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ring::Links;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::choose::{Chooser, Reduction, CHOSEN_MIN_BYTES};
use crate::comm::Communicator;
use crate::elem::{add_assign_f32, narrow_to_bf16, widen_bf16, DType};
use crate::error::{CommError, Result};
use crate::store::{StoreClient, StoreView};
use crate::Backend;

/// Socket buffer size asked of the kernel.
const SOCKET_BUFFER_BYTES: u32 = 4 << 20;
/// Yields before sleeping in poll(2) when ranks outnumber cores (see `ring`); with a core per
/// rank a waiting rank sleeps at once (measured faster: nothing else needs the core).
const YIELDS_OVERSUBSCRIBED_MAX: u32 = 32;
/// How long survivors wait for rank 0's store to report who closed, after a link failed.
const DIAGNOSE_GRACE: Duration = Duration::from_millis(500);

/// What a rank publishes at start-up: where it listens, and how many cores it may run on.
struct Peer {
    addr: std::net::SocketAddr,
    cores: usize,
}

impl Peer {
    /// Reads `ip:port cores`.
    fn parse(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (addr, cores) = text.split_once(' ')?;
        Some(Self {
            addr: addr.parse().ok()?,
            cores: cores.parse().ok()?,
        })
    }

    /// Whether rank `r`'s host has more ranks (those with its address) than `r` has cores.
    fn oversubscribed(peers: &[Peer], r: usize) -> bool {
        let ip = peers[r].addr.ip();
        peers.iter().filter(|p| p.addr.ip() == ip).count() > peers[r].cores
    }
}

struct Scratch {
    /// The f32 working copy for sums.
    work: Vec<f32>,
}

/// One rank's end of the ring.
pub(crate) struct TcpComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// None for a world of one, or after a failure (dropping the links tells the neighbours).
    links: Mutex<Option<Links>>,
    scratch: Mutex<Scratch>,
    store: Arc<StoreClient>,
    /// Yields before a wait for a peer sleeps (more when ranks outnumber cores).
    yields_max: u32,
    /// Some when some host has more ranks than cores: long reductions then choose their blocks.
    /// Rank 0 times the calls (one chooser per `Reduction`); other ranks use the block size it sends.
    block_choice: Option<Mutex<[Chooser<usize>; 2]>>,
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

/// Element range of chunk k of n over `len` elements (uneven: the first `len % n` get one more).
fn chunk(len: usize, n: usize, k: usize) -> Range<usize> {
    let (per, rem) = (len / n, len % n);
    let at = |k: usize| k * per + k.min(rem);
    at(k)..at(k + 1)
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
        let scratch = Mutex::new(Scratch { work: Vec::new() });
        if world == 1 {
            return Ok(Self {
                rank,
                world,
                timeout,
                links: Mutex::new(None),
                scratch,
                store,
                yields_max: 0,
                block_choice: None,
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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| CommError::Launch(format!("cannot start the tokio runtime: {e}")))?;
        let listener: TcpListener = runtime.block_on(async {
            let socket = TcpSocket::new_v4().map_err(io(prev_rank, "listen"))?;
            let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
            // The interface that reaches rank 0, the one published: loopback stays loopback.
            let ip = match local_ip {
                std::net::IpAddr::V4(v4) => v4,
                std::net::IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
            };
            socket
                .bind((ip, 0).into())
                .map_err(io(prev_rank, "listen"))?;
            socket.listen(16).map_err(io(prev_rank, "listen"))
        })?;
        let port = listener
            .local_addr()
            .map_err(io(prev_rank, "listen"))?
            .port();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let published = format!("{local_ip}:{port} {cores}");
        let peers = store
            .all_gather("tcp/addr", world, published.as_bytes())?
            .iter()
            .enumerate()
            .map(|(r, bytes)| {
                Peer::parse(bytes).ok_or_else(|| CommError::Store {
                    rank,
                    addr: "store".into(),
                    detail: format!("rank {r} published a bad address and core count"),
                })
            })
            .collect::<Result<Vec<Peer>>>()?;
        let next_addr = peers[next_rank].addr;
        let connect_timeout = |peer: usize| {
            move |_| CommError::Timeout {
                rank,
                peer,
                op: "tcp connect",
                timeout,
            }
        };
        // Every listener exists before any address is published, so connecting first cannot
        // wait on an accept.
        let next = runtime
            .block_on(async {
                tokio::time::timeout(timeout, async {
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
                })
                .await
            })
            .map_err(connect_timeout(next_rank))??;
        let prev = runtime
            .block_on(async {
                tokio::time::timeout(timeout, async {
                    let (mut stream, _) =
                        listener.accept().await.map_err(io(prev_rank, "accept"))?;
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
                })
                .await
            })
            .map_err(connect_timeout(prev_rank))??;
        for s in [&next, &prev] {
            let _ = s.set_nodelay(true);
        }
        // The data path runs on the caller's thread over the raw non-blocking sockets.
        let links = runtime.block_on(async {
            Ok::<Links, CommError>(Links {
                next: next.into_std().map_err(io(next_rank, "connect"))?,
                prev: prev.into_std().map_err(io(prev_rank, "accept"))?,
            })
        })?;
        drop(runtime);
        let yields_max = if Peer::oversubscribed(&peers, rank) {
            YIELDS_OVERSUBSCRIBED_MAX
        } else {
            0
        };
        let block_choice = (0..world)
            .any(|r| Peer::oversubscribed(&peers, r))
            .then(|| {
                let chooser = || Chooser::new(ring::BLOCK_BYTES, ring::BLOCK_BYTES_LARGE);
                Mutex::new([chooser(), chooser()])
            });
        Ok(Self {
            rank,
            world,
            timeout,
            links: Mutex::new(Some(links)),
            scratch,
            store,
            yields_max,
            block_choice,
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
        // Only a closed connection is evidence that a rank is gone: a store that does not answer belongs
        // to a rank 0 that may be stopped (SIGSTOP) or stuck, whose sockets are still open.
        let (gone, how) = match self.store.probe_closed(DIAGNOSE_GRACE) {
            StoreView::Closed(closed) => (
                closed.into_iter().find(|&r| r != self.rank),
                "its rendezvous connection closed first",
            ),
            StoreView::StoreGone(_) if self.rank != 0 => {
                (Some(0), "its rendezvous store closed its connection")
            }
            StoreView::StoreGone(_) | StoreView::NoAnswer(_) => (None, ""),
        };
        match gone {
            Some(gone) => CommError::PeerGone {
                rank: self.rank,
                peer: gone,
                op,
                detail: format!("it exited or was killed: {how}; seen here as: {direct}"),
            },
            None => direct,
        }
    }

    /// Runs `f` on the ring's links; on failure drops them (the neighbours see EOF) and names the
    /// culprit.
    fn with_links(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Links) -> std::result::Result<(), StepError>,
    ) -> Result<()> {
        let mut guard = lock(&self.links);
        let Some(links) = guard.as_mut() else {
            return Err(CommError::Poisoned {
                rank: self.rank,
                op,
                cause: "the ring links were closed by an earlier failure".into(),
            });
        };
        match f(links) {
            Ok(()) => Ok(()),
            Err(e) => {
                *guard = None;
                drop(guard);
                Err(self.step_error(op, e))
            }
        }
    }

    /// Runs the ring `steps` over `buf` cut into `chunks`, in blocks of at most `block_bytes`.
    fn run_ring<T: bytemuck::Pod>(
        &self,
        links: &mut Links,
        buf: &mut [T],
        chunks: impl Iterator<Item = Range<usize>>,
        steps: &[ring::Step],
        add: fn(&mut [T], &[T]),
        block_bytes: usize,
    ) -> std::result::Result<(), StepError> {
        let blocks = ring::Blocks::new(buf, chunks, block_bytes);
        ring::run(links, &blocks, steps, add, self.timeout, self.yields_max)
    }

    /// Runs the ring `steps` over `buf` cut into `chunks`.
    fn pipeline<T: bytemuck::Pod>(
        &self,
        op: &'static str,
        buf: &mut [T],
        chunks: impl Iterator<Item = Range<usize>>,
        steps: &[ring::Step],
        add: fn(&mut [T], &[T]),
    ) -> Result<()> {
        self.with_links(op, |links| {
            self.run_ring(links, buf, chunks, steps, add, ring::BLOCK_BYTES)
        })
    }

    /// `pipeline` for a reduction: a long one first receives rank 0's block size down the ring,
    /// and rank 0 times it to choose the next.
    fn reduction(
        &self,
        which: Reduction,
        op: &'static str,
        buf: &mut [f32],
        chunks: impl Iterator<Item = Range<usize>>,
        steps: &[ring::Step],
    ) -> Result<()> {
        let bytes = std::mem::size_of_val(buf);
        let Some(block_choice) = self
            .block_choice
            .as_ref()
            .filter(|_| bytes >= CHOSEN_MIN_BYTES)
        else {
            return self.pipeline(op, buf, chunks, steps, add_assign_f32);
        };
        self.with_links(op, |links| {
            let mut word = [0u32];
            if self.rank == 0 {
                word[0] = lock(block_choice)[which as usize].next() as u32;
            }
            let chain = ring::broadcast_steps(self.rank, 0, self.world);
            self.run_ring(
                links,
                &mut word,
                [0..1, 1..1].into_iter(),
                &chain,
                |_, _| {},
                4,
            )?;
            let block = match word[0] as usize {
                ring::BLOCK_BYTES_LARGE => ring::BLOCK_BYTES_LARGE,
                _ => ring::BLOCK_BYTES,
            };
            let start = Instant::now();
            self.run_ring(links, buf, chunks, steps, add_assign_f32, block)?;
            if self.rank == 0 {
                lock(block_choice)[which as usize].record(block, bytes, start.elapsed());
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
        let steps: Vec<_> = ring::all_gather_steps(self.rank, self.world).collect();
        let chunks = (0..self.world).map(|k| k * m..(k + 1) * m);
        self.pipeline("all_gather", recv, chunks, &steps, |_, _| {})
    }

    fn reduce_scatter_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let elem = dtype.size_bytes();
        let m = recv.len() / elem;
        let mut scratch = lock(&self.scratch);
        let work = &mut scratch.work;
        work.resize(send.len() / elem, 0.0);
        match dtype {
            DType::F32 => bytemuck::cast_slice_mut(&mut work[..]).copy_from_slice(send),
            DType::Bf16 => widen_bf16(send, work),
        }
        if self.world > 1 && m > 0 {
            let steps: Vec<_> = ring::reduce_scatter_steps(self.rank, self.world).collect();
            let chunks = (0..self.world).map(|k| k * m..(k + 1) * m);
            self.reduction(
                Reduction::ReduceScatter,
                "reduce_scatter",
                work,
                chunks,
                &steps,
            )?;
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
        let steps: Vec<_> = ring::reduce_scatter_steps(self.rank, n)
            .chain(ring::all_gather_steps(self.rank, n))
            .collect();
        let chunks = |k: usize| chunk(len, n, k);
        if let (DType::F32, Ok(in_place)) = (dtype, bytemuck::try_cast_slice_mut::<u8, f32>(buf)) {
            return self.reduction(
                Reduction::AllReduce,
                "all_reduce",
                in_place,
                (0..n).map(chunks),
                &steps,
            );
        }
        // bf16 (or an unaligned f32 buffer): sum in an f32 copy, so bf16 accumulates in f32.
        let mut scratch = lock(&self.scratch);
        let work = &mut scratch.work;
        work.resize(len, 0.0);
        match dtype {
            DType::F32 => bytemuck::cast_slice_mut(&mut work[..]).copy_from_slice(buf),
            DType::Bf16 => widen_bf16(buf, work),
        }
        self.reduction(
            Reduction::AllReduce,
            "all_reduce",
            work,
            (0..n).map(chunks),
            &steps,
        )?;
        match dtype {
            DType::F32 => buf.copy_from_slice(bytemuck::cast_slice(&work[..])),
            DType::Bf16 => narrow_to_bf16(work, buf),
        }
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        // A chain root -> root+1 -> ...: chunk 0 is the buffer, chunk 1 is empty.
        let steps = ring::broadcast_steps(self.rank, root, self.world);
        let len = buf.len();
        self.pipeline(
            "broadcast",
            buf,
            [0..len, len..len].into_iter(),
            &steps,
            |_, _| {},
        )
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
    }

    #[test]
    fn peers_parse_and_count_ranks_per_host() {
        let peers = |v: &[&str]| -> Vec<Peer> {
            v.iter()
                .map(|s| Peer::parse(s.as_bytes()).expect("valid"))
                .collect()
        };
        for bad in ["127.0.0.1:5000", "127.0.0.1 2", "127.0.0.1:5000 two", ""] {
            assert!(Peer::parse(bad.as_bytes()).is_none(), "{bad:?}");
        }
        // Four ranks on a 2-core host.
        let one_host = peers(&[
            "127.0.0.1:1 2",
            "127.0.0.1:2 2",
            "127.0.0.1:3 2",
            "127.0.0.1:4 2",
        ]);
        assert!((0..4).all(|r| Peer::oversubscribed(&one_host, r)));
        // Two ranks on each of two 2-core hosts.
        let two_hosts = peers(&[
            "10.0.0.1:1 2",
            "10.0.0.1:2 2",
            "10.0.0.2:1 2",
            "10.0.0.2:2 2",
        ]);
        assert!((0..4).all(|r| !Peer::oversubscribed(&two_hosts, r)));
        // Three ranks on a 2-core host beside one on a 64-core host.
        let mixed = peers(&[
            "10.0.0.1:1 2",
            "10.0.0.1:2 2",
            "10.0.0.1:3 2",
            "10.0.0.2:1 64",
        ]);
        assert!(Peer::oversubscribed(&mixed, 0) && !Peer::oversubscribed(&mixed, 3));
    }
}
