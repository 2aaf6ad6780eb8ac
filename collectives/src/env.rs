//! Rendezvous variables: torchrun's, SLURM's and Open MPI's, read into one `RankInfo`.

use crate::error::{CommError, Result};

/// Port used when a launcher sets no MASTER_PORT (SLURM, mpirun); the same default as torchrun.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Ranks in a job at most (every rank's address passes through rank 0's store).
pub const WORLD_SIZE_MAX: usize = 1 << 16;

/// Which launcher's variables were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource {
    /// RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (torchrun, `strata launch`).
    Torchrun,
    /// SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODELIST.
    Slurm,
    /// OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE.
    OpenMpi,
}

/// Where this process sits in the job and where the rank-0 store listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// Ranks on this node, when the launcher says.
    pub local_world_size: Option<usize>,
    pub master_addr: String,
    pub master_port: u16,
    pub source: EnvSource,
}

impl RankInfo {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the process environment; `None` when no launcher variable is set at all (a process that runs
    /// alone), an error when some are set but do not say a rank.
    pub fn from_env_if_launched() -> Result<Option<Self>> {
        Self::from_vars_if_launched(|name| std::env::var(name).ok())
    }

    /// [`RankInfo::from_env_if_launched`] through `get`.
    pub fn from_vars_if_launched(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        const LAUNCHER_VARS: [&str; 4] =
            ["WORLD_SIZE", "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"];
        if !LAUNCHER_VARS.iter().any(|v| get(v).is_some()) {
            return Ok(None);
        }
        Self::from_vars(get).map(Some)
    }

    /// Reads the variables through `get` (the process environment in `from_env`). torchrun's
    /// variables win over SLURM's, which win over Open MPI's (torchrun under SLURM sets both).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let has = |name: &str| get(name).is_some();
        if has("RANK") || has("WORLD_SIZE") {
            Self::torchrun(&get)
        } else if has("SLURM_PROCID") {
            Self::slurm(&get)
        } else if has("OMPI_COMM_WORLD_RANK") {
            Self::open_mpi(&get)
        } else {
            Err(CommError::Env(
                "no launcher variables found: set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT \
                 (or run under `strata launch`, torchrun, srun or mpirun)"
                    .into(),
            ))
        }
    }

    fn torchrun(get: &impl Fn(&str) -> Option<String>) -> Result<Self> {
        let rank = required_usize(get, "RANK")?;
        let world_size = required_usize(get, "WORLD_SIZE")?;
        let local_rank = optional_usize(get, "LOCAL_RANK")?.unwrap_or(rank);
        let local_world_size = optional_usize(get, "LOCAL_WORLD_SIZE")?;
        let counts = Self::counted(
            rank,
            world_size,
            local_rank,
            local_world_size,
            EnvSource::Torchrun,
        )?;
        let master_addr = match get("MASTER_ADDR") {
            Some(addr) => addr,
            None if world_size == 1 => "127.0.0.1".into(),
            None => return Err(missing("MASTER_ADDR", "needed when WORLD_SIZE > 1")),
        };
        let master_port = match get("MASTER_PORT") {
            Some(port) => parse_port(&port)?,
            None if world_size == 1 => 0,
            None => return Err(missing("MASTER_PORT", "needed when WORLD_SIZE > 1")),
        };
        Self {
            master_addr,
            master_port,
            ..counts
        }
        .validated()
    }

    fn slurm(get: &impl Fn(&str) -> Option<String>) -> Result<Self> {
        let rank = required_usize(get, "SLURM_PROCID")?;
        let world_size = required_usize(get, "SLURM_NTASKS")?;
        let local_rank = required_usize(get, "SLURM_LOCALID")?;
        let local_world_size = match get("SLURM_TASKS_PER_NODE") {
            Some(spec) if !spec.contains(',') && !spec.contains('(') => {
                Some(parse_usize("SLURM_TASKS_PER_NODE", &spec)?)
            }
            _ => None,
        };
        let counts = Self::counted(
            rank,
            world_size,
            local_rank,
            local_world_size,
            EnvSource::Slurm,
        )?;
        let master_addr = match get("MASTER_ADDR") {
            Some(addr) => addr,
            None => {
                let list = get("SLURM_NODELIST")
                    .or_else(|| get("SLURM_JOB_NODELIST"))
                    .ok_or_else(|| {
                        missing(
                            "SLURM_NODELIST",
                            "needed to find the rank-0 host (or set MASTER_ADDR)",
                        )
                    })?;
                first_host(&list)?
            }
        };
        let master_port = match get("MASTER_PORT") {
            Some(port) => parse_port(&port)?,
            None => DEFAULT_MASTER_PORT,
        };
        Self {
            master_addr,
            master_port,
            ..counts
        }
        .validated()
    }

