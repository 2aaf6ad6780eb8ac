//! Fused (flash) attention on the GPU: not built yet in this commit.

use super::context::GpuContext;
use super::error::{CudaError, Result};
use crate::backend::{AttentionShape, Buf};

const NOT_BUILT: &str =
    "the fused attention kernels are not built yet: set train.attention = \"materialized\"";

impl GpuContext {
    pub(super) fn flash_forward(
        &self,
        _out: &Buf,
        _lse: &Buf,
        _qkv: &Buf,
        _s: AttentionShape,
    ) -> Result<()> {
        Err(CudaError::precondition("attention_forward", NOT_BUILT))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_backward(
        &self,
        _dqkv: &Buf,
        _delta: &Buf,
        _dout: &Buf,
        _qkv: &Buf,
        _out: &Buf,
        _lse: &Buf,
        _s: AttentionShape,
    ) -> Result<()> {
        Err(CudaError::precondition("attention_backward", NOT_BUILT))
    }
}
