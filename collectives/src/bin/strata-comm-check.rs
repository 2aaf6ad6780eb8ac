//! `strata-comm-check`: a rank program for the multi-process tests and quick benchmarks. Run it
//! under `strata-launch` (or with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set).
//!
//! - `check`: every collective, f32 and bf16, sync and async, against closed forms; exit 1 on a mismatch.
//! - `die`: collectives in a loop; the victim rank exits, SIGKILLs or SIGSTOPs itself before op N; the
//!   others print the error they get (`rank R: error: ...`) and exit 3.
//! - `bench`: the `strata-bench comm` sweep, printed by rank 0.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use strata_collectives::bench::{self, Collective, Row, SweepOptions};
use strata_collectives::{bf16, init_from_env, Backend, Communicator, DType, DistConfig, Element};

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value = "auto")]
    backend: Backend,
    #[arg(long, default_value_t = 10.0)]
    timeout_s: f64,
    #[arg(long, default_value_t = 4 << 20)]
    shm_slot_bytes: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Check,
    Die {
        #[arg(long)]
        victim: usize,
        /// `exit` (code 7), `kill` (SIGKILL itself), `hang` (sleep 60 s, then exit) or `stop`
        /// (SIGSTOP itself: every thread stops, sockets stay open).
        #[arg(long, default_value = "exit")]
        how: String,
        /// Collectives completed before the victim dies.
        #[arg(long, default_value_t = 3)]
        after: usize,
    },
    Bench {
        #[arg(long, default_value_t = 1 << 10)]
        min_bytes: usize,
        #[arg(long, default_value_t = 64 << 20)]
        max_bytes: usize,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value = "all_reduce")]
        collective: Collective,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = DistConfig {
        backend: cli.backend,
        timeout: Duration::from_secs_f64(cli.timeout_s),
        gpu: false,
        shm_slot_bytes: cli.shm_slot_bytes,
    };
    let comm = match init_from_env(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("init error: {e}");
            return ExitCode::from(2);
        }
    };
    let rank = comm.rank();
    let result = match cli.mode {
        Mode::Check => check(&*comm),
        Mode::Die { victim, how, after } => die(&*comm, victim, &how, after),
        Mode::Bench {
            min_bytes,
            max_bytes,
            iters,
            collective,
        } => {
            let options = SweepOptions {
                collectives: vec![collective],
                min_bytes,
                max_bytes,
                iters,
                ..SweepOptions::default()
            };
            if rank == 0 {
                println!("{}", Row::table_header());
            }
            bench::sweep(&*comm, &options, |row| {
                if rank == 0 {
                    println!("{}   {}", row.table_line(), row.json());
                }
            })
            .map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => {
            println!("rank {rank}: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rank {rank}: error: {e}");
            ExitCode::from(3)
        }
    }
}

fn value(rank: usize, i: usize) -> f32 {
    ((rank * 7 + i % 11) % 64) as f32
}

fn cast<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|x| from_f32::<T>(*x)).collect()
}

fn from_f32<T: Element>(x: f32) -> T {
    match T::DTYPE {
        DType::F32 => bytemuck::cast(x),
        DType::Bf16 => bytemuck::cast(bf16::from_f32(x)),
    }
}

fn to_f32<T: Element>(x: T) -> f32 {
    match T::DTYPE {
        DType::F32 => bytemuck::cast(x),
        DType::Bf16 => bytemuck::cast::<T, bf16>(x).to_f32(),
    }
}

fn compare<T: Element>(what: &str, got: &[T], expected: &[f32]) -> Result<(), String> {
    if got.len() != expected.len() {
        return Err(format!(
            "{what}: length {} != {}",
            got.len(),
            expected.len()
        ));
    }
    match got.iter().zip(expected).position(|(g, e)| to_f32(*g) != *e) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: element {i} is {} but should be {}",
            to_f32(got[i]),
            expected[i]
        )),
    }
}

