//! The walk: a plan carried out on the device's queues. Before use i the host issues the
//! all-gathers the plan starts there (on the communication queue, each after the release events
//! of the copies that held its memory), makes compute wait for the gathers use i reads, zeroes
//! the gradient buffers that start there, calls the model, then records the release of what use
//! i was the last to read and sends finished gradients away: a reduce-scatter into this rank's
//! shard (sharded gradients) or an all-reduce (whole gradients, in the last micro-batch). The
//! host never waits inside a walk; queues wait on events only.

use std::sync::Arc;

use super::schedule::{Lookahead, Plan, PlanInput, UseKind};
use super::zero::Home;
use super::{Engine, EngineError};
use crate::backend::{Buf, DeviceError, Event, Queue};
use crate::model::HeadGrads;

/// What the head does in a walk.
pub(super) enum HeadMode<'a> {
    /// Loss and backward: ∂L/∂(mean token loss of a micro-batch) = `dloss`.
    Train { dloss: f32 },
    /// Loss only.
    Eval,
    /// The logits of the (single) micro-batch, appended row by row without the padding.
    Logits(&'a mut Vec<f32>),
}

fn missing(what: &str, unit: usize) -> EngineError {
    EngineError::Device(DeviceError::op(
        "walk",
        format!("unit {unit} has no {what} in this plan"),
    ))
}

impl Engine {
    /// The plan of a walk over `micro` micro-batches (made once, then reused).
    pub(super) fn plan(&mut self, micro: usize, train: bool) -> Result<Arc<Plan>, EngineError> {
        if let Some((_, plan)) = self.plans.iter().find(|(key, _)| *key == (micro, train)) {
            return Ok(Arc::clone(plan));
        }
        let unit_len: Vec<usize> = self.states.iter().map(|s| s.shard.padded).collect();
        let gathered: Vec<bool> = self
            .states
            .iter()
            .map(|s| s.placement.params == Home::Sharded)
            .collect();
        let grad_sharded: Vec<bool> = self
            .states
            .iter()
            .map(|s| s.placement.grads == Home::Sharded)
            .collect();
        let input = PlanInput {
            stage_units: &self.stage_units,
            unit_len: &unit_len,
            gathered: &gathered,
            grad_sharded: &grad_sharded,
            micro,
            train,
            param_bytes: self.sizes.x.size_bytes(),
        };
        let fits = |p: &Plan| {
            p.param_pool_len <= self.sizes.param_pool_len
                && p.grad_pool_len <= self.sizes.grad_pool_len
        };
        let mut plan = Plan::new(&input, self.lookahead);
        if !fits(&plan) {
            // Fewer micro-batches than planned for: without prefetch a walk needs the least.
            plan = Plan::new(
                &input,
                Lookahead {
                    prefetch_bytes: 0,
                    reuse_gap: 0,
                },
            );
        }
        if !fits(&plan) {
            return Err(EngineError::Device(DeviceError::op(
                "plan",
                format!(
                    "a walk of {micro} micro-batches needs pools of {} and {} elements; {} and {} were planned",
                    plan.param_pool_len,
                    plan.grad_pool_len,
                    self.sizes.param_pool_len,
                    self.sizes.grad_pool_len
                ),
            )));
        }
        let plan = Arc::new(plan);
        self.plans.push(((micro, train), Arc::clone(&plan)));
        Ok(plan)
    }

