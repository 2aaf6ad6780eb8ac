//! The CPU backend: fp32 kernels, GEMMs through the `gemm` crate, rayon for the rest.
//! It is the numerical reference for every GPU kernel. Each layer is a forward/backward function pair over
//! plain slices, in the manner of llm.c; backward functions accumulate (`+=`) into their gradient outputs.

pub mod attention;
pub mod crossentropy;
pub mod elementwise;
pub mod encoder;
pub mod fastmath;
pub mod layernorm;
pub mod matmul;

pub use attention::{attention_backward, attention_forward, AttnShape};
pub use crossentropy::softmax_crossentropy;
pub use elementwise::{add_into, gelu_backward, gelu_forward, residual_forward};
pub use encoder::{encoder_backward, encoder_forward};
pub use layernorm::{layernorm_backward, layernorm_forward};
pub use matmul::{matmul_backward, matmul_forward};

#[cfg(test)]
mod gradcheck;
