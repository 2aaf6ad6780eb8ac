//! The CPU backend: fp32 kernels, GEMMs through the `gemm` crate, rayon for the rest, behind the
//! device seam as [`CpuDevice`]. It is the numerical reference for every GPU kernel. Each layer
//! is a forward/backward function pair over plain slices, in the manner of llm.c.

pub mod adamw;
pub mod attention;
pub mod crossentropy;
pub mod decode;
mod device;
mod disjoint;
pub mod elementwise;
pub mod encoder;
pub mod fastmath;
pub mod flash;
mod launch;
pub mod layernorm;
pub mod matmul;
pub mod rmsnorm;
pub mod rotary;

pub use attention::{attention_backward, attention_forward};
pub use crossentropy::softmax_crossentropy;
pub use device::{CpuDevice, CpuOptions};
pub use elementwise::{
    add_into, gelu_backward, gelu_forward, gelu_in_place, residual_forward, swiglu_backward,
    swiglu_forward,
};
pub use encoder::{encoder_backward, encoder_forward};
pub use flash::{flash_backward, flash_forward};
pub use layernorm::{layernorm_backward, layernorm_forward};
pub use matmul::{matmul_backward, matmul_forward};
pub use rmsnorm::{rmsnorm_backward, rmsnorm_forward};
pub use rotary::rotary;

#[cfg(test)]
mod gradcheck;