    fn open_mpi(get: &impl Fn(&str) -> Option<String>) -> Result<Self> {
        let rank = required_usize(get, "OMPI_COMM_WORLD_RANK")?;
        let world_size = required_usize(get, "OMPI_COMM_WORLD_SIZE")?;
        let local_rank = required_usize(get, "OMPI_COMM_WORLD_LOCAL_RANK")?;
        let local_world_size = optional_usize(get, "OMPI_COMM_WORLD_LOCAL_SIZE")?;
        let counts = Self::counted(
            rank,
            world_size,
            local_rank,
            local_world_size,
            EnvSource::OpenMpi,
        )?;
        let single_node = local_world_size == Some(world_size);
        let master_addr = match get("MASTER_ADDR") {
            Some(addr) => addr,
            None if single_node => "127.0.0.1".into(),
            None => {
                return Err(missing(
                    "MASTER_ADDR",
                    "needed when Open MPI ranks span several nodes",
                ))
            }
        };
        let master_port = match get("MASTER_PORT") {
            Some(port) => parse_port(&port)?,
            None => DEFAULT_MASTER_PORT,
        };
        Self {
            master_addr,
            master_port,
            ..counts
        }
        .validated()
    }

    /// The counts, checked before anything else is read, so that a wrong count is named rather than a
    /// variable that only a larger job needs (`WORLD_SIZE=0` is not "MASTER_ADDR is not set").
    fn counted(
        rank: usize,
        world_size: usize,
        local_rank: usize,
        local_world_size: Option<usize>,
        source: EnvSource,
    ) -> Result<Self> {
        Self {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr: String::new(),
            master_port: 0,
            source,
        }
        .counts_checked()
    }

    fn counts_checked(self) -> Result<Self> {
        let (rank_var, world_var, local_var, local_world_var) = match self.source {
            EnvSource::Torchrun => ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
            EnvSource::Slurm => (
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_TASKS_PER_NODE",
            ),
            EnvSource::OpenMpi => (
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ),
        };
        let bad = |msg: String| Err(CommError::Env(msg));
        if self.world_size == 0 {
            return bad(format!("{world_var}=0: a job needs at least one rank"));
        }
        if self.world_size > WORLD_SIZE_MAX {
            return bad(format!(
                "{world_var}={} exceeds the maximum {WORLD_SIZE_MAX}",
                self.world_size
            ));
        }
        if self.rank >= self.world_size {
            return bad(format!(
                "{rank_var}={} is not below {world_var}={}",
                self.rank, self.world_size
            ));
        }
        if let Some(local_world) = self.local_world_size {
            if local_world == 0 || local_world > self.world_size {
                return bad(format!(
                    "{local_world_var}={local_world} must be in 1..={world_var}={}",
                    self.world_size
                ));
            }
            if self.local_rank >= local_world {
                return bad(format!(
                    "{local_var}={} is not below {local_world_var}={local_world}",
                    self.local_rank
                ));
            }
        }
        if self.local_rank >= self.world_size {
            return bad(format!(
                "{local_var}={} is not below {world_var}={}",
                self.local_rank, self.world_size
            ));
        }
        Ok(self)
    }

    /// The rank-0 address and port, once the counts are known to be right.
    fn validated(self) -> Result<Self> {
        let bad = |msg: String| Err(CommError::Env(msg));
        if self.master_addr.trim().is_empty() {
            return bad("MASTER_ADDR is empty".into());
        }
        if self.world_size > 1 && self.master_port == 0 {
            return bad(
                "MASTER_PORT=0: ranks cannot find a port chosen at random; set a port".into(),
            );
        }
        Ok(self)
    }
}

fn missing(name: &str, why: &str) -> CommError {
    CommError::Env(format!("{name} is not set ({why})"))
}

fn parse_usize(name: &str, value: &str) -> Result<usize> {
    value
        .trim()
        .parse()
        .map_err(|_| CommError::Env(format!("{name}={value:?} is not a non-negative integer")))
}

