//! States between the host and the device: initial weights in, the compute copies refreshed from
//! the master weights, and whole units gathered back to the host (weights export, tests).
//! Gathering shards is a collective: every rank calls these together.

use super::zero::Home;
use super::{Engine, EngineError};
use crate::backend::{Buf, Queue};
use crate::weights;

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
                weights::load(path, &self.units, &mut params)?;
                Some(params)
            }
            None => None,
        };
        let dev = &*self.dev;
        for (i, state) in self.states.iter().enumerate() {
            let mut host = match loaded.as_mut() {
                Some(params) => std::mem::take(&mut params[i]),
                None => self.units[i].init_params(seed, i),
            };
            host.resize(state.shard.padded, 0.0);
            let part = match state.placement.optimizer {
                Home::Whole => &host[..],
                Home::Sharded => &host[state.shard.range()],
            };
            dev.upload(&state.master, part)?;
        }
        for state in &self.states {
            for buf in [&state.grads, &state.adam_m, &state.adam_v] {
                dev.memset(Queue::Compute, buf, 0)?;
            }
            let copy = match (&state.params, &state.params_shard) {
                (_, Some(shard)) => Some(shard),
                (Some(whole), None) => Some(whole),
                (None, None) => None,
            };
            if let Some(copy) = copy.filter(|c| !c.same_range(&state.master)) {
                dev.cast_f32_to_x(copy, &state.master)?;
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
        for state in &self.states {
            if let (Some(whole), Some(shard)) = (&state.params, &state.params_shard) {
                if !waited {
                    dev.wait(Queue::Comm, &dev.record(Queue::Compute)?)?;
                    waited = true;
                }
                dev.all_gather(&self.comm, shard, whole)?;
            }
        }
        Ok(())
    }

    /// A whole unit of `buf` (this rank's part of it, `home`) on the host: its first `numel`
    /// elements, gathered from every rank when sharded.
    fn gather_to_host(&self, unit: usize, buf: &Buf, home: Home) -> Result<Vec<f32>, EngineError> {
        let state = &self.states[unit];
        let part = self.device().read_f32(buf)?;
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
                self.gather_to_host(u, &s.master, s.placement.optimizer)
            })
            .collect()
    }

    /// The gradients of the last `forward_backward` (averaged over ranks, loss scale removed),
    /// one flat vector per unit. Collective: every rank calls it.
    pub fn grads(&self) -> Result<Vec<Vec<f32>>, EngineError> {
        let scale = self.scaler.scale();
        (0..self.states.len())
            .map(|u| {
                let s = &self.states[u];
                let mut g = self.gather_to_host(u, &s.grads, s.placement.grads)?;
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