    /// Carries out `plan` (see the module comment).
    pub(super) fn walk(&mut self, plan: &Plan, mut head: HeadMode<'_>) -> Result<(), EngineError> {
        let dev = Arc::clone(&self.dev);
        let dev = &*dev;
        let train = matches!(head, HeadMode::Train { .. });
        // With work for the communication queue, the queues meet at the start of a walk:
        // gathers see the last optimizer update, and every pool is free.
        let comm_work =
            self.comm.world_size() > 1 || !plan.gathers.is_empty() || !plan.grad_buffers.is_empty();
        if comm_work {
            dev.wait(Queue::Comm, &dev.record(Queue::Compute)?)?;
            dev.wait(Queue::Compute, &dev.record(Queue::Comm)?)?;
        }
        let mut gathered: Vec<Option<Event>> = (0..plan.gathers.len()).map(|_| None).collect();
        let mut released: Vec<Option<Event>> = (0..plan.gathers.len()).map(|_| None).collect();
        let mut reduced: Vec<Option<Event>> = (0..plan.grad_buffers.len()).map(|_| None).collect();
        // The last use of each unit's whole gradients: all-reduced (and taken by the host
        // optimizer) after it.
        let micro_count = plan.uses.last().map_or(1, |u| u.micro + 1);
        let mut last_grad_use = vec![None; self.states.len()];
        if train {
            for (i, u) in plan.uses.iter().enumerate() {
                if u.kind != UseKind::Forward {
                    for &unit in &self.stage_units[u.stage] {
                        last_grad_use[unit] = Some(i);
                    }
                }
            }
        }
        let mut next_gather = 0;
        for (i, u) in plan.uses.iter().enumerate() {
            while next_gather < plan.gathers.len() && plan.gathers[next_gather].start == i {
                let g = &plan.gathers[next_gather];
                for &p in &g.after {
                    let event = released[p]
                        .as_ref()
                        .ok_or_else(|| missing("released copy", g.unit))?;
                    dev.wait(Queue::Comm, event)?;
                }
                let region = self.pool_view(true, g.offset, g.len)?;
                match self.states[g.unit].params_shard.clone() {
                    Some(send) => {
                        // A shard the host optimizer updated arrives through the H2D queue.
                        if let Some(tier) = &self.host {
                            for e in tier.written(g.unit) {
                                dev.wait(Queue::Comm, e)?;
                            }
                        }
                        dev.all_gather(&self.comm, &send, &region)?;
                    }
                    None => {
                        // This rank's shard comes from the host or NVMe into its slot of the
                        // region, which the earlier occupants must have released.
                        for &p in &g.after {
                            let event = released[p]
                                .as_ref()
                                .ok_or_else(|| missing("released copy", g.unit))?;
                            dev.wait(Queue::H2d, event)?;
                        }
                        let shard = self.states[g.unit].shard;
                        let slot = region.slice(shard.range().start, shard.len)?;
                        let tier = self
                            .host
                            .as_mut()
                            .ok_or_else(|| missing("host tier", g.unit))?;
                        tier.fetch_params(dev, g.unit, &slot)?;
                        if self.comm.world_size() == 1 {
                            // The shard is the whole unit: fetched is gathered.
                            gathered[next_gather] = Some(dev.record(Queue::H2d)?);
                            next_gather += 1;
                            continue;
                        }
                        dev.wait(Queue::Comm, &dev.record(Queue::H2d)?)?;
                        let scratch = self
                            .bufs
                            .reduce_scratch
                            .as_ref()
                            .ok_or_else(|| missing("gather scratch", g.unit))?;
                        dev.all_gather_in_place(&self.comm, &region, scratch)?;
                    }
                }
                gathered[next_gather] = Some(dev.record(Queue::Comm)?);
                next_gather += 1;
            }
            let units = self.stage_units[u.stage].clone();
            let mut params = Vec::with_capacity(units.len());
            let mut grads = Vec::with_capacity(units.len());
            for (k, &unit) in units.iter().enumerate() {
                params.push(match plan.use_gathers[i][k] {
                    Some(g) => {
                        if plan.gathers[g].first == i {
                            let event = gathered[g]
                                .as_ref()
                                .ok_or_else(|| missing("gather", unit))?;
                            dev.wait(Queue::Compute, event)?;
                        }
                        self.pool_view(true, plan.gathers[g].offset, plan.gathers[g].len)?
                    }
                    None => self.states[unit]
                        .params
                        .clone()
                        .ok_or_else(|| missing("whole parameters", unit))?,
                });
                // Gradients for backward uses only (an evaluation's head computes none).
                if u.kind == UseKind::Forward || !train {
                    continue;
                }
                grads.push(match plan.use_grads[i][k] {
                    Some(b) => {
                        let buffer = &plan.grad_buffers[b];
                        let view = self.pool_view(false, buffer.offset, buffer.len)?;
                        if buffer.first == i {
                            for &p in &buffer.after {
                                let event = reduced[p]
                                    .as_ref()
                                    .ok_or_else(|| missing("reduced gradient", unit))?;
                                dev.wait(Queue::Compute, event)?;
                            }
                            dev.memset(Queue::Compute, &view, 0)?;
                        }
                        view
                    }
                    None => self.states[unit]
                        .grads
                        .clone()
                        .ok_or_else(|| missing("gradients", unit))?,
                });
            }
            self.call(u.micro, u.stage, u.kind, &params, &grads, &mut head)?;
            for &g in &plan.gathers_ending[i] {
                released[g] = Some(dev.record(Queue::Compute)?);
            }
            for &b in &plan.grads_ending[i] {
                let buffer = &plan.grad_buffers[b];
                let full = self.pool_view(false, buffer.offset, buffer.len)?;
                self.reduce_unit(buffer.unit, &full, u.micro, u.micro + 1 == micro_count)?;
                reduced[b] = Some(dev.record(Queue::Comm)?);
            }
            for &unit in &units {
                if last_grad_use[unit] != Some(i)
                    || self.states[unit].placement.grads != Home::Whole
                {
                    continue;
                }
                let state = &self.states[unit];
                let grads = state
                    .grads
                    .clone()
                    .ok_or_else(|| missing("gradients", unit))?;
                if self.comm.world_size() > 1 {
                    dev.wait(Queue::Comm, &dev.record(Queue::Compute)?)?;
                    dev.all_reduce(&self.comm, &grads)?;
                }
                if let Some(tier) = self.host.as_mut().filter(|_| state.optim.is_none()) {
                    // The host optimizer takes this rank's part of the reduced whole gradient.
                    let part = grads.slice(state.shard.range().start, state.shard.len)?;
                    dev.wait(Queue::D2h, &dev.record(Queue::Comm)?)?;
                    dev.wait(Queue::D2h, &dev.record(Queue::Compute)?)?;
                    let done = tier.intake_grads(dev, unit, &part, 0, true)?;
                    dev.wait(Queue::Compute, &done)?;
                }
            }
        }
        if train && comm_work {
            // The optimizer reads what the communication queue reduced.
            dev.wait(Queue::Compute, &dev.record(Queue::Comm)?)?;
        }
        Ok(())
    }

