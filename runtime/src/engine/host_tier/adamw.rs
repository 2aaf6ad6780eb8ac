//! The host optimizer: AdamW over every sub-group on the host queue, in the order of the next
//! forward. Sub-groups on NVMe pass through the staging sets: their reads are issued one set
//! count ahead on the I/O queue, each is written back after its update, so the drive reads k+1
//! while k is stepped and k-1 written. The updated compute weights go to their home: host memory
//! in place, NVMe or the device through the `out` ring.

use std::sync::Arc;

use super::swap::{key, Class};
use super::{missing, HostTier, OptimHome, ParamHome};
use crate::backend::cpu::adamw::{adamw_update_any, Cast};
use crate::backend::{AdamWHyper, DType, Device, Event, Queue};
use crate::engine::host_mem::HostMem;
use crate::engine::EngineError;

impl HostTier {
    /// Lets this step's AdamW start during backward: each resident sub-group is stepped as its
    /// last gradient arrives (`intake_grads`), the others in [`HostTier::step`], which ends it.
    /// `hyper[usize::from(decay)]` are the step's hyperparameters.
    pub fn begin_early_step(&mut self, hyper: [AdamWHyper; 2]) {
        for g in &mut self.groups {
            g.stepped = false;
        }
        self.early = Some(hyper);
    }

    /// Enqueues the host optimizer over every sub-group in order (the next forward's order) that
    /// backward did not step: NVMe reads one set ahead, AdamW on the host queue, write-back and
    /// the updated compute weights to their tier. `hyper[usize::from(decay)]` are the step's
    /// hyperparameters.
    pub fn step(&mut self, dev: &dyn Device, hyper: [AdamWHyper; 2]) -> Result<(), EngineError> {
        let sets = self.opt_sets.len();
        for nth in 0..self.on_nvme.len().min(sets) {
            self.reads[nth] = Some(self.read_set(dev, self.on_nvme[nth])?);
        }
        for i in 0..self.order.len() {
            let k = self.order[i];
            if std::mem::take(&mut self.groups[k].stepped) {
                continue;
            }
            let nvme = match self.groups[k].optim {
                OptimHome::Nvme { nth } => Some(nth),
                OptimHome::Host(_) => None,
            };
            if let Some(e) = nvme.and_then(|nth| self.reads[nth].take()) {
                dev.wait(Queue::Host, &e)?;
            }
            self.adamw(dev, k, hyper, false)?;
            if let Some(nth) = nvme {
                self.write_set(dev, k)?;
                if let Some(&next) = self.on_nvme.get(nth + sets) {
                    self.reads[nth + sets] = Some(self.read_set(dev, next)?);
                }
            }
        }
        self.early = None;
        Ok(())
    }

    /// The staging set of NVMe sub-group `k` with its swap keys and bytes, for a transfer.
    fn set_items(&self, k: usize) -> Result<[(String, HostMem, usize); 3], EngineError> {
        let g = self.groups[k].group;
        let set = self.states_of(k)?;
        let mb = self.moment_bytes();
        Ok([
            (key(&g, "master"), set.master.clone(), 4 * g.len),
            (key(&g, "m"), set.m.clone(), mb * g.len),
            (key(&g, "v"), set.v.clone(), mb * g.len),
        ])
    }

    /// Enqueues the NVMe reads of sub-group `k`'s states; returns the event after them.
    fn read_set(&self, dev: &dyn Device, k: usize) -> Result<Event, EngineError> {
        let items = self.set_items(k)?;
        let shared = Arc::clone(&self.shared);
        dev.submit_host(
            Queue::Io,
            "nvme read optimizer",
            Box::new(move || {
                let items = items.each_ref().map(|(k, m, b)| (k.clone(), m, *b));
                shared.read_all(Class::Optimizer, &items)
            }),
        )?;
        Ok(dev.record(Queue::Io)?)
    }

    /// Enqueues the NVMe writes of sub-group `k`'s states after its update.
    fn write_set(&self, dev: &dyn Device, k: usize) -> Result<(), EngineError> {
        let items = self.set_items(k)?;
        let shared = Arc::clone(&self.shared);
        dev.wait(Queue::Io, &dev.record(Queue::Host)?)?;
        dev.submit_host(
            Queue::Io,
            "nvme write optimizer",
            Box::new(move || {
                let items = items.each_ref().map(|(k, m, b)| (k.clone(), m, *b));
                shared.write_all(Class::Optimizer, &items)
            }),
        )?;
        Ok(())
    }

