//! The rendezvous key-value store: served by rank 0 over TCP, `set`/`get`/`wait` with timeouts.
//!
//! Each rank keeps one connection open for its lifetime; when it closes (the process exited or
//! was killed) the server records `closed/<rank>`, which is how a survivor learns who died.
//!
//! What it accepts, and from whom: it listens only on the address MASTER_ADDR resolves to on rank 0
//! (127.0.0.1 for one node's `strata launch`), serves at most 4096 connections and frames of at
//! most 16 MiB (`CONNECTIONS_MAX`, `FRAME_BYTES_MAX`), and does not authenticate: any process that can reach
//! MASTER_ADDR:MASTER_PORT while the job runs can read and set its keys (addresses, the NCCL id), as with
//! torchrun's store. Across hosts, run it on a network only the job's hosts share.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{CommError, Result};

/// Largest frame either side accepts.
const FRAME_BYTES_MAX: usize = 16 << 20;
/// How often server threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Connections the server serves at once.
const CONNECTIONS_MAX: usize = 4096;

#[derive(Serialize, Deserialize, Debug)]
enum Request {
    Hello { rank: usize },
    Set { key: String, value: Vec<u8> },
    Get { key: String },
    Wait { keys: Vec<String>, timeout_ms: u64 },
    Add { key: String, delta: i64 },
    Closed,
}

#[derive(Serialize, Deserialize, Debug)]
enum Response {
    Ok,
    Value(Option<Vec<u8>>),
    Missing(Vec<String>),
    Int(i64),
    Ranks(Vec<usize>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn encode<T: Serialize>(value: &T) -> std::io::Result<Vec<u8>> {
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e.to_string()))?;
    let len = u32::try_from(body.len())
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "frame too large"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> std::io::Result<T> {
    bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e.to_string()))
}

/// Fills `buf`; `Ok(false)` on EOF before the first byte. Read timeouts retry while `keep_going()`.
fn read_full(
    stream: &mut TcpStream,
    buf: &mut [u8],
    keep_going: &impl Fn() -> bool,
) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                if !keep_going() {
                    return Err(ErrorKind::TimedOut.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads one frame; `Ok(None)` on a clean EOF between frames.
fn read_frame(
    stream: &mut TcpStream,
    keep_going: impl Fn() -> bool,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 4];
    if !read_full(stream, &mut header, &keep_going)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len];
    if len > 0 && !read_full(stream, &mut body, &keep_going)? {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(body))
}

struct ServerState {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    stop: AtomicBool,
}