    /// Reduces `unit`'s whole gradient of one micro-batch (`full`) into this rank's shard: added to
    /// the shard on the device, or sent to the host optimizer's tier through a reduce target.
    fn reduce_unit(
        &mut self,
        unit: usize,
        full: &Buf,
        micro: usize,
        last: bool,
    ) -> Result<(), EngineError> {
        let dev = Arc::clone(&self.dev);
        let dev = &*dev;
        let shard = self.states[unit].shard;
        if self.comm.world_size() == 1 && self.states[unit].grads.is_none() {
            // One rank: the gradient buffer is this rank's reduced shard; the host takes it
            // from there, and the buffer is reused after that (the caller's event on the
            // communication queue, which waits for the copy).
            dev.wait(Queue::D2h, &dev.record(Queue::Compute)?)?;
            let tier = self
                .host
                .as_mut()
                .ok_or_else(|| missing("host tier", unit))?;
            let done = tier.intake_grads(dev, unit, &full.slice(0, shard.len)?, micro, last)?;
            dev.wait(Queue::Comm, &done)?;
            return Ok(());
        }
        let scratch = self
            .bufs
            .reduce_scratch
            .as_ref()
            .ok_or_else(|| missing("reduce scratch", unit))?
            .slice(0, shard.len)?;
        dev.wait(Queue::Comm, &dev.record(Queue::Compute)?)?;
        if let Some(grads) = &self.states[unit].grads {
            return Ok(dev.reduce_scatter_add(&self.comm, full, grads, &scratch)?);
        }
        // Round-robin over the targets; each is reused once its copies to the host are done.
        let t = self.reduce_next % self.bufs.reduce_targets.len().max(1);
        self.reduce_next += 1;
        let target = self
            .bufs
            .reduce_targets
            .get(t)
            .ok_or_else(|| missing("reduce target", unit))?
            .slice(0, shard.len)?;
        if let Some(e) = self.reduce_released[t].take() {
            dev.wait(Queue::Comm, &e)?;
        }
        dev.memset(Queue::Comm, &target, 0)?;
        dev.reduce_scatter_add(&self.comm, full, &target, &scratch)?;
        dev.wait(Queue::D2h, &dev.record(Queue::Comm)?)?;
        let tier = self
            .host
            .as_mut()
            .ok_or_else(|| missing("host tier", unit))?;
        self.reduce_released[t] = Some(tier.intake_grads(dev, unit, &target, micro, last)?);
        Ok(())
    }

