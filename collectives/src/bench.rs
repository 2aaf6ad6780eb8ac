//! The collective bandwidth sweep behind `strata-bench comm` (nccl-tests style).
//!
//! Sizes are nccl-tests' "size": the buffer for all_reduce and broadcast, the gathered (recv)
//! buffer for all_gather, the scattered (send) buffer for reduce_scatter. Bus bandwidth:
//! all_reduce algbw * 2(n-1)/n; all_gather and reduce_scatter algbw * (n-1)/n; broadcast algbw.

use std::time::Instant;

use crate::comm::Communicator;
use crate::elem::DType;
use crate::error::{CommError, Result};
use crate::Backend;

/// A collective the sweep measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    AllReduce,
    AllGather,
    ReduceScatter,
    Broadcast,
}

impl Collective {
    pub const ALL: [Collective; 4] = [
        Collective::AllReduce,
        Collective::AllGather,
        Collective::ReduceScatter,
        Collective::Broadcast,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::Broadcast => "broadcast",
        }
    }

    /// nccl-tests' bus-bandwidth factor.
    pub fn bus_factor(self, world: usize) -> f64 {
        let n = world as f64;
        match self {
            Collective::AllReduce => 2.0 * (n - 1.0) / n,
            Collective::AllGather | Collective::ReduceScatter => (n - 1.0) / n,
            Collective::Broadcast => 1.0,
        }
    }
}

impl std::str::FromStr for Collective {
    type Err = CommError;
    fn from_str(s: &str) -> Result<Self> {
        Collective::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| CommError::InvalidArgument {
                op: "bench",
                detail: format!("unknown collective {s:?}"),
            })
    }
}

/// What to sweep.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub collectives: Vec<Collective>,
    pub dtype: DType,
    pub min_bytes: usize,
    pub max_bytes: usize,
    /// Each size is the previous times this (>= 2).
    pub step_factor: usize,
    pub warmup_iters: usize,
    pub iters: usize,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            collectives: Collective::ALL.to_vec(),
            dtype: DType::F32,
            min_bytes: 1 << 10,
            max_bytes: 64 << 20,
            step_factor: 4,
            warmup_iters: 3,
            iters: 10,
        }
    }
}

/// One measured size.
#[derive(Debug, Clone)]
pub struct Row {
    pub collective: Collective,
    pub backend: Backend,
    pub world_size: usize,
    pub dtype: DType,
    pub bytes: usize,
    pub elements: usize,
    pub time_us: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
    pub wrong: usize,
}

impl Row {
    /// The table header matching `table_line`.
    pub fn table_header() -> String {
        format!(
            "{:>14} {:>12} {:>11} {:>11} {:>9} {:>9} {:>7}",
            "collective", "bytes", "elements", "time_us", "algbw", "busbw", "#wrong"
        )
    }

    /// One table line (bandwidths in GB/s).
    pub fn table_line(&self) -> String {
        format!(
            "{:>14} {:>12} {:>11} {:>11.1} {:>9.2} {:>9.2} {:>7}",
            self.collective.name(),
            self.bytes,
            self.elements,
            self.time_us,
            self.algbw_gbps,
            self.busbw_gbps,
            self.wrong
        )
    }

    /// One JSON object (no trailing newline).
    pub fn json(&self) -> String {
        format!(
            "{{\"collective\":\"{}\",\"backend\":\"{}\",\"world_size\":{},\"dtype\":\"{}\",\"bytes\":{},\"elements\":{},\"time_us\":{:.3},\"algbw_gbps\":{:.4},\"busbw_gbps\":{:.4},\"wrong\":{}}}",
            self.collective.name(),
            self.backend.name(),
            self.world_size,
            self.dtype.name(),
            self.bytes,
            self.elements,
            self.time_us,
            self.algbw_gbps,
            self.busbw_gbps,
            self.wrong
        )
    }
}

/// Input value of element i on a rank: small integers, exact in bf16 and in any summation order.
fn input(rank: usize, i: usize) -> f32 {
    ((rank + 1) * (i % 7 + 1)) as f32
}

fn to_bytes(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::Bf16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_ne_bytes())
            .collect(),
    }
}