    /// AdamW on sub-group `k` on the host queue, then its compute weights to their home. Early
    /// (during backward, before the global norm is known), a unit whose gradient is not finite
    /// is left as it is, so the step's non-finite norm stops the run before anything is updated
    /// with it.
    pub(super) fn adamw(
        &mut self,
        dev: &dyn Device,
        k: usize,
        hyper: [AdamWHyper; 2],
        early: bool,
    ) -> Result<(), EngineError> {
        let set = self.states_of(k)?;
        let (master, m, v) = (set.master.clone(), set.m.clone(), set.v.clone());
        let group = &self.groups[k];
        let (g, grad, segments) = (group.group, group.grad.clone(), group.segments.clone());
        let guard = early.then(|| Arc::clone(&self.shared));
        let (x, moments) = (self.x, self.moments);
        // The compute weights' destination: host memory in place, or a staging slot.
        let (target, slot) = match (&group.params, self.out.as_mut()) {
            (ParamHome::Host(mem), _) => (mem.clone(), None),
            (_, Some(out)) => {
                let s = out.acquire(dev, Queue::Host)?;
                (out.slot(s).clone(), Some(s))
            }
            (_, None) => return Err(missing("staging for updated parameters")),
        };
        if let Some(e) = &self.groups[k].param_written {
            // The previous fetch of these weights (host tier) read them before this rewrite.
            dev.wait(Queue::Host, e)?;
        }
        dev.wait(Queue::Host, &dev.record(Queue::H2d)?)?;
        let written = target.clone();
        dev.submit_host(
            Queue::Host,
            "host adamw",
            Box::new(move || {
                let update = guard
                    .is_none_or(|shared| shared.partials()[g.unit].iter().all(|p| p.is_finite()));
                // fp32 compute weights on the host are the master weights themselves; others
                // are rounded in the update's pass over each chunk.
                let cast_to = (!target.same(&master)).then_some(&target);
                // SAFETY: the host queue waited for the reads of this sub-group's states (NVMe),
                // the intake of its gradient, and the last use of `target`; nothing else touches
                // them until the events recorded after this job.
                unsafe {
                    let (p, gr) = (master.f32s_mut(g.len), grad.f32s(g.len));
                    if !update {
                        // The weights as they are, so the target holds them whatever it held.
                        if let Some(target) = cast_to {
                            target.write_compute(x, p, 0..g.len);
                        }
                        return Ok(());
                    }
                    for seg in segments.iter() {
                        let r = seg.offset..seg.offset + seg.len;
                        let cast = match cast_to {
                            Some(target) => target.compute_cast(x, r.clone()),
                            None => Cast::None,
                        };
                        adamw_update_any(
                            &mut p[r.clone()],
                            &gr[r.clone()],
                            m.moments(moments, r.clone()),
                            v.moments(moments, r.clone()),
                            &hyper[usize::from(seg.decay)],
                            cast,
                        );
                    }
                    if let Some(target) = cast_to {
                        // What the update's pass did not write: f32 targets, and the shard's
                        // padding past the last tensor (no segment covers it).
                        let mut from = 0;
                        let spans = segments.iter().map(|s| s.offset..s.offset + s.len);
                        for r in spans.chain(std::iter::once(g.len..g.len)) {
                            let upto = if x == DType::F32 { r.end } else { r.start };
                            if from < upto {
                                target.write_compute(x, p, from..upto);
                            }
                            from = from.max(r.end);
                        }
                    }
                }
                Ok(())
            }),
        )?;
        let updated = dev.record(Queue::Host)?;
        self.groups[k].grad_free = Some(dev.record(Queue::Host)?);
        let xb = x.size_bytes();
        let written_at = match (&self.groups[k].params, slot, self.out.as_mut()) {
            (ParamHome::Host(_), _, _) => updated,
            (ParamHome::Nvme, Some(s), Some(out)) => {
                let (shared, name) = (Arc::clone(&self.shared), key(&g, "param"));
                dev.wait(Queue::Io, &updated)?;
                dev.submit_host(
                    Queue::Io,
                    "nvme write params",
                    Box::new(move || shared.write(Class::Params, &name, &written, g.len * xb)),
                )?;
                let at = dev.record(Queue::Io)?;
                out.release(s, dev.record(Queue::Io)?);
                at
            }
            (ParamHome::Device(dst), Some(s), Some(out)) => {
                dev.wait(Queue::H2d, &updated)?;
                // SAFETY: the H2D queue waited for the optimizer's write of the slot; the slot is
                // reused only after the event recorded just below.
                unsafe { dev.copy_h2d(Queue::H2d, dst, &written.bytes()[..g.len * xb])? };
                let at = dev.record(Queue::H2d)?;
                self.shared.count_h2d(g.len * xb);
                out.release(s, dev.record(Queue::H2d)?);
                at
            }
            _ => return Err(missing("a home for updated parameters")),
        };
        self.groups[k].param_written = Some(written_at);
        Ok(())
    }
}
