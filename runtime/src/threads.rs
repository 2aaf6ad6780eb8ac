//! How many compute threads a rank runs: `train.threads`, or with `train.threads = 0` this host's share.
//!
//! Ranks started together on one host (`strata train --nproc N`, `strata launch`, torchrun, srun, mpirun)
//! each build their own thread pool; with every core per rank, N ranks on C cores would run N·C threads that
//! fight over the cores. So `0` divides the cores this process may use among the host's local ranks, as the
//! launcher reports them (`LOCAL_WORLD_SIZE`, `SLURM_TASKS_PER_NODE`, `OMPI_COMM_WORLD_LOCAL_SIZE`); the
//! first `C mod N` local ranks take one core more, and every rank gets at least one thread.

use strata_collectives::RankInfo;

/// Compute threads for `train.threads = configured`: `configured` when it is not 0, otherwise this process's
/// share of the host's cores (see the module comment). Reads the launcher's variables and the cores this
/// process may run on (its CPU affinity and cgroup quota).
pub fn compute_threads(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Malformed launcher variables are reported when the communicator is built; here they count as one rank.
    let (local_ranks, local_rank) = RankInfo::from_env()
        .ok()
        .and_then(|info| Some((info.local_world_size?, info.local_rank)))
        .unwrap_or((1, 0));
    share_of_cores(cores, local_ranks, local_rank)
}

/// Local rank `local_rank`'s share of `cores` among `local_ranks` ranks: `cores / local_ranks`, one more for the
/// first `cores % local_ranks` ranks, at least 1.
pub fn share_of_cores(cores: usize, local_ranks: usize, local_rank: usize) -> usize {
    let local_ranks = local_ranks.max(1);
    let extra = usize::from(local_rank % local_ranks < cores % local_ranks);
    (cores / local_ranks + extra).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_shared_among_local_ranks() {
        assert_eq!(share_of_cores(16, 1, 0), 16);
        assert_eq!(share_of_cores(16, 4, 3), 4);
        // 2 cores, 4 ranks: one thread each, not 2 (8 threads on 2 cores before).
        assert_eq!(
            (0..4).map(|r| share_of_cores(2, 4, r)).collect::<Vec<_>>(),
            [1, 1, 1, 1]
        );
        // 10 cores, 4 ranks: 3 + 3 + 2 + 2 uses every core once.
        let shares: Vec<usize> = (0..4).map(|r| share_of_cores(10, 4, r)).collect();
        assert_eq!(shares, [3, 3, 2, 2]);
        assert_eq!(shares.iter().sum::<usize>(), 10);
    }

    #[test]
    fn a_configured_count_is_taken_as_is() {
        assert_eq!(compute_threads(3), 3);
        assert!(compute_threads(0) >= 1);
    }
}
