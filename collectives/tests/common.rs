//! Helpers for the multi-process tests: run real processes, never leave any behind.

#![allow(dead_code)]

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const LAUNCH: &str = env!("CARGO_BIN_EXE_strata-launch");
pub const CHECK: &str = env!("CARGO_BIN_EXE_strata-comm-check");

/// Env var that marks every process a test starts, so leftovers can be found.
pub const TAG_VAR: &str = "STRATA_COLLECTIVES_TEST_TAG";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn unique_tag() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Runs `command` to completion within `limit`, killing it (and, through PDEATHSIG, its ranks) if
/// it runs over. Returns the output and the elapsed time.
pub fn run_bounded(mut command: Command, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!("cannot start {command:?}: {e}"),
    };
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let out = child.wait_with_output();
                panic!("{command:?} ran over {limit:?}; output so far: {out:?}");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for {command:?}: {e}"),
        }
    }
    let elapsed = start.elapsed();
    match child.wait_with_output() {
        Ok(out) => (out, elapsed),
        Err(e) => panic!("collecting output of {command:?}: {e}"),
    }
}

/// `strata-launch --nproc-per-node n -- strata-comm-check <args>` with a fresh tag.
pub fn launch_check(n: usize, args: &[&str], tag: &str) -> Command {
    launch_check_with_grace(n, args, tag, 5.0)
}

/// As `launch_check`, with the launcher's `--grace-s`.
pub fn launch_check_with_grace(n: usize, args: &[&str], tag: &str, grace_s: f64) -> Command {
    let mut c = Command::new(LAUNCH);
    c.env(TAG_VAR, tag)
        .args([
            "--nproc-per-node",
            &n.to_string(),
            "--grace-s",
            &grace_s.to_string(),
            "--",
            CHECK,
        ])
        .args(args);
    for var in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        c.env_remove(var);
    }
    c
}

/// Pids of live processes carrying `tag` in their environment.
pub fn leftovers(tag: &str) -> Vec<u32> {
    let needle = format!("{TAG_VAR}={tag}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'));
            !zombie && environ.split(|b| *b == 0).any(|kv| kv == needle.as_bytes())
        })
        .collect()
}

/// Asserts no process with `tag` is alive, allowing a moment for exits in flight.
pub fn assert_no_leftovers(tag: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = leftovers(tag);
        if pids.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for pid in &pids {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            panic!("processes left behind: {pids:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A port nothing listens on (bound and released).
pub fn free_port() -> u16 {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("no free port: {e}"),
    }
}
