//! States between the host and the device: initial weights in, a unit's optimizer states written
//! to and read from whatever tier holds them (initialisation, checkpoints), the compute copies
//! refreshed from the master weights, and whole units gathered back to the host (weights export,
//! tests). Gathering shards is a collective: every rank calls these together.

use std::ops::Range;
use std::sync::Arc;

use super::host_tier::OptimStates;
use super::memory::{Optimizer, Weights};
use super::zero::Home;
use super::{Engine, EngineError};
use crate::backend::Queue;
use crate::weights;

/// A piece of a unit's optimizer states on this rank ([`Engine::pieces`]).
pub(super) struct Piece {
    /// The host tier's sub-group, or none: the whole part, on the device.
    group: Option<usize>,
    /// Its elements in this rank's part of the unit.
    pub elements: Range<usize>,
}

impl Engine {
    /// Initial weights (the model's init, or `model.init_from`, the same on every rank) into
    /// this rank's master weights; zero gradients and moments; the compute copies from them.
    pub(super) fn init_params(&mut self) -> Result<(), EngineError> {
        let seed = self.config.data.seed;
        // Weights from `model.init_from` are checked whole (headers only) and then read one
        // unit at a time, each rank only its own part; the model's own init goes one unit at a
        // time too. The host never holds more than one unit's part, or with host-tier optimizer
        // states one sub-group's.
        let source = match &self.config.model.init_from {
            Some(path) => Some(weights::WeightSource::open(
                path,
                &self.laid.units,
                &self.model.tied_names(),
            )?),
            None => None,
        };
        let (started, rss_before) = (std::time::Instant::now(), super::rss_bytes());
        let mut failed = None;
        for u in 0..self.states.len() {
            let range = self.states[u].optimizer_range();
            let Some(source) = &source else {
                let mut whole = self.laid.units[u].init_params(seed, u);
                whole.resize(self.states[u].shard.padded, 0.0);
                let part = &whole[range];
                for piece in self.pieces(u) {
                    self.write_piece_states(u, &piece, &part[piece.elements.clone()], None)?;
                }
                continue;
            };
            let mut part = Vec::new();
            for piece in self.pieces(u) {
                part.resize(piece.elements.len(), 0.0);
                let elements = range.start + piece.elements.start..range.start + piece.elements.end;
                if let Err(e) = source.read(u, elements, &mut part) {
                    // Every rank stops, not only the one whose part is bad (below).
                    failed = Some(e);
                    break;
                }
                self.write_piece_states(u, &piece, &part, None)?;
            }
            if failed.is_some() {
                break;
            }
        }
        if let Some(source) = &source {
            self.agree_weights_read(failed)?;
            let h = |b: Option<u64>| b.map_or("unknown".into(), |b| super::human_bytes(b as usize));
            tracing::info!(
                "rank {}: weights read from {} file(s) in {:.1} s; resident memory {} before, peak {} after",
                self.rank(),
                source.files().count(),
                started.elapsed().as_secs_f64(),
                h(rss_before),
                h(super::peak_rss_bytes()),
            );
        }
        for grads in self.states.iter().filter_map(|s| s.grads.on_device()) {
            self.dev.memset(Queue::Compute, grads, 0)?;
        }
        self.gather_whole_params()?;
        self.dev.synchronize(Queue::Compute)?;
        self.dev.synchronize(Queue::Comm)?;
        Ok(())
    }

    /// The pieces in which this rank's part of unit `u`'s optimizer states is read and written:
    /// where the host tier holds them, its sub-groups, so that loading weights or a checkpoint
    /// and saving one hold a sub-group at a time, not the part (a 150k-token embedding is a
    /// gigabyte in fp32, three with Adam's moments); on the device, the whole part.
    pub(super) fn pieces(&self, u: usize) -> Vec<Piece> {
        let whole = || {
            vec![Piece {
                group: None,
                elements: 0..self.states[u].optimizer_range().len(),
            }]
        };
        match (&self.states[u].optimizer, &self.host) {
            (Optimizer::Host, Some(tier)) => tier
                .unit_parts(u)
                .into_iter()
                .map(|(k, elements)| Piece {
                    group: Some(k),
                    elements,
                })
                .collect(),
            _ => whole(),
        }
    }

    /// Writes one piece of unit `u`'s optimizer states ([`Engine::pieces`]): master weights and
    /// moments (or zeros), and the compute weights made from them, on the tier that holds them.
    /// Whole compute weights of sharded optimizer states are gathered after
    /// (`gather_whole_params`). The queues must be idle.
    pub(super) fn write_piece_states(
        &mut self,
        u: usize,
        piece: &Piece,
        master: &[f32],
        moments: Option<(&[f32], &[f32])>,
    ) -> Result<(), EngineError> {
        let dev = Arc::clone(&self.dev);
        match (piece.group, &self.states[u].optimizer) {
            (Some(k), _) => {
                let tier = self.host.as_mut().ok_or_else(|| no_optimizer(u))?;
                tier.init_group(dev.as_ref(), k, master, moments)?;
            }
            (None, Optimizer::Device(o)) => {
                dev.upload(&o.master, master)?;
                match moments {
                    Some((m, v)) => {
                        dev.upload(&o.adam_m, m)?;
                        dev.upload(&o.adam_v, v)?;
                    }
                    None => {
                        for buf in [&o.adam_m, &o.adam_v] {
                            dev.memset(Queue::Compute, buf, 0)?;
                        }
                    }
                }
                if let Some(compute) = &o.compute {
                    dev.cast_f32_to_x(compute, &o.master)?;
                }
            }
            (None, Optimizer::Host) => return Err(no_optimizer(u)),
        }
        Ok(())
    }

