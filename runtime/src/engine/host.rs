//! States between the host and the device: initial weights in, the compute copies refreshed from
//! the master weights, and whole units gathered back to the host (weights export, tests).
//! Gathering shards is a collective: every rank calls these together.

use super::zero::Home;
use super::{Engine, EngineError};
use crate::backend::Queue;
use crate::weights;
use std::sync::Arc;

impl Engine {
    /// Initial weights (the model's init, or `model.init_from`, the same on every rank) into
    /// this rank's master weights; zero gradients and moments; the compute copies from them.
    pub(super) fn init_params(&mut self) -> Result<(), EngineError> {
        let seed = self.config.data.seed;
        // A weights file is read whole; the model's own init goes one unit at a time, so the
        // host never holds more than the largest unit.
        let mut loaded = match &self.config.model.init_from {
            Some(path) => {
                let mut params: Vec<Vec<f32>> =
                    self.units.iter().map(|u| vec![0.0; u.numel()]).collect();
                weights::load(path, &self.units, &self.model.tied_names(), &mut params)?;
                Some(params)
            }
            None => None,
        };
        let dev = Arc::clone(&self.dev);
        let dev = &*dev;
        for i in 0..self.states.len() {
            let mut host = match loaded.as_mut() {
                Some(params) => std::mem::take(&mut params[i]),
                None => self.units[i].init_params(seed, i),
            };
            let state = &self.states[i];
            host.resize(state.shard.padded, 0.0);
            let part = match state.placement.optimizer {
                Home::Whole => &host[..],
                Home::Sharded => &host[state.shard.range()],
            };
            match (&state.optim, self.host.as_mut()) {
                (Some(o), _) => dev.upload(&o.master, part)?,
                (None, Some(tier)) => {
                    tier.init_unit(dev, i, part, None, state.params_shard.as_ref())?
                }
                (None, None) => return Err(no_optimizer(i)),
            }
        }
        for state in &self.states {
            if let Some(g) = &state.grads {
                dev.memset(Queue::Compute, g, 0)?;
            }
            let Some(o) = &state.optim else {
                continue;
            };
            for buf in [&o.adam_m, &o.adam_v] {
                dev.memset(Queue::Compute, buf, 0)?;
            }
            let copy = match (&state.params, &state.params_shard) {
                (_, Some(shard)) => Some(shard),
                (Some(whole), None) => Some(whole),
                (None, None) => None,
            };
            if let Some(copy) = copy.filter(|c| !c.same_range(&o.master)) {
                dev.cast_f32_to_x(copy, &o.master)?;
            }
        }
        self.gather_whole_params()?;
        dev.synchronize(Queue::Compute)?;
        dev.synchronize(Queue::Comm)?;
        Ok(())
    }

    /// Whole compute weights of units whose optimizer states are sharded: the all-gather of
    /// every rank's updated shard (after each optimizer step, on the communication queue).
    pub(super) fn gather_whole_params(&self) -> Result<(), EngineError> {
        let dev = &*self.dev;
        let mut waited = false;
        for (u, state) in self.states.iter().enumerate() {
            if let (Some(whole), Some(shard)) = (&state.params, &state.params_shard) {
                if !waited {
                    dev.wait(Queue::Comm, &dev.record(Queue::Compute)?)?;
                    waited = true;
                }
                // Shards the host optimizer updated arrive through the H2D queue.
                if let Some(tier) = &self.host {
                    for e in tier.written(u) {
                        dev.wait(Queue::Comm, e)?;
                    }
                }
                dev.all_gather(&self.comm, shard, whole)?;
            }
        }
        Ok(())
    }

    /// A whole unit on the host from this rank's `part` of it (`home`): its first `numel`
    /// elements, gathered from every rank when sharded.
    fn gather_to_host(
        &self,
        unit: usize,
        part: Vec<f32>,
        home: Home,
    ) -> Result<Vec<f32>, EngineError> {
        let state = &self.states[unit];
        let mut whole = match home {
            Home::Whole => part,
            Home::Sharded => {
                // No collective of the communication queue may run beside the host's own.
                self.dev.synchronize(Queue::Comm)?;
                let mut whole = vec![0.0; state.shard.padded];
                self.comm.all_gather(&part, &mut whole)?;
                whole
            }
        };
        whole.truncate(self.units[unit].numel());
        Ok(whole)
    }

    /// The fp32 master weights, one flat vector per unit (its layout, padding rows included).
    /// Collective: every rank calls it.
    pub fn params(&self) -> Result<Vec<Vec<f32>>, EngineError> {
        (0..self.states.len())
            .map(|u| {
                let s = &self.states[u];
                let part = match (&s.optim, &self.host) {
                    (Some(o), _) => self.device().read_f32(&o.master)?,
                    (None, Some(tier)) => tier.read_master(self.device(), u, s.shard.len)?,
                    (None, None) => return Err(no_optimizer(u)),
                };
                self.gather_to_host(u, part, s.placement.optimizer)
            })
            .collect()
    }

    /// The gradients of the last `forward_backward` (averaged over ranks, loss scale removed),
    /// one flat vector per unit. Collective: every rank calls it. With the optimizer off the
    /// device, they live with it and are not read back here.
    pub fn grads(&self) -> Result<Vec<Vec<f32>>, EngineError> {
        let scale = self.scaler.scale();
        (0..self.states.len())
            .map(|u| {
                let s = &self.states[u];
                let g = s.grads.as_ref().ok_or_else(|| EngineError::Setting {
                    key: "offload_optimizer.device",
                    message: "gradients are on the optimizer's tier, not the device".into(),
                })?;
                let mut g =
                    self.gather_to_host(u, self.device().read_f32(g)?, s.placement.grads)?;
                g.iter_mut().for_each(|v| *v /= scale);
                Ok(g)
            })
            .collect()
    }

    /// Writes the parameters as safetensors with the model's tensor names. Collective: every
    /// rank calls it (shards are gathered); rank 0 writes the file.
    pub fn save_weights(&self, path: &std::path::Path) -> Result<(), EngineError> {
        let params = self.params()?;
        if self.comm.rank() != 0 {
            return Ok(());
        }
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("strata_step".to_string(), self.step.to_string());
        let units = self.units.iter().zip(params.iter().map(Vec::as_slice));
        weights::save(path, units, meta)?;
        Ok(())
    }
}

pub(super) fn no_optimizer(unit: usize) -> EngineError {
    EngineError::Setting {
        key: "offload_optimizer.device",
        message: format!("unit {unit} has its optimizer states neither on the device nor off it"),
    }
}
