//! `strata launch`: starts this node's ranks with the rendezvous variables set, prefixes their
//! output with the rank (unless `--no-prefix`), and when one fails stops the others and reports which
//! and how.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{CommError, Result};

/// Command-line arguments of `strata launch`.
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Ranks to start on this node.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Nodes in the job (each runs its own `strata launch`).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index in 0..nnodes.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, where rank 0 serves the rendezvous store.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of the rendezvous store [default: a free port on one node, 29500 on several].
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds the other ranks get to exit on their own after one fails, before SIGTERM (and as
    /// long again before SIGKILL).
    #[arg(long, default_value_t = 5.0)]
    pub grace_s: f64,
    /// Pass the ranks' output through as it is, without the `[rank N] ` prefix on each line (for JSON
    /// lines a program reads; lines stay whole).
    #[arg(long)]
    pub no_prefix: bool,
    /// The command each rank runs.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Set for every rank: a directory where a rank's communicator records, on its first failure, the
/// rank it blames (file `rank-<r>` holding the blamed rank).
pub const BLAME_DIR_VAR: &str = "STRATA_LAUNCH_BLAME_DIR";

/// The blame directory: a scratch directory, removed on drop (and by a later sweep if this
/// launcher is killed).
struct BlameDir(crate::scratch::ScratchDir);

impl BlameDir {
    fn create() -> Result<Self> {
        // Those of launchers that were killed first.
        crate::scratch::sweep(crate::scratch::LAUNCH_PREFIX);
        crate::scratch::ScratchDir::create(crate::scratch::LAUNCH_PREFIX)
            .map(Self)
            .map_err(|e| {
                CommError::Launch(format!(
                    "cannot create a directory under {}: {e}",
                    std::env::temp_dir().display()
                ))
            })
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    /// rank -> the rank it blames.
    fn read(&self) -> Vec<(usize, usize)> {
        let Ok(entries) = std::fs::read_dir(self.path()) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let e = e.ok()?;
                let rank = e
                    .file_name()
                    .to_str()?
                    .strip_prefix("rank-")?
                    .parse()
                    .ok()?;
                let blamed = std::fs::read_to_string(e.path())
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                Some((rank, blamed))
            })
            .collect()
    }
}

/// How long after the first failed exit the launcher collects others before naming the culprit.
const SETTLE: Duration = Duration::from_millis(250);

/// Signal number received by the launcher (0 = none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    SIGNAL.store(signal, Ordering::SeqCst);
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// "exit code 3" / "killed by signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
        _ => "unknown status".into(),
    }
}

struct Rank {
    rank: usize,
    pid: u32,
    status: Option<ExitStatus>,
    closed_at: ClosedAt,
}

impl Rank {
    /// When both output pipes had closed, if they have.
    fn pipes_closed(&self) -> Option<Instant> {
        let closed = self
            .closed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(closed[0]?.max(closed[1]?))
    }
}

impl Rank {
    /// Signals the rank's process group (the rank and anything it started).
    fn signal(&self, signal: i32) {
        let Ok(pid) = i32::try_from(self.pid) else {
            return;
        };
        // SAFETY: kill has no memory effects; the group id is the child's pid (set in pre_exec).
        unsafe { libc::kill(-pid, signal) };
    }
}

/// When each rank's stdout and stderr reached EOF: a rank's pipes close as it exits, before its
/// peers can notice and exit, so this orders failures better than reaping does.
type ClosedAt = Arc<Mutex<[Option<Instant>; 2]>>;

fn pump(
    rank: usize,
    source: impl Read + Send + 'static,
    to_stderr: bool,
    prefix: bool,
    closed_at: ClosedAt,
) -> Option<JoinHandle<()>> {
    let prefix = if prefix {
        format!("[rank {rank}] ")
    } else {
        String::new()
    };
    std::thread::Builder::new()
        .name(format!("launch-r{rank}"))
        .spawn(move || {
            pump_lines(&prefix, source, to_stderr);
            let mut closed = closed_at.lock().unwrap_or_else(PoisonError::into_inner);
            closed[usize::from(to_stderr)] = Some(Instant::now());
        })
        .ok()
}

