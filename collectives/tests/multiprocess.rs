//! Real processes over real shared memory and sockets: closed-form results for world sizes 1-4,
//! dead ranks named within the timeout, clear rendezvous errors, nothing left behind.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn check_world(backend: &str, n: usize, shm_slot_bytes: &str) {
    let tag = unique_tag();
    let args = [
        "--backend",
        backend,
        "--timeout-s",
        "20",
        "--shm-slot-bytes",
        shm_slot_bytes,
        "check",
    ];
    let (out, _) = run_bounded(launch_check(n, &args, &tag), Duration::from_secs(60));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{backend} n={n} failed:\n{stdout}\n{stderr}"
    );
    for r in 0..n {
        assert!(
            stdout.contains(&format!("[rank {r}] rank {r}: ok")),
            "{backend} n={n}: rank {r} missing:\n{stdout}"
        );
    }
    assert_no_leftovers(&tag);
}

// A small shm slot makes every size above 8 KiB take the chunked path.
#[test]
fn shm_matches_closed_forms_for_world_sizes_1_to_4() {
    for n in 1..=4 {
        check_world("shm", n, "8192");
    }
}

/// The default 4 MiB slots: the check's back-to-back 4 MiB all_reduces take the pipelined
/// 256 KiB steps over several slots, as training-sized buffers do.
#[test]
fn shm_with_default_slots_matches_closed_forms() {
    for n in [2, 3] {
        check_world("shm", n, "4194304");
    }
}

#[test]
fn tcp_matches_closed_forms_for_world_sizes_1_to_4() {
    for n in 1..=4 {
        check_world("tcp", n, "8192");
    }
}

/// The victim dies before collective 3; every survivor's error names it, within the timeout;
/// the launcher exits non-zero naming it; no process remains.
fn dead_rank_is_named(backend: &str, n: usize, victim: usize, how: &str) {
    let tag = unique_tag();
    let timeout_s = 8;
    let args = [
        "--backend",
        backend,
        "--timeout-s",
        &timeout_s.to_string(),
        "die",
        "--victim",
        &victim.to_string(),
        "--how",
        how,
    ];
    let (out, elapsed) = run_bounded(launch_check(n, &args, &tag), Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "launcher succeeded:\n{stderr}");
    assert!(
        stderr.contains(&format!("strata launch: rank {victim} failed")),
        "{stderr}"
    );
    let expected_status = if how == "kill" {
        "killed by signal 9 (SIGKILL)"
    } else {
        "exit code 7"
    };
    assert!(stderr.contains(expected_status), "{stderr}");
    for r in (0..n).filter(|&r| r != victim) {
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&format!("[rank {r}] rank {r}: error:")));
        let Some(line) = line else {
            panic!("rank {r} printed no error:\n{stderr}")
        };
        assert!(
            line.contains(&format!("rank {victim} is gone")),
            "rank {r} does not name rank {victim}: {line}"
        );
    }
    assert!(elapsed < Duration::from_secs(timeout_s), "took {elapsed:?}");
    assert_no_leftovers(&tag);
}

#[test]
fn shm_rank_that_exits_is_named() {
    dead_rank_is_named("shm", 3, 1, "exit");
}

#[test]
fn shm_rank_that_is_killed_is_named() {
    dead_rank_is_named("shm", 4, 2, "kill");
}

#[test]
fn shm_rank0_that_is_killed_is_named() {
    dead_rank_is_named("shm", 2, 0, "kill");
}

#[test]
fn tcp_rank_that_exits_is_named() {
    dead_rank_is_named("tcp", 3, 1, "exit");
}

#[test]
fn tcp_rank_that_is_killed_is_named() {
    dead_rank_is_named("tcp", 4, 2, "kill");
}

#[test]
fn tcp_rank0_that_is_killed_is_named() {
    dead_rank_is_named("tcp", 3, 0, "kill");
}