    /// Reads one piece of unit `u`'s optimizer states ([`Engine::pieces`]).
    pub(super) fn read_piece_states(
        &self,
        u: usize,
        piece: &Piece,
        moments: bool,
    ) -> Result<OptimStates, EngineError> {
        match (piece.group, self.host.as_ref()) {
            (Some(k), Some(tier)) => tier.read_group(self.device(), k, moments),
            _ => Ok(self.read_unit_states(u, moments)?.1),
        }
    }

    /// This rank's part of unit `u`'s optimizer states, read from their tier: its offset in the
    /// padded unit, the fp32 master weights and, with `moments`, Adam's m and v (else empty).
    pub(super) fn read_unit_states(
        &self,
        u: usize,
        moments: bool,
    ) -> Result<(usize, OptimStates), EngineError> {
        let s = &self.states[u];
        let range = s.optimizer_range();
        let dev = self.device();
        let states = match &s.optimizer {
            Optimizer::Device(o) => OptimStates {
                master: dev.read_f32(&o.master)?,
                m: if moments {
                    dev.read_f32(&o.adam_m)?
                } else {
                    Vec::new()
                },
                v: if moments {
                    dev.read_f32(&o.adam_v)?
                } else {
                    Vec::new()
                },
            },
            Optimizer::Host => {
                let tier = self.host.as_ref().ok_or_else(|| no_optimizer(u))?;
                tier.read_states(dev, u, range.len(), moments)?
            }
        };
        Ok((range.start, states))
    }

    /// Whole compute weights of units whose optimizer states are sharded: the all-gather of
    /// every rank's updated shard (after each optimizer step, on the communication queue).
    pub(super) fn gather_whole_params(&self) -> Result<(), EngineError> {
        let dev = &*self.dev;
        let mut waited = false;
        for (u, state) in self.states.iter().enumerate() {
            let Weights::Replicated { whole, shard } = &state.weights else {
                continue;
            };
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
        whole.truncate(self.laid.units[unit].numel());
        Ok(whole)
    }

    /// The fp32 master weights, one flat vector per unit (its layout, padding rows included).
    /// Collective: every rank calls it.
    pub fn params(&self) -> Result<Vec<Vec<f32>>, EngineError> {
        (0..self.states.len())
            .map(|u| {
                let (_, states) = self.read_unit_states(u, false)?;
                self.gather_to_host(u, states.master, self.states[u].placement.optimizer)
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
                let g = s.grads.on_device().ok_or_else(|| EngineError::Setting {
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

    /// Writes the parameters as one safetensors file with the model's tensor names (fp32).
    /// Collective: every rank calls it (shards are gathered); rank 0 writes the file.
    pub fn save_weights(&self, path: &std::path::Path) -> Result<(), EngineError> {
        let export = weights::Export::file(
            path,
            &self.laid.units,
            weights::ExportDtype::Fp32,
            &self.export_metadata(),
        )?;
        self.save_export(&export, &[path.to_path_buf()])
    }

    /// Writes `export` (its files at `targets`, as `crate::outputs` resolved them) streamed unit by
    /// unit: every rank gathers each unit in turn, rank 0 writes it, so no rank holds more
    /// than one unit. Collective: every rank calls it.
    pub fn save_export(
        &self,
        export: &weights::Export,
        targets: &[std::path::PathBuf],
    ) -> Result<(), EngineError> {
        let mut writer = match self.comm.rank() {
            0 => Some(export.writer(targets)?),
            _ => None,
        };
        for u in 0..self.states.len() {
            let (_, states) = self.read_unit_states(u, false)?;
            let whole =
                self.gather_to_host(u, states.master, self.states[u].placement.optimizer)?;
            if let Some(w) = writer.as_mut() {
                w.unit(&whole)?;
            }
        }
        if let Some(w) = writer {
            w.finish()?;
        }
        Ok(())
    }

    /// The header metadata of exported weights.
    pub fn export_metadata(&self) -> std::collections::BTreeMap<String, String> {
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("strata_step".to_string(), self.step.to_string());
        meta
    }
}

impl Engine {
    /// Ranks agree that each read its part of the initial weights before any collective: a rank
    /// that could not returns its error, the others name it.
    fn agree_weights_read(&self, failed: Option<weights::WeightsError>) -> Result<(), EngineError> {
        // No collective of the communication queue may run beside the host's own.
        self.dev.synchronize(Queue::Comm)?;
        let mut flags = vec![0.0f32; self.comm.world_size()];
        flags[self.comm.rank()] = f32::from(u8::from(failed.is_some()));
        self.comm.all_reduce(&mut flags)?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        match flags.iter().position(|&f| f != 0.0) {
            Some(rank) => Err(EngineError::Setting {
                key: "model.init_from",
                message: format!("rank {rank} could not read its part of the initial weights (its error says why)"),
            }),
            None => Ok(()),
        }
    }
}

fn no_optimizer(unit: usize) -> EngineError {
    EngineError::Setting {
        key: "offload_optimizer.device",
        message: format!("unit {unit} has its optimizer states off the device and no host tier"),
    }
}