fn pump_lines(prefix: &str, source: impl Read, to_stderr: bool) {
    let mut reader = BufReader::new(source);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                // A closed launcher stdout/stderr is not worth failing the job over.
                let _ = if to_stderr {
                    let mut out = std::io::stderr().lock();
                    out.write_all(prefix.as_bytes())
                        .and_then(|()| out.write_all(&line))
                } else {
                    let mut out = std::io::stdout().lock();
                    out.write_all(prefix.as_bytes())
                        .and_then(|()| out.write_all(&line))
                        .and_then(|()| out.flush())
                };
            }
        }
    }
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| {
            CommError::Launch(format!(
                "cannot find a free port for the rendezvous store: {e}"
            ))
        })
}

fn spawn_rank(args: &LaunchArgs, local_rank: usize, port: u16, blame: &BlameDir) -> Result<Child> {
    let rank = args.node_rank * args.nproc_per_node + local_rank;
    let world = args.nnodes * args.nproc_per_node;
    let launcher_pid = std::process::id() as libc::pid_t;
    let mut command = Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", local_rank.to_string())
        .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
        .env("GROUP_RANK", args.node_rank.to_string())
        .env("MASTER_ADDR", &args.master_addr)
        .env("MASTER_PORT", port.to_string())
        .env(BLAME_DIR_VAR, blame.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe functions
    // (setpgid, prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            // Own process group, so the launcher can stop the rank and its children together.
            libc::setpgid(0, 0);
            // Die with the launcher, even if it is SIGKILLed.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != launcher_pid {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    command.spawn().map_err(|e| {
        CommError::Launch(format!(
            "cannot start rank {rank} ({:?}): {e}",
            args.command[0]
        ))
    })
}

/// Ranks one launcher starts at most: a rank per GPU or per core; more are a mistake (each rank is a
/// process with its own threads and a copy of the model).
pub const NPROC_PER_NODE_MAX: usize = 256;
/// Nodes in a job at most.
pub const NNODES_MAX: usize = 4096;
/// Longest grace before SIGTERM (and again before SIGKILL), in seconds.
pub const GRACE_S_MAX: f64 = 3600.0;

/// Checks a rank count for `flag` (`--nproc-per-node`, `--nproc`): between 1 and [`NPROC_PER_NODE_MAX`].
pub fn check_nproc(flag: &str, n: usize) -> Result<()> {
    if (1..=NPROC_PER_NODE_MAX).contains(&n) {
        Ok(())
    } else {
        Err(CommError::Launch(format!(
            "{flag} {n} must lie between 1 and {NPROC_PER_NODE_MAX}"
        )))
    }
}

