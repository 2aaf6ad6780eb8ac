//! Per-operation timing of GPU work (`strata-bench train --profile`): while a profile is open,
//! every kernel launch and GEMM on the compute queue is followed by a timing event, and the
//! time between consecutive events is charged to the operation that ended it; every host↔device
//! copy is bracketed by two timing events on its own stream, which give the copy streams' busy
//! time and rate. Off by default; it costs one event per operation (two per copy) while on.
//!
//! While a `--trace` is recorded (`crate::trace`), the profile also puts every operation on the
//! trace's `gpu compute` track: `profile_start` waits for its start event and notes the host
//! time, and each operation's slice runs from the previous event to its own (so a gap in which
//! the stream waited for work is counted in the next operation); each copy lands on the `gpu h2d`
//! or `gpu d2h` track from its begin to its end event, so the copy streams' overlap with compute
//! shows. Every launch is an instant on the host's track, profile or not.

use std::time::Instant;

use cudarc::driver::CudaEvent;

use super::context::{GpuContext, Stream};
use super::error::{CudaError, Result};
use crate::backend::{charge, CopyTime, OpTime, Queue, StepProfile};

/// The open profile: the start event and one event per operation, in submission order.
pub(super) struct Profile {
    start: CudaEvent,
    marks: Vec<(&'static str, CudaEvent)>,
    /// Host↔device copies, in submission order.
    copies: Vec<TimedCopy>,
    /// With a trace recorded: the host time at which the stream passed `start`.
    traced_at: Option<Instant>,
}

/// One copy between its begin and end events on its stream.
pub(super) struct TimedCopy {
    queue: Queue,
    bytes: usize,
    begin: CudaEvent,
    end: CudaEvent,
}

impl GpuContext {
    fn timing_event(&self) -> Result<CudaEvent> {
        self.timing_event_on(Stream::Compute)
    }

    fn timing_event_on(&self, stream: Stream) -> Result<CudaEvent> {
        let event = self
            .cuda()
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| CudaError::driver("cuEventCreate", e))?;
        event
            .record(self.stream(stream))
            .map_err(|e| CudaError::driver("cuEventRecord", e))?;
        Ok(event)
    }

    /// Enqueues `copy` (a copy of `bytes` on `stream`, for `queue`); while a profile is open,
    /// between two timing events on that stream.
    pub(super) fn timed_copy(
        &self,
        queue: Queue,
        stream: Stream,
        bytes: usize,
        copy: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if self.profile_slot().is_none() {
            return copy();
        }
        let begin = self.timing_event_on(stream)?;
        copy()?;
        let end = self.timing_event_on(stream)?;
        if let Some(profile) = self.profile_slot().as_mut() {
            profile.copies.push(TimedCopy {
                queue,
                bytes,
                begin,
                end,
            });
        }
        Ok(())
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
            copies: Vec::new(),
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
    /// first, and the copies per queue (empty when no profile was open).
    pub fn profile_finish(&self) -> Result<StepProfile> {
        let Some(profile) = self.profile_slot().take() else {
            return Ok(StepProfile::default());
        };
        let ends = profile.marks.last().map(|(_, e)| e).into_iter();
        for event in ends.chain(profile.copies.iter().map(|c| &c.end)) {
            event
                .synchronize()
                .map_err(|e| CudaError::driver("cuEventSynchronize", e))?;
        }
        let elapsed = |from: &CudaEvent, to: &CudaEvent| -> Result<f64> {
            Ok(f64::from(
                from.elapsed_ms(to)
                    .map_err(|e| CudaError::driver("cuEventElapsedTime", e))?,
            ))
        };
        let mut copies: Vec<CopyTime> = Vec::new();
        let mut copy_slices: [Vec<(&'static str, f64, f64)>; 2] = [Vec::new(), Vec::new()];
        for c in &profile.copies {
            let ms = elapsed(&c.begin, &c.end)?;
            match copies.iter_mut().find(|t| t.queue == c.queue) {
                Some(t) => {
                    t.calls += 1;
                    t.bytes += c.bytes as u64;
                    t.busy_ms += ms;
                }
                None => copies.push(CopyTime {
                    queue: c.queue,
                    calls: 1,
                    bytes: c.bytes as u64,
                    busy_ms: ms,
                }),
            }
            if profile.traced_at.is_some() {
                let (track, name) = match c.queue {
                    Queue::D2h => (1, "copy_d2h"),
                    _ => (0, "copy_h2d"),
                };
                let begin = elapsed(&profile.start, &c.begin)?;
                copy_slices[track].push((name, begin, begin + ms));
            }
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
            trace.track_slices(crate::trace::GPU_H2D_TRACK, at, &copy_slices[0]);
            trace.track_slices(crate::trace::GPU_D2H_TRACK, at, &copy_slices[1]);
        }
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(StepProfile { ops: out, copies })
    }
}
