//! Per-operation timing of GPU work (`strata-bench train --profile`): while a profile is open,
//! every kernel launch and GEMM on the compute queue is followed by a timing event, and the
//! time between consecutive events is charged to the operation that ended it. Off by default;
//! it costs one event per operation while on.
//!
//! While a `--trace` is recorded (`crate::trace`), the profile also puts every operation on the
//! trace's `gpu compute` track: `profile_start` waits for its start event and notes the host
//! time, and each operation's slice runs from the previous event to its own (so a gap in which
//! the stream waited for work is counted in the next operation). Every launch is an instant on
//! the host's track, profile or not.

use std::time::Instant;

use cudarc::driver::CudaEvent;

use super::context::{GpuContext, Stream};
use super::error::{CudaError, Result};
use crate::backend::{charge, OpTime};

/// The open profile: the start event and one event per operation, in submission order.
pub(super) struct Profile {
    start: CudaEvent,
    marks: Vec<(&'static str, CudaEvent)>,
    /// With a trace recorded: the host time at which the stream passed `start`.
    traced_at: Option<Instant>,
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
        let traced_at = match crate::trace::active() {
            Some(_) => {
                start
                    .synchronize()
                    .map_err(|e| CudaError::driver("cuEventSynchronize", e))?;
                Some(Instant::now())
            }
            None => None,
        };
        *self.profile_slot() = Some(Profile {
            start,
            marks: Vec::new(),
            traced_at,
        });
        Ok(())
    }

    /// Marks the end of operation `op` on the compute queue when a profile is open.
    pub(super) fn profile_mark(&self, op: &'static str) -> Result<()> {
        tracing::trace!(target: crate::trace::INSTANT_TARGET, op, "launch");
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
        if let (Some(at), Some(trace)) = (profile.traced_at, crate::trace::active()) {
            let mut slices = Vec::with_capacity(profile.marks.len());
            let mut begin_ms = 0.0;
            for (op, event) in &profile.marks {
                let end_ms = f64::from(
                    profile
                        .start
                        .elapsed_ms(event)
                        .map_err(|e| CudaError::driver("cuEventElapsedTime", e))?,
                );
                slices.push((*op, begin_ms, end_ms));
                begin_ms = end_ms;
            }
            trace.track_slices(crate::trace::GPU_COMPUTE_TRACK, at, &slices);
        }
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(out)
    }
}