/// A rank that stops participating: the others time out within dist.timeout naming it, the
/// launcher then stops it.
fn hung_rank_is_named(backend: &str) {
    let tag = unique_tag();
    let args = [
        "--backend",
        backend,
        "--timeout-s",
        "1.5",
        "die",
        "--victim",
        "1",
        "--how",
        "hang",
    ];
    let (out, elapsed) = run_bounded(
        launch_check_with_grace(2, &args, &tag, 0.5),
        Duration::from_secs(60),
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("[rank 0] rank 0: error:"))
        .unwrap_or_default();
    assert!(
        line.contains("timed out after 1.5s waiting for rank 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("strata launch: rank 0 failed (exit code 3)"),
        "{stderr}"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert_no_leftovers(&tag);
}

#[test]
fn shm_hung_rank_times_out_naming_it() {
    hung_rank_is_named("shm");
}

#[test]
fn tcp_hung_rank_times_out_naming_it() {
    hung_rank_is_named("tcp");
}

/// A SIGSTOPped rank 0 (all its threads stop, the store with them; its sockets stay open) is not dead:
/// rank 1 must report a timeout waiting for it, not that it is gone.
#[test]
fn tcp_stopped_rank0_is_reported_as_not_answering_not_gone() {
    let tag = unique_tag();
    let args = [
        "--backend",
        "tcp",
        "--timeout-s",
        "1.5",
        "die",
        "--victim",
        "0",
        "--how",
        "stop",
    ];
    let (out, elapsed) = run_bounded(
        launch_check_with_grace(2, &args, &tag, 0.5),
        Duration::from_secs(60),
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("[rank 1] rank 1: error:"))
        .unwrap_or_default();
    assert!(
        line.contains("timed out after 1.5s waiting for rank 0")
            && line.contains("did not answer within dist.timeout_s"),
        "{stderr}"
    );
    assert!(!line.contains("rank 0 is gone"), "{line}");
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");
    assert_no_leftovers(&tag);
}

fn rank_command(rank: usize, world: usize, port: u16, tag: &str) -> Command {
    let mut c = Command::new(CHECK);
    c.env(TAG_VAR, tag)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .args(["--backend", "tcp", "--timeout-s", "2", "check"]);
    c
}

#[test]
fn wrong_master_port_is_a_clear_error() {
    let tag = unique_tag();
    let (good, wrong) = (free_port(), free_port());
    let rank0 = std::thread::spawn({
        let tag = tag.clone();
        move || run_bounded(rank_command(0, 2, good, &tag), Duration::from_secs(30))
    });
    let (out1, elapsed) = run_bounded(rank_command(1, 2, wrong, &tag), Duration::from_secs(30));
    let err1 = text(&out1.stderr);
    assert_eq!(out1.status.code(), Some(2), "{err1}");
    assert!(
        err1.contains(&format!("127.0.0.1:{wrong}")) && err1.contains("MASTER_PORT"),
        "{err1}"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    let (out0, _) = match rank0.join() {
        Ok(r) => r,
        Err(_) => panic!("rank 0 thread panicked"),
    };
    let err0 = text(&out0.stderr);
    assert!(!out0.status.success());
    assert!(err0.contains("waiting for rank(s) [1]"), "{err0}");
    assert_no_leftovers(&tag);
}

#[test]
fn missing_variables_are_clear_errors() {
    let run = |vars: &[(&str, &str)]| {
        let mut c = Command::new(CHECK);
        for var in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "SLURM_PROCID",
            "OMPI_COMM_WORLD_RANK",
        ] {
            c.env_remove(var);
        }
        c.envs(vars.iter().copied())
            .args(["--timeout-s", "2", "check"]);
        let (out, _) = run_bounded(c, Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(2));
        text(&out.stderr)
    };
    assert!(run(&[]).contains("no launcher variables found"));
    assert!(run(&[("RANK", "0"), ("WORLD_SIZE", "2")]).contains("MASTER_ADDR is not set"));
    assert!(run(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "x"),
        ("MASTER_PORT", "1")
    ])
    .contains("RANK=3 is not below WORLD_SIZE=2"));
}

#[test]
fn launcher_reports_a_command_that_cannot_start() {
    let mut c = Command::new(LAUNCH);
    c.args([
        "--nproc-per-node",
        "2",
        "--",
        "/nonexistent/strata-no-such-binary",
    ]);
    let (out, _) = run_bounded(c, Duration::from_secs(20));
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot start rank 0"), "{stderr}");
}

#[test]
fn launcher_passes_the_rendezvous_variables() {
    let mut c = Command::new(LAUNCH);
    c.args([
        "--nproc-per-node",
        "2",
        "--master-port",
        "29999",
        "--",
        "sh",
        "-c",
        "echo $RANK/$WORLD_SIZE/$LOCAL_RANK/$LOCAL_WORLD_SIZE/$MASTER_ADDR:$MASTER_PORT",
    ]);
    let (out, _) = run_bounded(c, Duration::from_secs(20));
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("[rank 0] 0/2/0/2/127.0.0.1:29999"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[rank 1] 1/2/1/2/127.0.0.1:29999"),
        "{stdout}"
    );
}
