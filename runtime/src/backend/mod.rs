//! Device backends. `cpu` is the reference and the backend CI exercises.

pub mod cpu;
