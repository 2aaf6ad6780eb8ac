//! strata-collectives: the `Communicator` trait, its shm/tcp/nccl backends, rendezvous and the launcher.
//!
//! ```no_run
//! use strata_collectives::{init_from_env, DistConfig};
//! # fn main() -> strata_collectives::Result<()> {
//! let comm = init_from_env(&DistConfig::default())?; // under `strata launch`, torchrun, srun or mpirun
//! let mut grads = vec![1.0f32; 1024];
//! comm.all_reduce(&mut grads)?; // sum over ranks
//! # Ok(()) }
//! ```

pub mod bench;
mod choose;
mod comm;
mod elem;
pub mod env;
mod error;
pub mod launch;
pub mod nccl;
pub mod scratch;
mod shm;
mod single;
pub mod store;
mod stream;
mod tcp;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use comm::{Communicator, Job, Work};
pub use elem::{DType, Element};
pub use env::{EnvSource, RankInfo};
pub use error::{CommError, Result};
pub use half::bf16;
pub use nccl::NcclCommunicator;

use comm::Queued;
use store::{StoreClient, StoreServer};

/// Which transport carries the collectives (`dist.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// nccl when every rank has a usable GPU and `DistConfig::gpu`, else shm when all ranks share a host, else tcp.
    #[default]
    Auto,
    /// Shared memory; all ranks on one host.
    Shm,
    /// TCP rings; any placement.
    Tcp,
    /// NCCL through cudarc; device buffers.
    Nccl,
    /// A world of one: no transport (what `single()` returns).
    Single,
}