fn required_usize(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<usize> {
    let value = get(name).ok_or_else(|| missing(name, "the launcher sets it for every rank"))?;
    parse_usize(name, &value)
}

fn optional_usize(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    get(name).map(|v| parse_usize(name, &v)).transpose()
}

fn parse_port(value: &str) -> Result<u16> {
    value.trim().parse().map_err(|_| {
        CommError::Env(format!(
            "MASTER_PORT={value:?} is not a port number (0-65535)"
        ))
    })
}

/// The first host of a SLURM host list: `node[01-04,07],gpu5` -> `node01`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    let bad = || CommError::Env(format!("SLURM_NODELIST={list:?} is not a host list"));
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let inner_end = list[end..].find(']').ok_or_else(bad)? + end;
        let first = list[end + 1..inner_end]
            .split([',', '-'])
            .next()
            .ok_or_else(bad)?;
        if first.is_empty() || prefix.is_empty() {
            return Err(bad());
        }
        return Ok(format!("{prefix}{first}"));
    }
    if prefix.is_empty() {
        return Err(bad());
    }
    Ok(prefix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn info(vars: &[(&str, &str)]) -> Result<RankInfo> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RankInfo::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn torchrun_variables() -> Result<()> {
        let i = info(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29501"),
        ])?;
        assert_eq!(
            (i.rank, i.world_size, i.local_rank, i.local_world_size),
            (3, 8, 1, Some(2))
        );
        assert_eq!(
            (i.master_addr.as_str(), i.master_port, i.source),
            ("10.0.0.1", 29501, EnvSource::Torchrun)
        );
        Ok(())
    }

    #[test]
    fn no_launcher_variables_is_a_world_of_one_and_bad_ones_an_error() -> Result<()> {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            RankInfo::from_vars_if_launched(vars(&[("HOME", "/root")]))?,
            None
        );
        let i = RankInfo::from_vars_if_launched(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "5"),
        ]))?;
        assert_eq!(i.map(|i| (i.rank, i.world_size)), Some((1, 2)));
        assert!(RankInfo::from_vars_if_launched(vars(&[("RANK", "1")])).is_err());
        Ok(())
    }

    #[test]
    fn slurm_variables_take_the_first_node() -> Result<()> {
        let i = info(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODELIST", "gpu[07-10,12]"),
        ])?;
        assert_eq!((i.rank, i.world_size, i.local_rank), (5, 8, 1));
        assert_eq!(
            (i.master_addr.as_str(), i.master_port),
            ("gpu07", DEFAULT_MASTER_PORT)
        );
        assert_eq!(first_host("a1,b2").ok().as_deref(), Some("a1"));
        assert!(first_host("[1-2]").is_err());
        Ok(())
    }

    #[test]
    fn open_mpi_variables() -> Result<()> {
        let i = info(&[
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
        ])?;
        assert_eq!(
            (i.rank, i.world_size, i.master_addr.as_str()),
            (2, 4, "127.0.0.1")
        );
        assert_eq!(i.source, EnvSource::OpenMpi);
        Ok(())
    }

    #[test]
    fn missing_and_contradictory_variables_are_named() {
        let err =
            |vars: &[(&str, &str)]| info(vars).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&[]).contains("RANK, WORLD_SIZE"));
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE is not set"));
        assert!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")])
                .contains("MASTER_PORT is not set")
        );
        assert!(err(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1")
        ])
        .contains("RANK=2 is not below WORLD_SIZE=2"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        assert!(err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000")
        ])
        .contains("MASTER_PORT=\"70000\""));
        assert!(err(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "3"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1")
        ])
        .contains("LOCAL_RANK=3 is not below LOCAL_WORLD_SIZE=2"));
        assert!(err(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0")
        ])
        .contains("SLURM_NODELIST"));
        assert!(err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "100000"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1")
        ])
        .contains("WORLD_SIZE=100000 exceeds the maximum 65536"));
        // A wrong count is named before the variables only a larger job needs.
        assert_eq!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "0")]),
            "rendezvous environment: WORLD_SIZE=0: a job needs at least one rank"
        );
        assert!(err(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0")
        ])
        .contains("SLURM_PROCID=3 is not below SLURM_NTASKS=2"));
        assert!(err(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "0"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        ])
        .contains("OMPI_COMM_WORLD_SIZE=0"));
        let single = info(&[("RANK", "0"), ("WORLD_SIZE", "1")]);
        assert!(single.is_ok());
    }
}
