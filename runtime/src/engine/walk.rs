//! The walk: a plan carried out on the device's queues. Before use i the host issues the
//! all-gathers the plan starts there (on the communication queue, each after the release events
//! of the copies that held its memory), makes compute wait for the gathers use i reads, zeroes
//! the gradient buffers that start there, calls the model, then records the release of what use
//! i was the last to read and sends finished gradients where their unit's record says: a
//! reduce-scatter into this rank's shard or to the host tier (sharded gradients), an all-reduce
//! and the host tier (whole gradients, after their last use). The host never waits inside a
//! walk; queues wait on events only.

use std::sync::Arc;

use super::memory::{Grads, Weights};
use super::schedule::{Lookahead, Plan, Transient, UseKind};
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

/// The events of one walk, per transient buffer of its plan.
struct WalkEvents {
    /// When each gathered copy is complete.
    gathered: Vec<Option<Event>>,
    /// When each gathered copy's last reader is done with it.
    released: Vec<Option<Event>>,
    /// When each full gradient buffer has been reduced (its memory is free again).
    reduced: Vec<Option<Event>>,
}

impl WalkEvents {
    fn new(plan: &Plan) -> WalkEvents {
        let none = |n: usize| (0..n).map(|_| None).collect();
        WalkEvents {
            gathered: none(plan.gathers.len()),
            released: none(plan.gathers.len()),
            reduced: none(plan.grad_buffers.len()),
        }
    }
}

fn missing(what: &str, unit: usize) -> EngineError {
    EngineError::Device(DeviceError::op(
        "walk",
        format!("unit {unit} has no {what} in this plan"),
    ))
}

/// The event `events[p]` of an earlier buffer `p` that this one waits for.
fn earlier(events: &[Option<Event>], p: usize, unit: usize) -> Result<&Event, EngineError> {
    events[p]
        .as_ref()
        .ok_or_else(|| missing("earlier buffer's release", unit))
}

impl Engine {
    /// The plan of a walk over `micro` micro-batches (made once, then reused).
    pub(super) fn plan(&mut self, micro: usize, train: bool) -> Result<Arc<Plan>, EngineError> {
        if let Some((_, plan)) = self.plans.iter().find(|(key, _)| *key == (micro, train)) {
            return Ok(Arc::clone(plan));
        }
        let input = self.laid.plan_input(micro, train);
        let sizes = &self.laid.sizes;
        let fits = |p: &Plan| {
            p.param_pool_len <= sizes.param_pool_len && p.grad_pool_len <= sizes.grad_pool_len
        };
        let mut plan = Plan::new(&input, self.laid.lookahead);
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
                    sizes.param_pool_len,
                    sizes.grad_pool_len
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
        if plan.comm_queue {
            dev.wait(Queue::Comm, &dev.record(Queue::Compute)?)?;
            dev.wait(Queue::Compute, &dev.record(Queue::Comm)?)?;
        }
        let mut events = WalkEvents::new(plan);
        let micro_count = plan.uses.last().map_or(1, |u| u.micro + 1);
        let mut next_gather = 0;
        for (i, u) in plan.uses.iter().enumerate() {
            while let Some(g) = plan.gathers.get(next_gather).filter(|g| g.start == i) {
                events.gathered[next_gather] = Some(self.gather(g, &events.released)?);
                next_gather += 1;
            }
            let (params, grads) = self.use_buffers(plan, i, train, &events)?;
            self.call(u.micro, u.stage, u.kind, &params, &grads, &mut head)?;
            for &g in &plan.gathers_ending[i] {
                events.released[g] = Some(dev.record(Queue::Compute)?);
            }
            for &b in &plan.grads_ending[i] {
                let buffer = &plan.grad_buffers[b];
                let full = self.pool_view(false, buffer.offset, buffer.len)?;
                self.reduce_unit(buffer.unit, &full, u.micro, u.micro + 1 == micro_count)?;
                events.reduced[b] = Some(dev.record(Queue::Comm)?);
            }
            for &unit in &plan.whole_grads_done[i] {
                self.whole_grads_done(unit)?;
            }
        }
        if train && plan.comm_queue {
            // The optimizer reads what the communication queue reduced.
            dev.wait(Queue::Compute, &dev.record(Queue::Comm)?)?;
        }
        Ok(())
    }

    /// Issues gather `g` into its region of the parameter pool, after the release of the copies
    /// that held that memory: an all-gather of the device shards, or this rank's shard fetched
    /// from the host tier into its slot and all-gathered in place. Returns when it is complete.
    fn gather(&mut self, g: &Transient, released: &[Option<Event>]) -> Result<Event, EngineError> {
        let dev = Arc::clone(&self.dev);
        let dev = &*dev;
        for &p in &g.after {
            dev.wait(Queue::Comm, earlier(released, p, g.unit)?)?;
        }
        let region = self.pool_view(true, g.offset, g.len)?;
        let state = &self.states[g.unit];
        match &state.weights {
            Weights::Sharded(send) => {
                // A shard the host optimizer updated arrives through the H2D queue.
                if let Some(tier) = &self.host {
                    for e in tier.written(g.unit) {
                        dev.wait(Queue::Comm, e)?;
                    }
                }
                dev.all_gather(&self.comm, send, &region)?;
            }
            Weights::Offloaded { all_gather } => {
                // This rank's shard comes from the host or NVMe into its slot of the region,
                // which the earlier occupants must have released.
                for &p in &g.after {
                    dev.wait(Queue::H2d, earlier(released, p, g.unit)?)?;
                }
                let slot = region.slice(state.shard.range().start, state.shard.len)?;
                let tier = self
                    .host
                    .as_mut()
                    .ok_or_else(|| missing("host tier", g.unit))?;
                tier.fetch_params(dev, g.unit, &slot)?;
                if !all_gather {
                    // One rank: the shard is the whole unit, fetched is gathered.
                    return Ok(dev.record(Queue::H2d)?);
                }
                dev.wait(Queue::Comm, &dev.record(Queue::H2d)?)?;
                let scratch = self
                    .bufs
                    .reduce_scratch
                    .as_ref()
                    .ok_or_else(|| missing("gather scratch", g.unit))?;
                dev.all_gather_in_place(&self.comm, &region, scratch)?;
            }
            Weights::Whole(_) | Weights::Replicated { .. } => {
                return Err(missing("sharded parameters", g.unit))
            }
        }
        Ok(dev.record(Queue::Comm)?)
    }