impl Backend {
    /// The config/CLI spelling.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Shm => "shm",
            Backend::Tcp => "tcp",
            Backend::Nccl => "nccl",
            Backend::Single => "single",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = CommError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Backend::Auto),
            "shm" => Ok(Backend::Shm),
            "tcp" => Ok(Backend::Tcp),
            "nccl" => Ok(Backend::Nccl),
            "single" => Ok(Backend::Single),
            other => Err(CommError::Env(format!(
                "dist.backend = {other:?}: expected auto, shm, tcp or nccl"
            ))),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The `[dist]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistConfig {
    /// `dist.backend`.
    pub backend: Backend,
    /// `dist.timeout`: bound on every wait for a peer, and on the rendezvous.
    pub timeout: Duration,
    /// Whether the engine computes on GPUs (lets `auto` choose nccl).
    pub gpu: bool,
    /// `dist.shm_slot_bytes`: per-rank staging slot of the shm backend (three sets of `world`
    /// slots; reductions step through at most 256 KiB of each).
    pub shm_slot_bytes: usize,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            timeout: Duration::from_secs(300),
            gpu: true,
            shm_slot_bytes: 4 << 20,
        }
    }
}

impl DistConfig {
    /// Checks the values; messages name the keys.
    pub fn validate(&self) -> Result<()> {
        if self.timeout.is_zero() {
            return Err(CommError::Env("dist.timeout must be positive".into()));
        }
        if self.shm_slot_bytes < 4096 || self.shm_slot_bytes > 1 << 30 {
            return Err(CommError::Env(format!(
                "dist.shm_slot_bytes = {} must be in 4KiB..=1GiB",
                self.shm_slot_bytes
            )));
        }
        Ok(())
    }
}

/// A world of one that needs no environment: gathers copy, sums are the identity.
pub fn single() -> Result<Box<dyn Communicator>> {
    Ok(Box::new(Queued::new(Arc::new(single::SingleComm::new(
        Duration::from_secs(300),
    )))?))
}

/// Reads the launcher variables (see `RankInfo::from_env`) and builds the communicator.
pub fn init_from_env(config: &DistConfig) -> Result<Box<dyn Communicator>> {
    init(config, &RankInfo::from_env()?)
}

/// What each rank tells the others before the backend is chosen.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Facts {
    host: String,
    nccl: bool,
    backend: Backend,
}

fn host_id() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "{}/{}",
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id")
    )
}

/// Builds the communicator for `info`: rank 0 serves the store, every rank connects to it, the
/// ranks exchange host ids and agree on the backend, then the backend connects.
pub fn init(config: &DistConfig, info: &RankInfo) -> Result<Box<dyn Communicator>> {
    config.validate()?;
    let (rank, world) = (info.rank, info.world_size);
    if world == 1 && matches!(config.backend, Backend::Single) {
        return single();
    }
    let store = if rank == 0 {
        let server = StoreServer::bind(&info.master_addr, info.master_port, rank)?;
        let addr = server.addr();
        if let Some(local) = info
            .local_world_size
            .filter(|l| addr.ip().is_loopback() && *l < world)
        {
            return Err(CommError::Env(format!(
                "MASTER_ADDR={} is a loopback address ({}) on rank 0, which the ranks on other nodes cannot \
                 reach ({local} of the {world} ranks run on this node): set MASTER_ADDR to this node's network address",
                info.master_addr,
                addr.ip()
            )));
        }
        StoreClient::connect(&addr.ip().to_string(), addr.port(), rank, config.timeout)?
            .keep_server(server)
    } else {
        StoreClient::connect(&info.master_addr, info.master_port, rank, config.timeout)?
    };
    let store = Arc::new(store);
    let nccl_ok = config.gpu
        && matches!(config.backend, Backend::Auto | Backend::Nccl)
        && nccl::unavailable_reason().is_none();
    let mine = Facts {
        host: host_id(),
        nccl: nccl_ok,
        backend: config.backend,
    };
    let encoded = bincode::serde::encode_to_vec(&mine, bincode::config::standard())
        .map_err(|e| CommError::Env(format!("cannot encode rendezvous facts: {e}")))?;
    let all: Vec<Facts> = store
        .all_gather("facts", world, &encoded)?
        .iter()
        .map(|b| bincode::serde::decode_from_slice(b, bincode::config::standard()).map(|(f, _)| f))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| CommError::Env(format!("bad rendezvous facts from a rank: {e}")))?;
    if let Some((r, f)) = all
        .iter()
        .enumerate()
        .find(|(_, f)| f.backend != config.backend)
    {
        return Err(CommError::Env(format!(
            "dist.backend differs: rank {rank} has {}, rank {r} has {}",
            config.backend, f.backend
        )));
    }
    let one_host = all.iter().all(|f| f.host == all[0].host);
    let backend = match config.backend {
        Backend::Auto if all.iter().all(|f| f.nccl) => Backend::Nccl,
        Backend::Auto if one_host => Backend::Shm,
        Backend::Auto => Backend::Tcp,
        Backend::Shm if !one_host => {
            let r = all.iter().position(|f| f.host != all[0].host).unwrap_or(0);
            return Err(CommError::Env(format!("dist.backend = \"shm\" needs all ranks on one host; rank {r} is on another host than rank 0")));
        }
        explicit => explicit,
    };
    tracing::debug!(
        rank,
        world,
        backend = backend.name(),
        "collectives: backend chosen"
    );
    let core: Arc<dyn Communicator> = match backend {
        Backend::Nccl => {
            return Ok(Box::new(NcclCommunicator::new(
                store,
                rank,
                world,
                info.local_rank,
                config.timeout,
            )?));
        }
        Backend::Shm => Arc::new(shm::ShmComm::new(
            store,
            rank,
            world,
            config.timeout,
            config.shm_slot_bytes,
        )?),
        Backend::Tcp => {
            let ip = store
                .local_ip()
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
            Arc::new(tcp::TcpComm::new(store, rank, world, config.timeout, ip)?)
        }
        Backend::Single | Backend::Auto => Arc::new(single::SingleComm::new(config.timeout)),
    };
    Ok(Box::new(Queued::new(core)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_needs_no_environment() -> Result<()> {
        let comm = single()?;
        assert_eq!(
            (comm.rank(), comm.world_size(), comm.backend()),
            (0, 1, Backend::Single)
        );
        let send = [1.0f32, 2.0, 3.0];
        let mut recv = [0f32; 3];
        comm.all_gather(&send, &mut recv)?;
        assert_eq!(recv, send);
        let mut wrong = [0f32; 4];
        let err = comm
            .all_gather(&send, &mut wrong)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("world_size * send.len()"), "{err}");
        let mut buf = vec![bf16::from_f32(1.5); 5];
        comm.all_reduce(&mut buf)?;
        assert!(buf.iter().all(|v| v.to_f32() == 1.5));
        let work = comm.reduce_scatter_async::<f32, _, _>(vec![4.0f32; 2], vec![0f32; 2]);
        let (_, out) = work.wait()?;
        assert_eq!(out, vec![4.0; 2]);
        comm.barrier_async().wait()?;
        Ok(())
    }

    #[test]
    fn config_names_its_keys() {
        let bad = DistConfig {
            shm_slot_bytes: 1,
            ..DistConfig::default()
        };
        assert!(bad
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("dist.shm_slot_bytes"));
        assert_eq!("tcp".parse::<Backend>().ok(), Some(Backend::Tcp));
        assert!("gloo".parse::<Backend>().is_err());
    }
}