/// The store server, run by rank 0. Dropping it stops its threads.
pub struct StoreServer {
    state: Arc<ServerState>,
    accept_thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl StoreServer {
    /// Listens on the address `host` resolves to (MASTER_ADDR: the address the ranks were told, so a
    /// loopback address stays loopback) at `port` (0 picks a free port; see `port()`). Where `host`
    /// resolves to several addresses, the first this machine can listen on.
    pub fn bind(host: &str, port: u16, rank: usize) -> Result<Self> {
        let shown = format!("{host}:{port}");
        let fail = |detail: String| CommError::Store {
            rank,
            addr: shown.clone(),
            detail,
        };
        let candidates: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| fail(format!("rank 0 cannot resolve MASTER_ADDR={host}: {e}")))?
            .collect();
        let mut last_error = format!("MASTER_ADDR={host} resolves to no address");
        let mut bound = None;
        for addr in &candidates {
            match TcpListener::bind(addr) {
                Ok(listener) => {
                    bound = Some(listener);
                    break;
                }
                Err(e) => {
                    last_error = format!(
                        "rank 0 cannot listen on {addr} (MASTER_ADDR={host}, MASTER_PORT={port}): {e}{}",
                        if e.kind() == ErrorKind::AddrNotAvailable {
                            "; MASTER_ADDR must be an address of rank 0's host"
                        } else {
                            ""
                        }
                    )
                }
            }
        }
        let listener = bound.ok_or_else(|| fail(last_error))?;
        let addr = listener
            .local_addr()
            .map_err(|e| fail(format!("cannot read the listening address: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(format!("cannot make the listener non-blocking: {e}")))?;
        let state = Arc::new(ServerState {
            map: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let accept_state = Arc::clone(&state);
        let accept_thread = std::thread::Builder::new()
            .name("strata-store".into())
            .spawn(move || accept_loop(listener, accept_state))
            .map_err(|e| fail(format!("cannot start: {e}")))?;
        Ok(Self {
            state,
            accept_thread: Some(accept_thread),
            addr,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        self.state.changed.notify_all();
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, state: Arc<ServerState>) {
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    while !state.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                handlers.retain(|h| !h.is_finished());
                if handlers.len() >= CONNECTIONS_MAX {
                    continue; // dropping the stream refuses the client
                }
                let conn_state = Arc::clone(&state);
                if let Ok(h) = std::thread::Builder::new()
                    .name("strata-store-conn".into())
                    .spawn(move || serve(stream, conn_state))
                {
                    handlers.push(h);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
    for h in handlers {
        let _ = h.join();
    }
}

fn serve(mut stream: TcpStream, state: Arc<ServerState>) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut hello_rank = None;
    while let Ok(Some(frame)) = read_frame(&mut stream, || !state.stop.load(Ordering::Acquire)) {
        let Ok(request) = decode::<Request>(&frame) else {
            break;
        };
        let response = handle(&state, request, &mut hello_rank);
        let Ok(bytes) = encode(&response) else { break };
        if stream.write_all(&bytes).is_err() {
            break;
        }
    }
    if let (Some(rank), false) = (hello_rank, state.stop.load(Ordering::Acquire)) {
        let mut map = lock(&state.map);
        let order = map.keys().filter(|k| k.starts_with("closed/")).count() as u64;
        map.insert(format!("closed/{rank}"), order.to_le_bytes().to_vec());
        state.changed.notify_all();
    }
}

fn handle(state: &ServerState, request: Request, hello_rank: &mut Option<usize>) -> Response {
    match request {
        Request::Hello { rank } => {
            *hello_rank = Some(rank);
            Response::Ok
        }
        Request::Set { key, value } => {
            lock(&state.map).insert(key, value);
            state.changed.notify_all();
            Response::Ok
        }
        Request::Get { key } => Response::Value(lock(&state.map).get(&key).cloned()),
        Request::Add { key, delta } => {
            let mut map = lock(&state.map);
            let old = map
                .get(&key)
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(i64::from_le_bytes)
                .unwrap_or(0);
            let new = old.saturating_add(delta);
            map.insert(key, new.to_le_bytes().to_vec());
            state.changed.notify_all();
            Response::Int(new)
        }
        Request::Wait { keys, timeout_ms } => {
            let deadline = Instant::now() + Duration::from_millis(timeout_ms);
            let mut map = lock(&state.map);
            loop {
                let missing: Vec<String> = keys
                    .iter()
                    .filter(|k| !map.contains_key(*k))
                    .cloned()
                    .collect();
                let now = Instant::now();
                if missing.is_empty() || now >= deadline || state.stop.load(Ordering::Acquire) {
                    return if missing.is_empty() {
                        Response::Ok
                    } else {
                        Response::Missing(missing)
                    };
                }
                map = state
                    .changed
                    .wait_timeout(map, (deadline - now).min(POLL))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        Request::Closed => {
            let map = lock(&state.map);
            let mut closed: Vec<(u64, usize)> = map
                .iter()
                .filter_map(|(k, v)| {
                    let rank = k.strip_prefix("closed/")?.parse().ok()?;
                    Some((
                        u64::from_le_bytes(<[u8; 8]>::try_from(v.as_slice()).ok()?),
                        rank,
                    ))
                })
                .collect();
            closed.sort_unstable();
            Response::Ranks(closed.into_iter().map(|(_, rank)| rank).collect())
        }
    }
}

/// A rank's connection to the store.
pub struct StoreClient {
    stream: Mutex<TcpStream>,
    /// Rank 0 keeps the server alive as long as its client (dropped after the stream).
    server: Option<StoreServer>,
    addr: String,
    rank: usize,
    timeout: Duration,
}

impl StoreClient {
    /// Connects to `host:port`, retrying until `timeout` (rank 0 may start last), and registers `rank`.
    pub fn connect(host: &str, port: u16, rank: usize, timeout: Duration) -> Result<Self> {
        let addr = format!("{host}:{port}");
        let deadline = Instant::now() + timeout;
        let mut last_error;
        let stream = loop {
            let attempt = (host, port).to_socket_addrs().map(|mut a| a.next());
            match attempt {
                Ok(Some(sock)) => {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(10));
                    match TcpStream::connect_timeout(&sock, left.min(Duration::from_secs(1))) {
                        Ok(s) => break s,
                        Err(e) => last_error = e.to_string(),
                    }
                }
                Ok(None) => last_error = "the name resolves to no address".into(),
                Err(e) => last_error = format!("cannot resolve MASTER_ADDR: {e}"),
            }
            if Instant::now() >= deadline {
                return Err(CommError::Store {
                    rank,
                    addr,
                    detail: format!(
                        "not reachable within {timeout:?} (last error: {last_error}); is rank 0 running, \
                         and are MASTER_ADDR and MASTER_PORT the same on every rank?"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = stream.set_nodelay(true);
        let client = Self {
            stream: Mutex::new(stream),
            server: None,
            addr,
            rank,
            timeout,
        };
        client.request(Request::Hello { rank }, timeout)?;
        Ok(client)
    }

    /// Makes this client own `server`, so the store lives as long as the communicator using it.
    pub fn keep_server(mut self, server: StoreServer) -> Self {
        self.server = Some(server);
        self
    }

    /// The local address of the connection (the interface that reaches rank 0).
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        lock(&self.stream).local_addr().ok().map(|a| a.ip())
    }

    /// Whether this client owns the server.
    pub fn serves(&self) -> bool {
        self.server.is_some()
    }

    fn error(&self, detail: String) -> CommError {
        CommError::Store {
            rank: self.rank,
            addr: self.addr.clone(),
            detail,
        }
    }

    fn request(&self, request: Request, wait: Duration) -> Result<Response> {
        self.exchange(request, wait.saturating_add(Duration::from_secs(5)))
            .map_err(|f| self.error(f.detail))
    }

    /// Sends `request` and reads the answer, each within `io_timeout`; a failure says whether the store
    /// closed the connection (rank 0 is gone) or only did not answer in time.
    fn exchange(
        &self,
        request: Request,
        io_timeout: Duration,
    ) -> std::result::Result<Response, Failure> {
        let closed = |e: &std::io::Error| {
            matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            )
        };
        let bytes = encode(&request).map_err(|e| Failure {
            closed: false,
            detail: format!("cannot encode a request: {e}"),
        })?;
        let mut stream = lock(&self.stream);
        stream
            .set_read_timeout(Some(io_timeout))
            .and_then(|()| stream.set_write_timeout(Some(io_timeout)))
            .and_then(|()| stream.write_all(&bytes))
            .map_err(|e| Failure {
                closed: closed(&e),
                detail: format!("send failed (rank 0 gone?): {e}"),
            })?;
        let frame = read_frame(&mut stream, || false)
            .map_err(|e| Failure {
                closed: closed(&e),
                detail: if e.kind() == ErrorKind::TimedOut {
                    format!(
                        "no answer within {io_timeout:?} (rank 0 stopped, stuck or overloaded?)"
                    )
                } else {
                    format!("no answer (rank 0 gone?): {e}")
                },
            })?
            .ok_or_else(|| Failure {
                closed: true,
                detail: "connection closed by rank 0 (rank 0 exited?)".into(),
            })?;
        decode(&frame).map_err(|e| Failure {
            closed: false,
            detail: format!("bad answer: {e}"),
        })
    }

    /// Stores `value` under `key`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        match self.request(
            Request::Set {
                key: key.into(),
                value: value.to_vec(),
            },
            self.timeout,
        )? {
            Response::Ok => Ok(()),
            other => Err(self.error(format!("unexpected answer to set: {other:?}"))),
        }
    }

    /// The value under `key`, if set.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.request(Request::Get { key: key.into() }, self.timeout)? {
            Response::Value(v) => Ok(v),
            other => Err(self.error(format!("unexpected answer to get: {other:?}"))),
        }
    }

    /// Adds `delta` to the counter under `key`, returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        match self.request(
            Request::Add {
                key: key.into(),
                delta,
            },
            self.timeout,
        )? {
            Response::Int(v) => Ok(v),
            other => Err(self.error(format!("unexpected answer to add: {other:?}"))),
        }
    }

    /// Waits up to `timeout` for all `keys`; returns the keys still missing (empty when all are set).
    pub fn wait(&self, keys: &[String], timeout: Duration) -> Result<Vec<String>> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match self.request(
            Request::Wait {
                keys: keys.to_vec(),
                timeout_ms,
            },
            timeout,
        )? {
            Response::Ok => Ok(Vec::new()),
            Response::Missing(m) => Ok(m),
            other => Err(self.error(format!("unexpected answer to wait: {other:?}"))),
        }
    }

    /// Every rank sets `prefix/<rank>` to `value`; returns all ranks' values in rank order, or a
    /// timeout error naming the ranks that never set theirs.
    pub fn all_gather(
        &self,
        prefix: &str,
        world_size: usize,
        value: &[u8],
    ) -> Result<Vec<Vec<u8>>> {
        self.set(&format!("{prefix}/{}", self.rank), value)?;
        let keys: Vec<String> = (0..world_size).map(|r| format!("{prefix}/{r}")).collect();
        let missing = self.wait(&keys, self.timeout)?;
        if !missing.is_empty() {
            let ranks = missing
                .iter()
                .filter_map(|k| k.rsplit('/').next()?.parse().ok())
                .collect();
            return Err(CommError::StoreTimeout {
                rank: self.rank,
                key: format!("{prefix}/*"),
                missing: ranks,
                timeout: self.timeout,
            });
        }
        keys.iter()
            .map(|k| {
                self.get(k)?
                    .ok_or_else(|| self.error(format!("key {k} vanished")))
            })
            .collect()
    }

    /// Waits up to `timeout` for `key` and returns its value; the error names `owner`, the rank expected to set it.
    pub fn wait_get(&self, key: &str, owner: usize) -> Result<Vec<u8>> {
        let missing = self.wait(&[key.to_string()], self.timeout)?;
        if !missing.is_empty() {
            return Err(CommError::StoreTimeout {
                rank: self.rank,
                key: key.into(),
                missing: vec![owner],
                timeout: self.timeout,
            });
        }
        self.get(key)?
            .ok_or_else(|| self.error(format!("key {key} vanished")))
    }

    /// Ranks whose store connection has closed (exited or killed), first closed first, waiting up to `grace` for the
    /// first to show up. `Err` usually means rank 0 itself is gone.
    pub fn closed_ranks(&self, grace: Duration) -> Result<Vec<usize>> {
        let deadline = Instant::now() + grace;
        loop {
            let ranks = match self.request(Request::Closed, grace)? {
                Response::Ranks(r) => r,
                other => return Err(self.error(format!("unexpected answer to closed: {other:?}"))),
            };
            if !ranks.is_empty() || Instant::now() >= deadline {
                return Ok(ranks);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the store knows of closed ranks, telling a store that is gone (its connection closed: rank 0
    /// exited or was killed) from one that does not answer within `grace` + 1 s (rank 0 stopped or stuck):
    /// only the first is evidence that rank 0 is gone.
    pub fn probe_closed(&self, grace: Duration) -> StoreView {
        let deadline = Instant::now() + grace;
        loop {
            match self.exchange(Request::Closed, grace.saturating_add(PROBE_SLACK)) {
                Ok(Response::Ranks(r)) if !r.is_empty() || Instant::now() >= deadline => {
                    return StoreView::Closed(r)
                }
                Ok(Response::Ranks(_)) => std::thread::sleep(Duration::from_millis(20)),
                Ok(other) => {
                    return StoreView::NoAnswer(format!("unexpected answer to closed: {other:?}"))
                }
                Err(f) if f.closed => return StoreView::StoreGone(f.detail),
                Err(f) => return StoreView::NoAnswer(f.detail),
            }
        }
    }
}

/// Why a request got no answer.
struct Failure {
    /// The connection closed or was reset: the store (rank 0) is gone.
    closed: bool,
    detail: String,
}

/// How long past its grace a probe of the store waits for the answer (the store answers in microseconds).
const PROBE_SLACK: Duration = Duration::from_secs(1);

/// What [`StoreClient::probe_closed`] learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreView {
    /// Ranks whose store connection closed, first closed first (empty: none within the grace).
    Closed(Vec<usize>),
    /// The store's connection closed or was reset: rank 0 exited or was killed.
    StoreGone(String),
    /// No answer in time, or a wrong one: rank 0 may be stopped, stuck or overloaded, not necessarily gone.
    NoAnswer(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_wait_add_and_closed_ranks() -> Result<()> {
        let server = StoreServer::bind("127.0.0.1", 0, 0)?;
        assert!(server.addr().ip().is_loopback());
        let timeout = Duration::from_secs(1);
        let a = StoreClient::connect("127.0.0.1", server.port(), 0, timeout)?;
        let b = StoreClient::connect("127.0.0.1", server.port(), 1, timeout)?;
        a.set("k", b"v")?;
        assert_eq!(b.get("k")?.as_deref(), Some(&b"v"[..]));
        assert_eq!(b.get("none")?, None);
        assert_eq!(a.add("c", 2)?, 2);
        assert_eq!(b.add("c", 3)?, 5);
        let missing = a.wait(&["k".into(), "x".into()], Duration::from_millis(100))?;
        assert_eq!(missing, vec!["x".to_string()]);
        let t = std::thread::spawn(move || b.all_gather("g", 2, b"1").map(|v| (v, b)));
        let got = a.all_gather("g", 2, b"0")?;
        assert_eq!(got, vec![b"0".to_vec(), b"1".to_vec()]);
        let (_, b) = t
            .join()
            .map_err(|_| CommError::Env("thread panicked".into()))??;
        drop(b);
        assert_eq!(a.closed_ranks(Duration::from_secs(2))?, vec![1]);
        let err = a
            .all_gather("h", 2, b"0")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("[1]"), "{err}");
        Ok(())
    }

    #[test]
    fn the_store_listens_on_master_addr_only() {
        // Loopback stays loopback: the store is not reachable through this host's other addresses.
        let server = StoreServer::bind("127.0.0.1", 0, 0).expect("binds");
        assert_eq!(server.addr().ip(), std::net::Ipv4Addr::LOCALHOST);
        let other = StoreServer::bind("127.0.0.2", 0, 0).expect("binds 127.0.0.2");
        let err = StoreClient::connect("127.0.0.1", other.port(), 1, Duration::from_millis(200))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("not reachable"), "{err}");
        // An address of another host cannot be listened on, and the error says why.
        let err = StoreServer::bind("192.0.2.1", 0, 0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("MASTER_ADDR=192.0.2.1") && err.contains("an address of rank 0's host"),
            "{err}"
        );
    }

    #[test]
    fn unreachable_store_is_a_clear_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let err = StoreClient::connect("127.0.0.1", port, 1, Duration::from_millis(300))
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.contains("MASTER_PORT") && err.contains("rank 1"),
            "{err}"
        );
    }
}
