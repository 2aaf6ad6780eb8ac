//! Per-operation timing of GPU work (`strata-bench train --profile`): while a profile is open,
//! every kernel launch and GEMM on the compute queue is followed by a timing event, and the
//! time between consecutive events is charged to the operation that ended it. Off by default;
//! it costs one event per operation while on.

use cudarc::driver::CudaEvent;

use super::context::{GpuContext, Stream};
use super::error::{CudaError, Result};
use crate::backend::{charge, OpTime};

/// The open profile: the start event and one event per operation, in submission order.
pub(super) struct Profile {
    start: CudaEvent,
    marks: Vec<(&'static str, CudaEvent)>,
}

impl GpuContext {
    fn timing_event(&self) -> Result<CudaEvent> {
        let event = self
            .cuda()
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| CudaError::driver("cuEventCreate", e))?;
        event
            .record(self.stream(Stream::Compute))
            .map_err(|e| CudaError::driver("cuEventRecord", e))?;
        Ok(event)
    }

    /// Starts timing every operation on the compute queue (replaces an open profile).
    pub fn profile_start(&self) -> Result<()> {
        let start = self.timing_event()?;
        *self.profile_slot() = Some(Profile {
            start,
            marks: Vec::new(),
        });
        Ok(())
    }

    /// Marks the end of operation `op` on the compute queue when a profile is open.
    pub(super) fn profile_mark(&self, op: &'static str) -> Result<()> {
        let mut slot = self.profile_slot();
        let Some(profile) = slot.as_mut() else {
            return Ok(());
        };
        profile.marks.push((op, self.timing_event()?));
        Ok(())
    }

    /// Closes the profile, waits for its work and returns the time per operation, largest
    /// first (empty when no profile was open).
    pub fn profile_finish(&self) -> Result<Vec<OpTime>> {
        let Some(profile) = self.profile_slot().take() else {
            return Ok(Vec::new());
        };
        if let Some((_, last)) = profile.marks.last() {
            last.synchronize()
                .map_err(|e| CudaError::driver("cuEventSynchronize", e))?;
        }
        let mut out: Vec<OpTime> = Vec::new();
        let mut prev = &profile.start;
        for (op, event) in &profile.marks {
            let ms = f64::from(
                prev.elapsed_ms(event)
                    .map_err(|e| CudaError::driver("cuEventElapsedTime", e))?,
            );
            charge(&mut out, op, ms);
            prev = event;
        }
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(out)
    }
}
