//! Whole states in and out of the host tier, outside the step (the queues idle): a unit's master
//! weights and moments written to their tier with its compute weights (initialisation, a
//! checkpoint's load), and read back (weights, a checkpoint's save), one sub-group at a time.

use super::swap::{key, Class};
use super::{missing, HostTier, OptimHome, ParamHome};
use crate::backend::{Device, Queue};
use crate::engine::EngineError;

/// One unit's optimizer states on the host: fp32 master weights, Adam's m and v (as f32).
pub struct OptimStates {
    pub master: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl HostTier {
    /// The sub-groups of `unit`: each one's index and its elements in this rank's shard of the
    /// unit, in order.
    pub fn unit_parts(&self, unit: usize) -> Vec<(usize, std::ops::Range<usize>)> {
        self.unit_groups[unit]
            .clone()
            .map(|k| {
                let g = self.groups[k].group;
                (k, g.start..g.start + g.len)
            })
            .collect()
    }

    /// Writes sub-group `k`'s fp32 master weights (`values`), Adam's moments (`moments`, or
    /// zeros) and compute weights to their tiers. The queues must be idle; waits for every write.
    pub fn init_group(
        &mut self,
        dev: &dyn Device,
        k: usize,
        values: &[f32],
        moments: Option<(&[f32], &[f32])>,
    ) -> Result<(), EngineError> {
        let (x, mb) = (self.x, self.moment_bytes());
        let g = self.groups[k].group;
        let set = self.states_of(k)?;
        let (master, m, v) = (set.master.clone(), set.m.clone(), set.v.clone());
        // SAFETY: nothing else uses these buffers during initialisation (the queues are
        // idle: every write below is waited for).
        unsafe {
            master.f32s_mut(g.len).copy_from_slice(values);
            match moments {
                Some((mv, vv)) => {
                    m.write_moments(self.moments, mv);
                    v.write_moments(self.moments, vv);
                }
                None => {
                    m.bytes_mut()[..mb * g.len].fill(0);
                    v.bytes_mut()[..mb * g.len].fill(0);
                }
            }
        }
        if let OptimHome::Nvme { .. } = self.groups[k].optim {
            for (mem, what, bytes) in [(&master, "master", 4), (&m, "m", mb), (&v, "v", mb)] {
                self.shared
                    .write(Class::Optimizer, &key(&g, what), mem, bytes * g.len)?;
            }
        }
        match &self.groups[k].params {
            ParamHome::Host(mem) if !mem.same(&master) => {
                // SAFETY: as above.
                unsafe { mem.write_compute(x, values, 0..g.len) };
            }
            // fp32 compute weights in host memory are the master weights written above.
            ParamHome::Host(_) => {}
            ParamHome::Nvme => {
                let fetch = self.fetch.as_ref().ok_or_else(|| missing("fetch ring"))?;
                let mem = fetch.slot(0);
                // SAFETY: as above.
                unsafe { mem.write_compute(x, values, 0..g.len) };
                self.shared.write(
                    Class::Params,
                    &key(&g, "param"),
                    mem,
                    x.size_bytes() * g.len,
                )?;
            }
            ParamHome::Device(dst) => {
                let mem = self.intake.slot(0);
                // SAFETY: as above; the copy is waited for before the buffer is reused.
                unsafe {
                    mem.write_compute(x, values, 0..g.len);
                    dev.copy_h2d(Queue::H2d, dst, &mem.bytes()[..x.size_bytes() * g.len])?;
                }
                dev.synchronize(Queue::H2d)?;
            }
        }
        Ok(())
    }

    /// Sub-group `k`'s fp32 master weights and, with `moments`, Adam's m and v (else empty),
    /// read from their tier; waits for the queues first.
    pub fn read_group(
        &self,
        dev: &dyn Device,
        k: usize,
        moments: bool,
    ) -> Result<OptimStates, EngineError> {
        dev.synchronize(Queue::Host)?;
        dev.synchronize(Queue::Io)?;
        let g = self.groups[k].group;
        let set = self.states_of(k)?;
        if let OptimHome::Nvme { .. } = self.groups[k].optim {
            let mut items = vec![(key(&g, "master"), &set.master, 0)];
            if moments {
                items.extend([(key(&g, "m"), &set.m, 0), (key(&g, "v"), &set.v, 0)]);
            }
            self.shared.read_all(Class::Optimizer, &items)?;
        }
        let n = if moments { g.len } else { 0 };
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        // SAFETY: the queues are idle (synchronized above), so nothing writes the buffers.
        let master = unsafe {
            if moments {
                set.m.read_moments(self.moments, &mut m);
                set.v.read_moments(self.moments, &mut v);
            }
            set.master.f32s(g.len).to_vec()
        };
        Ok(OptimStates { master, m, v })
    }

    /// [`HostTier::read_group`] of every sub-group of `unit`, as one part of `shard_len`.
    pub fn read_states(
        &self,
        dev: &dyn Device,
        unit: usize,
        shard_len: usize,
        moments: bool,
    ) -> Result<OptimStates, EngineError> {
        let n = if moments { shard_len } else { 0 };
        let mut all = OptimStates {
            master: vec![0.0f32; shard_len],
            m: vec![0.0f32; n],
            v: vec![0.0f32; n],
        };
        for (k, r) in self.unit_parts(unit) {
            let group = self.read_group(dev, k, moments)?;
            all.master[r.clone()].copy_from_slice(&group.master);
            if moments {
                all.m[r.clone()].copy_from_slice(&group.m);
                all.v[r].copy_from_slice(&group.v);
            }
        }
        Ok(all)
    }
}
