//! strata-collectives: the `Communicator` trait, its shm/tcp/nccl backends, rendezvous and the launcher.

pub mod launch;
