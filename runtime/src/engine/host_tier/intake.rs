//! Reduced gradient shards into host memory: each sub-group's first micro-batch copied straight
//! into its gradient buffer, later ones through the intake ring and summed on the host queue;
//! after the last, the shard's partial sums of squares for the global norm (in the device's
//! order), and — with AdamW during backward — the resident sub-groups' update.

use std::sync::Arc;

use rayon::prelude::*;

use super::{HostTier, OptimHome};
use crate::backend::{Buf, Device, Event, HostJob, Queue};
use crate::engine::placement::NORM_CHUNK;
use crate::engine::EngineError;

impl HostTier {
    /// Takes this rank's reduced gradient shard of `unit` (`reduced`, f32 on the device, complete
    /// on the D2H queue's order) into host memory: a copy for the first micro-batch, a
    /// sum for the others; after the last, the shard's partial sums of squares for the norm.
    /// Returns the event after which `reduced` may be reused.
    pub fn intake_grads(
        &mut self,
        dev: &dyn Device,
        unit: usize,
        reduced: &Buf,
        micro: usize,
        last: bool,
    ) -> Result<Event, EngineError> {
        if last {
            self.shared.partials()[unit].clear();
        }
        for k in self.unit_groups[unit].clone() {
            let (g, grad) = (self.groups[k].group, self.groups[k].grad.clone());
            let src = reduced.slice(g.start, g.len)?;
            self.shared.count_d2h(4 * g.len);
            // The first micro-batch lands in the gradient buffer itself; the others in a ring
            // slot, summed into it on the host queue.
            let slot = if micro == 0 {
                if let Some(e) = &self.groups[k].grad_free {
                    dev.wait(Queue::D2h, e)?;
                }
                // SAFETY: the D2H queue waited for the last reader of `grad` (the optimizer's
                // step, `grad_free`); its next readers wait for the event recorded after this.
                unsafe { dev.copy_d2h(Queue::D2h, &mut grad.bytes_mut()[..4 * g.len], &src)? };
                None
            } else {
                let s = self.intake.acquire(dev, Queue::D2h)?;
                let slot = self.intake.slot(s).clone();
                // SAFETY: the D2H queue waited for the slot's last consumer (acquire); the
                // consumer of this copy waits for the event recorded right after it.
                unsafe { dev.copy_d2h(Queue::D2h, &mut slot.bytes_mut()[..4 * g.len], &src)? };
                Some((s, slot))
            };
            if slot.is_none() && !last {
                continue;
            }
            let copied = dev.record(Queue::D2h)?;
            let summed = slot.as_ref().map(|(_, mem)| mem.clone());
            let shared = Arc::clone(&self.shared);
            let job: HostJob = Box::new(move || {
                // SAFETY: ordered after the D2H copy (waited below) and before the slot's reuse
                // (its release event follows this job); the optimizer reads `grad` later on the
                // same queue.
                let dst = unsafe { grad.f32s_mut(g.len) };
                if let Some(slot) = &summed {
                    // SAFETY: as above.
                    add_into(dst, unsafe { slot.f32s(g.len) });
                }
                if last {
                    shared.partials()[unit].extend(chunk_sums(dst));
                }
                Ok(())
            });
            dev.wait(Queue::Host, &copied)?;
            dev.submit_host(Queue::Host, "gradient intake", job)?;
            if let Some((s, _)) = slot {
                self.intake.release(s, dev.record(Queue::Host)?);
            }
            // Its gradient complete, a resident sub-group is stepped now, during backward.
            let resident = matches!(self.groups[k].optim, OptimHome::Host(_));
            if let (true, true, Some(hyper)) = (last, resident, self.early) {
                self.adamw(dev, k, hyper, true)?;
                self.groups[k].stepped = true;
            }
        }
        Ok(dev.record(Queue::D2h)?)
    }

    /// The squared gradient norm of this rank's shards (after every intake finished), summed in
    /// the device's order: per unit in f64 over chunks, as f32 across units.
    pub fn grad_norm_squared(&self, dev: &dyn Device) -> Result<f32, EngineError> {
        dev.synchronize(Queue::Host)?;
        dev.synchronize(Queue::Io)?;
        let partials = self.shared.partials();
        Ok(partials
            .iter()
            .map(|p| p.iter().sum::<f64>() as f32)
            .fold(0.0f32, |acc, s| acc + s))
    }
}

/// dst += src, chunk by chunk in parallel.
fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(NORM_CHUNK)
        .zip(src.par_chunks(NORM_CHUNK))
        .for_each(|(d, s)| crate::backend::cpu::add_into(d, s));
}

/// The gradient norm's partial sums of `x`, chunk by chunk (as the backends' sum of squares).
fn chunk_sums(x: &[f32]) -> Vec<f64> {
    x.par_chunks(NORM_CHUNK)
        .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
        .collect()
}
