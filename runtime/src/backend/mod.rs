//! Device backends. `cpu` is the numerical reference and the backend CI exercises; `cuda` drives NVIDIA GPUs
//! through cudarc, loading the driver and libraries at run time, so one binary builds and runs everywhere.

pub mod cpu;
pub mod cuda;