    /// The parameters and (backward uses of a training walk) gradient buffers of use `i`, each
    /// unit's compute queue waiting for its gather, each gradient buffer zeroed where it starts.
    fn use_buffers(
        &self,
        plan: &Plan,
        i: usize,
        train: bool,
        events: &WalkEvents,
    ) -> Result<(Vec<Buf>, Vec<Buf>), EngineError> {
        let dev = &*self.dev;
        let u = plan.uses[i];
        let units = &self.laid.stage_units[u.stage];
        let mut params = Vec::with_capacity(units.len());
        let mut grads = Vec::with_capacity(units.len());
        for (k, &unit) in units.iter().enumerate() {
            params.push(match plan.use_gathers[i][k] {
                Some(g) => {
                    if plan.gathers[g].first == i {
                        let event = events.gathered[g]
                            .as_ref()
                            .ok_or_else(|| missing("gather", unit))?;
                        dev.wait(Queue::Compute, event)?;
                    }
                    self.pool_view(true, plan.gathers[g].offset, plan.gathers[g].len)?
                }
                None => self.states[unit]
                    .weights
                    .whole()
                    .cloned()
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
                            dev.wait(Queue::Compute, earlier(&events.reduced, p, unit)?)?;
                        }
                        dev.memset(Queue::Compute, &view, 0)?;
                    }
                    view
                }
                None => self.states[unit]
                    .grads
                    .on_device()
                    .cloned()
                    .ok_or_else(|| missing("gradients", unit))?,
            });
        }
        Ok((params, grads))
    }

    /// `unit`'s whole gradients are complete (after their last backward use of the step): they
    /// are all-reduced with several ranks, and this rank's part goes to the host optimizer when
    /// it is off the device.
    fn whole_grads_done(&mut self, unit: usize) -> Result<(), EngineError> {
        let dev = Arc::clone(&self.dev);
        let dev = &*dev;
        let state = &self.states[unit];
        let Grads::Whole {
            buf,
            all_reduce,
            to_host,
        } = &state.grads
        else {
            return Err(missing("whole gradients", unit));
        };
        if *all_reduce {
            dev.wait(Queue::Comm, &dev.record(Queue::Compute)?)?;
            dev.all_reduce(&self.comm, buf)?;
        }
        if *to_host {
            // The host optimizer takes this rank's part of the reduced whole gradient.
            let part = buf.slice(state.shard.range().start, state.shard.len)?;
            dev.wait(Queue::D2h, &dev.record(Queue::Comm)?)?;
            dev.wait(Queue::D2h, &dev.record(Queue::Compute)?)?;
            let tier = self
                .host
                .as_mut()
                .ok_or_else(|| missing("host tier", unit))?;
            let done = tier.intake_grads(dev, unit, &part, 0, true)?;
            dev.wait(Queue::Compute, &done)?;
        }
        Ok(())
    }

    /// Reduces `unit`'s whole gradient of one micro-batch (`full`) into this rank's shard: added to
    /// the shard on the device, or sent to the host tier (through a reduce target with several
    /// ranks).
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
        let scratch = || -> Result<Buf, EngineError> {
            let scratch = self.bufs.reduce_scratch.as_ref();
            Ok(scratch
                .ok_or_else(|| missing("reduce scratch", unit))?
                .slice(0, shard.len)?)
        };
        match &self.states[unit].grads {
            Grads::Shard(grads) => {
                let scratch = scratch()?;
                dev.wait(Queue::Comm, &dev.record(Queue::Compute)?)?;
                dev.reduce_scatter_add(&self.comm, full, grads, &scratch)?;
            }
            Grads::ToHost { via_target: false } => {
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
            }
            Grads::ToHost { via_target: true } => {
                let scratch = scratch()?;
                dev.wait(Queue::Comm, &dev.record(Queue::Compute)?)?;
                // Round-robin over the targets; each is reused once its copies to the host are
                // done.
                let targets = self
                    .bufs
                    .reduce_targets
                    .as_mut()
                    .ok_or_else(|| missing("reduce target", unit))?;
                let t = targets.acquire(dev, Queue::Comm)?;
                let target = targets.slot(t).slice(0, shard.len)?;
                dev.memset(Queue::Comm, &target, 0)?;
                dev.reduce_scatter_add(&self.comm, full, &target, &scratch)?;
                dev.wait(Queue::D2h, &dev.record(Queue::Comm)?)?;
                let tier = self
                    .host
                    .as_mut()
                    .ok_or_else(|| missing("host tier", unit))?;
                targets.release(t, tier.intake_grads(dev, unit, &target, micro, last)?);
            }
            Grads::Whole { .. } => return Err(missing("sharded gradients", unit)),
        }
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
        let tokens = self.bufs.tokens_of(micro, &self.laid.sizes)?;
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
                let bt = self.laid.sizes.bt();
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