    /// A view of a transient pool: gathered parameters (X) or whole gradients (f32).
    fn pool_view(&self, params: bool, offset: usize, len: usize) -> Result<Buf, EngineError> {
        let pool = if params {
            &self.bufs.param_pool
        } else {
            &self.bufs.grad_pool
        };
        let pool = pool.as_ref().ok_or_else(|| missing("pool", 0))?;
        Ok(pool.slice(offset, len)?)
    }

    /// One stage call of the walk.
    fn call(
        &mut self,
        micro: usize,
        stage: usize,
        kind: UseKind,
        params: &[Buf],
        grads: &[Buf],
        head: &mut HeadMode<'_>,
    ) -> Result<(), EngineError> {
        let dev = &*self.dev;
        let tokens = self.bufs.tokens_of(micro, &self.sizes)?;
        let input = &self.bufs.acts[stage];
        match kind {
            UseKind::Forward => {
                let output = &self.bufs.acts[stage + 1];
                self.model
                    .forward(dev, stage, params, &tokens, input, output)?;
            }
            UseKind::Backward => {
                // Activation checkpointing: the stage's activations are recomputed from its
                // kept input right before its backward reads them (the model's contract).
                if let Some(out) = &self.bufs.recompute_out {
                    self.model
                        .forward(dev, stage, params, &tokens, input, out)?;
                }
                self.model
                    .backward(dev, stage, params, grads, &tokens, input, &self.bufs.dres)?;
            }
            UseKind::Head => {
                let bt = self.sizes.bt();
                let losses = self.bufs.losses.slice(micro * bt, bt)?;
                match head {
                    HeadMode::Train { dloss } => {
                        let g = HeadGrads {
                            grads,
                            dres: &self.bufs.dres,
                            dloss: *dloss,
                        };
                        self.model
                            .head(dev, params, &tokens, input, &losses, Some(g))?;
                    }
                    HeadMode::Eval => {
                        self.model
                            .head(dev, params, &tokens, input, &losses, None)?;
                    }
                    HeadMode::Logits(out) => {
                        let v = self.model.vocab_size();
                        let mut row0 = 0;
                        while row0 < bt {
                            let (chunk, n, vp) =
                                self.model.logits_chunk(dev, params, input, row0)?;
                            let values = dev.read_f32(&chunk)?;
                            for row in values.chunks_exact(vp).take(n) {
                                out.extend_from_slice(&row[..v]);
                            }
                            row0 += n;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