fn from_bytes(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// Buffers and expected output of one collective at one size (`elements` as in `Row`).
struct Case {
    send: Vec<u8>,
    recv: Vec<u8>,
    expected: Vec<f32>,
}

fn case(c: Collective, dtype: DType, rank: usize, world: usize, elements: usize) -> Case {
    let sum_ranks = (world * (world + 1) / 2) as f32;
    match c {
        Collective::AllReduce => {
            let send: Vec<f32> = (0..elements).map(|i| input(rank, i)).collect();
            let expected = (0..elements)
                .map(|i| sum_ranks * (i % 7 + 1) as f32)
                .collect();
            Case {
                send: Vec::new(),
                recv: to_bytes(dtype, &send),
                expected,
            }
        }
        Collective::AllGather => {
            let m = elements / world;
            let send: Vec<f32> = (0..m).map(|i| input(rank, i)).collect();
            let expected = (0..elements)
                .map(|k| input(k / m.max(1), k % m.max(1)))
                .collect();
            Case {
                send: to_bytes(dtype, &send),
                recv: vec![0; elements * dtype.size_bytes()],
                expected,
            }
        }
        Collective::ReduceScatter => {
            let m = elements / world;
            let send: Vec<f32> = (0..elements).map(|i| input(rank, i)).collect();
            let expected = (0..m)
                .map(|i| sum_ranks * ((rank * m + i) % 7 + 1) as f32)
                .collect();
            Case {
                send: to_bytes(dtype, &send),
                recv: vec![0; m * dtype.size_bytes()],
                expected,
            }
        }
        Collective::Broadcast => {
            let root_values: Vec<f32> = (0..elements).map(|i| input(0, i)).collect();
            let mine = if rank == 0 {
                root_values.clone()
            } else {
                vec![-1.0; elements]
            };
            Case {
                send: Vec::new(),
                recv: to_bytes(dtype, &mine),
                expected: root_values,
            }
        }
    }
}

fn run_once(
    comm: &dyn Communicator,
    c: Collective,
    dtype: DType,
    send: &[u8],
    recv: &mut [u8],
) -> Result<()> {
    match c {
        Collective::AllReduce => comm.all_reduce_bytes(dtype, recv),
        Collective::AllGather => comm.all_gather_bytes(dtype, send, recv),
        Collective::ReduceScatter => comm.reduce_scatter_bytes(dtype, send, recv),
        Collective::Broadcast => comm.broadcast_bytes(recv, 0),
    }
}

/// Runs the sweep; every rank must call it with the same options. `on_row` sees each row on every
/// rank (time is this rank's; #wrong is summed over ranks).
pub fn sweep(
    comm: &dyn Communicator,
    options: &SweepOptions,
    mut on_row: impl FnMut(&Row),
) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let elem = options.dtype.size_bytes();
    let granule = world * elem;
    for &c in &options.collectives {
        let mut bytes = options.min_bytes.max(granule);
        while bytes <= options.max_bytes.max(granule) {
            let elements = bytes / granule * world;
            let mut case = case(c, options.dtype, rank, world, elements);
            // Correctness first, on a fresh input.
            run_once(comm, c, options.dtype, &case.send, &mut case.recv)?;
            let got = from_bytes(options.dtype, &case.recv);
            let mut wrong = [got
                .iter()
                .zip(&case.expected)
                .filter(|(g, e)| g != e)
                .count() as f32];
            for _ in 0..options.warmup_iters {
                run_once(comm, c, options.dtype, &case.send, &mut case.recv)?;
            }
            comm.barrier()?;
            let start = Instant::now();
            for _ in 0..options.iters.max(1) {
                run_once(comm, c, options.dtype, &case.send, &mut case.recv)?;
            }
            let seconds = start.elapsed().as_secs_f64() / options.iters.max(1) as f64;
            comm.all_reduce(&mut wrong)?;
            let total = elements * elem;
            let algbw_gbps = total as f64 / seconds / 1e9;
            on_row(&Row {
                collective: c,
                backend: comm.backend(),
                world_size: world,
                dtype: options.dtype,
                bytes: total,
                elements,
                time_us: seconds * 1e6,
                algbw_gbps,
                busbw_gbps: algbw_gbps * c.bus_factor(world),
                wrong: wrong[0] as usize,
            });
            bytes = bytes.saturating_mul(options.step_factor.max(2));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_factors() {
        assert_eq!(Collective::AllReduce.bus_factor(4), 1.5);
        assert_eq!(Collective::AllGather.bus_factor(4), 0.75);
        assert_eq!(Collective::ReduceScatter.bus_factor(2), 0.5);
    }
}