/// Runs every collective at `len`-ish sizes for element type T and checks closed forms.
fn check_type<T: Element>(comm: &dyn Communicator, len: usize) -> Result<(), String> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let name = T::DTYPE.name();
    let tri = (n * (n + 1) / 2) as f32;
    // all_gather: m per rank (need not divide anything).
    let m = len;
    let send: Vec<T> = cast(&(0..m).map(|i| value(rank, i)).collect::<Vec<_>>());
    let mut recv = vec![from_f32::<T>(-1.0); n * m];
    comm.all_gather(&send, &mut recv)
        .map_err(|e| e.to_string())?;
    let expected: Vec<f32> = (0..n * m)
        .map(|k| value(k / m.max(1), k % m.max(1)))
        .collect();
    compare(&format!("all_gather {name} m={m}"), &recv, &expected)?;
    // reduce_scatter: rank j contributes (j+1) * pattern.
    let pattern = |k: usize| (k % 5 + 1) as f32;
    let send: Vec<T> = cast(
        &(0..n * m)
            .map(|k| (rank + 1) as f32 * pattern(k))
            .collect::<Vec<_>>(),
    );
    let mut recv = vec![from_f32::<T>(-1.0); m];
    comm.reduce_scatter(&send, &mut recv)
        .map_err(|e| e.to_string())?;
    let expected: Vec<f32> = (0..m).map(|i| tri * pattern(rank * m + i)).collect();
    compare(&format!("reduce_scatter {name} m={m}"), &recv, &expected)?;
    // all_reduce on a length that does not divide by the world size.
    let l = len * n + 1;
    let mut buf: Vec<T> = cast(
        &(0..l)
            .map(|k| (rank + 1) as f32 * pattern(k))
            .collect::<Vec<_>>(),
    );
    comm.all_reduce(&mut buf).map_err(|e| e.to_string())?;
    let expected: Vec<f32> = (0..l).map(|k| tri * pattern(k)).collect();
    compare(&format!("all_reduce {name} len={l}"), &buf, &expected)?;
    // broadcast from the last rank.
    let root = n - 1;
    let mut buf: Vec<T> = cast(
        &(0..l)
            .map(|k| if rank == root { value(root, k) } else { -1.0 })
            .collect::<Vec<_>>(),
    );
    comm.broadcast(&mut buf, root).map_err(|e| e.to_string())?;
    let expected: Vec<f32> = (0..l).map(|k| value(root, k)).collect();
    compare(&format!("broadcast {name} len={l}"), &buf, &expected)?;
    // async: all_reduce and all_gather in flight together, then wait.
    let ar: Vec<T> = cast(
        &(0..l)
            .map(|k| (rank + 1) as f32 * pattern(k))
            .collect::<Vec<_>>(),
    );
    let ag_send: Vec<T> = cast(&(0..m).map(|i| value(rank, i)).collect::<Vec<_>>());
    let ar_work = comm.all_reduce_async::<T, _>(ar);
    let ag_work = comm.all_gather_async::<T, _, _>(ag_send, vec![from_f32::<T>(-1.0); n * m]);
    let ar = ar_work.wait().map_err(|e| e.to_string())?;
    let (_, ag) = ag_work.wait().map_err(|e| e.to_string())?;
    compare(
        &format!("all_reduce_async {name}"),
        &ar,
        &(0..l).map(|k| tri * pattern(k)).collect::<Vec<_>>(),
    )?;
    compare(
        &format!("all_gather_async {name}"),
        &ag,
        &(0..n * m)
            .map(|k| value(k / m.max(1), k % m.max(1)))
            .collect::<Vec<_>>(),
    )?;
    Ok(())
}

fn check(comm: &dyn Communicator) -> Result<(), String> {
    let (rank, n) = (comm.rank(), comm.world_size());
    for len in [0usize, 1, 5, 1027, 6000] {
        check_type::<f32>(comm, len)?;
        check_type::<bf16>(comm, len)?;
    }
    // Large all_reduces one after another (4 MiB + 28 bytes, values shifted per call): with the
    // default slots these span several slots and pipeline steps, and reuse the slot sets; on shm
    // the second call publishes with the other kind of stores (see the backend's `publish`).
    let tri = (n * (n + 1) / 2) as f32;
    let l = (1 << 20) + 7;
    for call in 0..4 {
        let value = |k: usize| ((k + call) % 7 + 1) as f32;
        let mut buf: Vec<f32> = (0..l).map(|k| (rank + 1) as f32 * value(k)).collect();
        comm.all_reduce(&mut buf).map_err(|e| e.to_string())?;
        let expected: Vec<f32> = (0..l).map(|k| tri * value(k)).collect();
        compare(&format!("large all_reduce call {call}"), &buf, &expected)?;
    }
    // Large reduce_scatters likewise (the second call uses the other kind of stores, see the
    // shm backend's `publish`).
    let m = (1 << 20) / n + 3;
    for call in 0..3 {
        let value = |k: usize| ((k * 3 + call) % 11 + 1) as f32;
        let send: Vec<f32> = (0..n * m).map(|k| (rank + 1) as f32 * value(k)).collect();
        let mut recv = vec![0f32; m];
        comm.reduce_scatter(&send, &mut recv)
            .map_err(|e| e.to_string())?;
        let expected: Vec<f32> = (0..m).map(|i| tri * value(rank * m + i)).collect();
        compare(
            &format!("large reduce_scatter call {call}"),
            &recv,
            &expected,
        )?;
    }
    // bf16 sums accumulate in f32: 256 + 1 + ... stays 256 in bf16 arithmetic.
    let mut buf = vec![bf16::from_f32(if rank == 0 { 256.0 } else { 1.0 }); 3001];
    comm.all_reduce(&mut buf).map_err(|e| e.to_string())?;
    let expected = bf16::from_f32(256.0 + (n - 1) as f32).to_f32();
    compare(
        "all_reduce bf16 f32-accumulation",
        &buf,
        &vec![expected; 3001],
    )?;
    let send = vec![bf16::from_f32(if rank == 0 { 256.0 } else { 1.0 }); 3 * n];
    let mut recv = vec![bf16::ZERO; 3];
    comm.reduce_scatter(&send, &mut recv)
        .map_err(|e| e.to_string())?;
    compare(
        "reduce_scatter bf16 f32-accumulation",
        &recv,
        &[expected; 3],
    )?;
    comm.barrier().map_err(|e| e.to_string())?;
    comm.barrier_async().wait().map_err(|e| e.to_string())?;
    Ok(())
}

fn die(comm: &dyn Communicator, victim: usize, how: &str, after: usize) -> Result<(), String> {
    let mut buf = vec![1.0f32; 100_000];
    for op in 0.. {
        if op == after && comm.rank() == victim {
            eprintln!("rank {victim}: dying ({how}) before collective {op}");
            if how == "hang" {
                std::thread::sleep(Duration::from_secs(60));
            }
            if how == "kill" {
                // SAFETY: raising a signal on ourselves has no memory effects.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
            if how == "stop" {
                // SAFETY: as above; the process continues here after a SIGCONT.
                unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) };
            }
            std::process::exit(7);
        }
        buf.fill(1.0);
        comm.all_reduce(&mut buf).map_err(|e| e.to_string())?;
        if op > after + 1000 {
            return Err("the victim never died".into());
        }
    }
    Ok(())
}