/// Runs the ranks to completion; the exit code is non-zero when any rank failed.
pub fn run(args: LaunchArgs) -> Result<ExitCode> {
    check_nproc("--nproc-per-node", args.nproc_per_node)?;
    if !(1..=NNODES_MAX).contains(&args.nnodes) {
        return Err(CommError::Launch(format!(
            "--nnodes {} must lie between 1 and {NNODES_MAX}",
            args.nnodes
        )));
    }
    if args.node_rank >= args.nnodes {
        return Err(CommError::Launch(format!(
            "--node-rank {} must be below --nnodes {}",
            args.node_rank, args.nnodes
        )));
    }
    if args.command.is_empty() {
        return Err(CommError::Launch("no command given after --".into()));
    }
    if !(args.grace_s.is_finite() && (0.0..=GRACE_S_MAX).contains(&args.grace_s)) {
        return Err(CommError::Launch(format!(
            "--grace-s {} must lie between 0 and {GRACE_S_MAX}",
            args.grace_s
        )));
    }
    let port = match args.master_port {
        Some(p) => p,
        None if args.nnodes == 1 => free_port()?,
        None => crate::env::DEFAULT_MASTER_PORT,
    };
    let grace = Duration::from_secs_f64(args.grace_s);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let blame = BlameDir::create()?;
    let mut ranks: Vec<Rank> = Vec::with_capacity(args.nproc_per_node);
    let mut pumps = Vec::new();
    // One waiter thread per rank reaps it and reports in exit order.
    let (exits_tx, exits) = mpsc::channel::<(usize, ExitStatus)>();
    for local in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local;
        let closed_at: ClosedAt = Arc::new(Mutex::new([None, None]));
        let spawned = spawn_rank(&args, local, port, &blame).and_then(|mut child| {
            if let Some(out) = child.stdout.take() {
                pumps.extend(pump(
                    rank,
                    out,
                    false,
                    !args.no_prefix,
                    Arc::clone(&closed_at),
                ));
            }
            if let Some(err) = child.stderr.take() {
                pumps.extend(pump(
                    rank,
                    err,
                    true,
                    !args.no_prefix,
                    Arc::clone(&closed_at),
                ));
            }
            let pid = child.id();
            let tx = exits_tx.clone();
            std::thread::Builder::new()
                .name(format!("launch-wait-r{rank}"))
                .spawn(move || {
                    let status = loop {
                        match child.wait() {
                            Ok(status) => break status,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            // Cannot happen for our own child; report it as a failure.
                            Err(_) => break ExitStatus::from_raw(1 << 8),
                        }
                    };
                    let _ = tx.send((rank, status));
                })
                .map(|_| Rank {
                    rank,
                    pid,
                    status: None,
                    closed_at,
                })
                .map_err(|e| CommError::Launch(format!("cannot start a waiter thread: {e}")))
        });
        match spawned {
            Ok(r) => ranks.push(r),
            Err(e) => {
                for r in &ranks {
                    r.signal(libc::SIGKILL);
                }
                drop(exits_tx);
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut reaped = 0;
                while reaped < ranks.len()
                    && exits
                        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                        .is_ok()
                {
                    reaped += 1;
                }
                return Err(e);
            }
        }
    }
    drop(exits_tx);
    let outcome = supervise(&mut ranks, &exits, grace, &blame);
    // Anything the ranks left in their process groups goes too.
    for r in &ranks {
        r.signal(libc::SIGKILL);
    }
    let pump_deadline = Instant::now() + Duration::from_secs(2);
    for p in pumps {
        while !p.is_finished() && Instant::now() < pump_deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if p.is_finished() {
            let _ = p.join();
        }
    }
    Ok(report(&ranks, outcome))
}

enum Outcome {
    AllSucceeded,
    RankFailed { rank: usize, status: ExitStatus },
    Signalled(i32),
}

/// Waits for the ranks to exit; after the first failure (or a signal to the launcher) gives the
/// others `grace` to exit, then SIGTERM, then SIGKILL.
fn supervise(
    ranks: &mut [Rank],
    exits: &mpsc::Receiver<(usize, ExitStatus)>,
    grace: Duration,
    blame: &BlameDir,
) -> Outcome {
    let mut outcome = Outcome::AllSucceeded;
    let mut stop_since: Option<Instant> = None;
    let mut terminated = false;
    loop {
        match exits.recv_timeout(Duration::from_millis(20)) {
            Ok((rank, status)) => {
                if let Some(r) = ranks.iter_mut().find(|r| r.rank == rank) {
                    r.status = Some(status);
                }
                if !status.success() && matches!(outcome, Outcome::AllSucceeded) {
                    outcome = first_failure(ranks, exits, blame);
                    stop_since = Some(Instant::now());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every waiter has reported.
            Err(mpsc::RecvTimeoutError::Disconnected) => return outcome,
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            return outcome;
        }
        let signal = SIGNAL.swap(0, Ordering::SeqCst);
        if signal != 0 {
            if matches!(outcome, Outcome::AllSucceeded) {
                outcome = Outcome::Signalled(signal);
            }
            for r in ranks.iter().filter(|r| r.status.is_none()) {
                r.signal(signal);
            }
            stop_since.get_or_insert_with(Instant::now);
            terminated = true;
        }
        if let Some(since) = stop_since {
            let waited = since.elapsed();
            if !terminated && waited >= grace {
                for r in ranks.iter().filter(|r| r.status.is_none()) {
                    r.signal(libc::SIGTERM);
                }
                terminated = true;
            } else if waited >= grace * 2 + Duration::from_millis(100) {
                for r in ranks.iter().filter(|r| r.status.is_none()) {
                    r.signal(libc::SIGKILL);
                }
            }
        }
    }
}

/// Called at the first failed exit: collects the exits of a short settling window, then names the
/// failed rank that the others blame (and that blames nobody itself); failing that, one killed by
/// a signal; failing that, the one whose output pipes closed first.
fn first_failure(
    ranks: &mut [Rank],
    exits: &mpsc::Receiver<(usize, ExitStatus)>,
    blame: &BlameDir,
) -> Outcome {
    let settle_until = Instant::now() + SETTLE;
    while let Ok((rank, status)) =
        exits.recv_timeout(settle_until.saturating_duration_since(Instant::now()))
    {
        if let Some(r) = ranks.iter_mut().find(|r| r.rank == rank) {
            r.status = Some(status);
        }
    }
    // Give the pump threads a moment to see EOF of the pipes of ranks that have exited.
    std::thread::sleep(Duration::from_millis(20));
    let blames = blame.read();
    let blamed_by = |rank: usize| blames.iter().filter(|(_, b)| *b == rank).count();
    let blames_someone = |rank: usize| blames.iter().any(|(r, _)| *r == rank);
    let failed = ranks
        .iter()
        .filter_map(|r| Some((r, r.status.filter(|s| !s.success())?)));
    let culprit = failed.min_by_key(|(r, status)| {
        (
            blames_someone(r.rank),
            std::cmp::Reverse(blamed_by(r.rank)),
            status.signal().is_none(),
            r.pipes_closed().is_none(),
            r.pipes_closed(),
            r.rank,
        )
    });
    match culprit {
        Some((r, status)) => Outcome::RankFailed {
            rank: r.rank,
            status,
        },
        None => Outcome::AllSucceeded,
    }
}

fn report(ranks: &[Rank], outcome: Outcome) -> ExitCode {
    let others = |skip: Option<usize>| {
        ranks
            .iter()
            .filter(|r| Some(r.rank) != skip)
            .map(|r| {
                format!(
                    "rank {}: {}",
                    r.rank,
                    r.status
                        .map(describe)
                        .unwrap_or_else(|| "still running".into())
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match outcome {
        Outcome::AllSucceeded => ExitCode::SUCCESS,
        Outcome::RankFailed { rank, status } => {
            eprintln!(
                "strata launch: rank {rank} failed ({}); stopped the other ranks [{}]",
                describe(status),
                others(Some(rank))
            );
            let code = status
                .code()
                .or(status.signal().map(|s| 128 + s))
                .unwrap_or(1);
            ExitCode::from(u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1))
        }
        Outcome::Signalled(signal) => {
            eprintln!(
                "strata launch: received {}; stopped all ranks [{}]",
                signal_name(signal),
                others(None)
            );
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
        }
    }
}

#[cfg(test)]
mod bounds_tests {
    use super::*;

    fn args(nproc_per_node: usize, nnodes: usize, grace_s: f64) -> LaunchArgs {
        LaunchArgs {
            nproc_per_node,
            nnodes,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            grace_s,
            no_prefix: false,
            command: vec!["true".into()],
        }
    }

    fn err(a: LaunchArgs) -> String {
        run(a).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn counts_and_grace_are_bounded_before_anything_starts() {
        assert_eq!(
            err(args(0, 1, 1.0)),
            "launch: --nproc-per-node 0 must lie between 1 and 256"
        );
        assert!(err(args(100_000, 1, 1.0)).contains("--nproc-per-node 100000"));
        assert!(err(args(1, 0, 1.0)).contains("--nnodes 0 must lie between 1 and 4096"));
        assert!(err(args(1, 1, 1e30)).contains("--grace-s"));
        assert!(check_nproc("--nproc", 256).is_ok());
    }
}
