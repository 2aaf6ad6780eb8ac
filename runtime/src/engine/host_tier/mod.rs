//! The host tier: every state that lives off the device, per sub-group of this rank's shards —
//! parameter shards on the host or NVMe, the host optimizer's fp32 master weights and Adam
//! moments on the host or NVMe (the gradients it takes are always in host memory) — with the engine's one host pool (allocated once,
//! page-locked on request, registered with the device) and its swap stores.
//!
//! All work is enqueued on the device's queues: NVMe reads and writes on `Queue::Io`, the host
//! optimizer and gradient intake on `Queue::Host`, copies on H2D / D2H. Staging buffers are rings;
//! a slot is reused only after the event that released it (recorded by the queue that consumed
//! it). The host thread never waits, except for the gradient norm (a host decision).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use strata_offload::{HostPool, OnExhausted, PoolConfig, SwapStore};

use super::host_mem::HostMem;
use super::memory::AdamSegment;
use super::placement::{PlacementPlan, SubGroup, Tier, NORM_CHUNK};
use super::zero::{clip_segments, Shard};
use super::EngineError;
use crate::backend::{AdamWHyper, Buf, DType, Device, DeviceError, Event, Queue};
use crate::config::{Config, MomentsDtype};

/// A ring of staging buffers: slot k is reused after `released[k]`.
struct Ring {
    bufs: Vec<HostMem>,
    released: Vec<Option<Event>>,
    next: usize,
}

impl Ring {
    fn new(pool: &HostPool, count: usize, bytes: usize) -> Result<Ring, EngineError> {
        let bufs = (0..count)
            .map(|_| pool.alloc(bytes.max(1)).map(HostMem::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(offload_error)?;
        Ok(Ring {
            released: (0..count).map(|_| None).collect(),
            bufs,
            next: 0,
        })
    }

    /// The next slot; `queue` waits for its previous consumer first.
    fn acquire(&mut self, dev: &dyn Device, queue: Queue) -> Result<usize, EngineError> {
        let k = self.next;
        self.next = (k + 1) % self.bufs.len();
        if let Some(e) = self.released[k].take() {
            dev.wait(queue, &e)?;
        }
        Ok(k)
    }
}

/// The host optimizer's states of one sub-group in host memory (its gradient is always there).
struct HostStates {
    master: HostMem,
    m: HostMem,
    v: HostMem,
}

/// A step whose AdamW may start during backward (no clipping and no fp16 loss scale, so each
/// sub-group's update needs only its own gradient): everything the update of a sub-group needs,
/// given before the step's backward.
pub struct EarlyStep {
    /// The step's hyperparameters without and with weight decay.
    pub hyper: [AdamWHyper; 2],
    pub shards: Vec<Shard>,
    pub segments: Vec<Vec<AdamSegment>>,
    /// Per unit: the device shard its updated compute weights go to, if any.
    pub device_params: Vec<Option<Buf>>,
}

/// Where a sub-group's compute weights live off the device.
enum ParamHome {
    /// Host memory (fp32 compute weights share the master weights' buffer).
    Host(HostMem),
    Nvme,
}

fn offload_error(e: strata_offload::OffloadError) -> EngineError {
    EngineError::Device(DeviceError::op("offload", with_causes(&e)))
}

/// An error's message followed by its causes' (the OS error last).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// Bytes moved by the host tier since it opened, and the time its NVMe transfers took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OffloadTraffic {
    pub nvme_read_bytes: u64,
    /// Seconds from submitting a read to its completion, summed over reads.
    pub nvme_read_s: f64,
    pub nvme_write_bytes: u64,
    pub nvme_write_s: f64,
    /// Host to device (parameter shards, updated compute weights).
    pub h2d_bytes: u64,
    /// Device to host (reduced gradient shards).
    pub d2h_bytes: u64,
}

#[derive(Default)]
struct Counters {
    nvme_read_bytes: AtomicU64,
    nvme_read_ns: AtomicU64,
    nvme_write_bytes: AtomicU64,
    nvme_write_ns: AtomicU64,
    h2d_bytes: AtomicU64,
    d2h_bytes: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> OffloadTraffic {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        OffloadTraffic {
            nvme_read_bytes: get(&self.nvme_read_bytes),
            nvme_read_s: get(&self.nvme_read_ns) as f64 * 1e-9,
            nvme_write_bytes: get(&self.nvme_write_bytes),
            nvme_write_s: get(&self.nvme_write_ns) as f64 * 1e-9,
            h2d_bytes: get(&self.h2d_bytes),
            d2h_bytes: get(&self.d2h_bytes),
        }
    }
}

/// The direction of an NVMe transfer.
#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

/// Host-side data a job needs, shared with the queues' threads.
struct Shared {
    param_store: Option<SwapStore>,
    optim_store: Option<SwapStore>,
    /// Per unit: the partial sums of squares of its accumulated gradient shard.
    norm_partials: Mutex<Vec<Vec<f64>>>,
    io_timeout: Duration,
    counters: Counters,
}

impl Shared {
    fn store(&self, params: bool) -> Result<&SwapStore, DeviceError> {
        let store = if params {
            &self.param_store
        } else {
            &self.optim_store
        };
        store
            .as_ref()
            .ok_or_else(|| DeviceError::op("offload", "no swap store for this class"))
    }

    /// Writes the first `bytes` of `mem` to `key` and waits for it.
    fn write(
        &self,
        params: bool,
        key: &str,
        mem: &HostMem,
        bytes: usize,
    ) -> Result<(), DeviceError> {
        self.write_all(params, &[(key.to_string(), mem, bytes)])
    }

    /// Reads `key` into `mem` and waits for it.
    fn read(&self, params: bool, key: &str, mem: &HostMem) -> Result<(), DeviceError> {
        self.read_all(params, &[(key.to_string(), mem)])
    }

    /// Writes each `(key, mem, bytes)`: all submitted at once (they run side by side on the
    /// drive), then all waited for.
    fn write_all(
        &self,
        params: bool,
        items: &[(String, &HostMem, usize)],
    ) -> Result<(), DeviceError> {
        self.transfer(params, Dir::Write, items)
    }

    /// Reads each `(key, mem)`: all submitted at once, then all waited for.
    fn read_all(&self, params: bool, items: &[(String, &HostMem)]) -> Result<(), DeviceError> {
        let items: Vec<(String, &HostMem, usize)> =
            items.iter().map(|(k, m)| (k.clone(), *m, 0)).collect();
        self.transfer(params, Dir::Read, &items)
    }

    /// Submits every transfer of `items` (a write sends the first `bytes` of its buffer), then
    /// waits for each: every submitted buffer comes back to its `HostMem`, whatever failed.
    fn transfer(
        &self,
        params: bool,
        dir: Dir,
        items: &[(String, &HostMem, usize)],
    ) -> Result<(), DeviceError> {
        let store = self.store(params)?;
        let what = match dir {
            Dir::Read => "offload read",
            Dir::Write => "offload write",
        };
        let started = Instant::now();
        let mut failed = None;
        let mut pending = Vec::with_capacity(items.len());
        for (key, mem, bytes) in items {
            let mut buf = match mem.take() {
                Ok(buf) => buf,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            let submitted = match dir {
                Dir::Read => store.read(key, buf),
                Dir::Write => match buf.set_len(*bytes) {
                    Ok(()) => store.write(key, buf),
                    Err(e) => {
                        mem.put(buf);
                        failed = Some(DeviceError::op(what, format!("{key}: {e}")));
                        break;
                    }
                },
            };
            match submitted {
                Ok(handle) => pending.push((key, *mem, handle)),
                Err(e) => {
                    failed = Some(DeviceError::op(what, format!("{key}: {}", with_causes(&e))));
                    break;
                }
            }
        }
        let mut bytes = 0u64;
        for (key, mem, mut handle) in pending {
            match handle.wait(self.io_timeout) {
                Ok(buf) => {
                    bytes += buf.len() as u64;
                    mem.put(buf);
                }
                Err(e) => {
                    failed.get_or_insert(DeviceError::op(
                        what,
                        format!("{key}: {}", with_causes(&e)),
                    ));
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let c = &self.counters;
        let (count, ns) = match dir {
            Dir::Read => (&c.nvme_read_bytes, &c.nvme_read_ns),
            Dir::Write => (&c.nvme_write_bytes, &c.nvme_write_ns),
        };
        Counters::add(count, bytes);
        Counters::add(ns, started.elapsed().as_nanos() as u64);
        Ok(())
    }

    fn lock_partials(&self) -> std::sync::MutexGuard<'_, Vec<Vec<f64>>> {
        self.norm_partials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn key(g: &SubGroup, what: &str) -> String {
    format!("u{}.{}.{what}", g.unit, g.start)
}

/// Everything off the device.
pub struct HostTier {
    plan_tiers: super::placement::Tiers,
    x: DType,
    moments: MomentsDtype,
    groups: Vec<SubGroup>,
    /// Per unit: its sub-groups.
    unit_groups: Vec<Range<usize>>,
    /// Per sub-group whose states stay in host memory (all with the optimizer on the host,
    /// `host_fraction` of them on NVMe).
    states: Vec<Option<HostStates>>,
    /// Per sub-group, with the optimizer off the device: its gradient, summed over micro-batches
    /// in host memory whatever the tier of its states (DeepSpeed's layout: NVMe holds master
    /// weights and moments, so accumulation never reads the disk).
    grads: Vec<HostMem>,
    /// Per sub-group: when the optimizer has read its gradient (the next intake overwrites it).
    grad_free: Vec<Option<Event>>,
    /// This step's early AdamW, and per sub-group whether it already ran.
    early: Option<EarlyStep>,
    stepped: Vec<bool>,
    /// Per sub-group, with the parameters off the device.
    params: Vec<Option<ParamHome>>,
    /// NVMe optimizer: sub-groups in flight (master, m, v each); the sub-group at
    /// position j of `order` uses set j mod their number.
    opt_sets: Vec<HostStates>,
    /// The order the optimizer steps the sub-groups: those of units whose compute weights stay
    /// whole on the device first (the step waits for their gathers), then the others in the
    /// forward's order, which the next step's forward follows as they are written.
    order: Vec<usize>,
    /// Per sub-group: its position in `order`.
    position: Vec<usize>,
    /// With the optimizer off the device: reduced gradients on their way to it.
    intake: Option<Ring>,
    /// Updated compute weights on their way to the device or NVMe.
    out: Option<Ring>,
    /// Parameter shards on their way from NVMe to the device.
    fetch: Option<Ring>,
    /// Per sub-group: when its updated compute weights are in place (device, host or NVMe).
    pub param_written: Vec<Option<Event>>,
    shared: Arc<Shared>,
    /// The swap files, removed if a signal ends the process (they are removed on close too).
    _on_signal: Vec<crate::outputs::cleanup::Registration>,
    // Dropped last: every buffer above returns to it.
    _pool: HostPool,
}

impl HostTier {
    /// The pool, stores and buffers of `plan` (nothing is allocated later).
    /// `gathered[u]`: whether unit u's parameters are sharded (gathered before each use); only
    /// those have parameter shards off the device.
    pub fn new(
        config: &Config,
        plan: &PlacementPlan,
        shards: &[Shard],
        gathered: &[bool],
        x: DType,
        dev: &dyn Device,
        rank: usize,
    ) -> Result<HostTier, EngineError> {
        let pinned = plan.host_pinned;
        let sg_max = plan.sub_groups.iter().map(|g| g.len).max().unwrap_or(0);
        let slab =
            (super::placement::HOST_SLAB_BYTES as usize).max((4 * sg_max).next_multiple_of(4096));
        let pool = HostPool::new(PoolConfig {
            bytes_total: usize::try_from(plan.host_bytes)
                .unwrap_or(usize::MAX)
                .max(4096),
            slab_bytes_max: slab,
            mlock: pinned,
            on_exhausted: OnExhausted::Error,
            check_budget: true,
        })
        .map_err(|e| EngineError::Setting {
            key: if pinned {
                "offload_optimizer.pin_memory"
            } else {
                "offload_optimizer.device"
            },
            message: e.to_string(),
        })?;
        if let (true, Some(registrar)) = (pinned, dev.host_registrar()) {
            pool.add_registrar(registrar).map_err(offload_error)?;
        }
        let timeout = Duration::from_secs(config.dist.timeout_s.saturating_add(60));
        let store = |params: bool| -> Result<Option<SwapStore>, EngineError> {
            let (tier, paths, key) = if params {
                (
                    plan.tiers.params,
                    &config.offload_param.nvme_path,
                    "offload_param.nvme_path",
                )
            } else {
                (
                    plan.tiers.optimizer,
                    &config.offload_optimizer.nvme_path,
                    "offload_optimizer.nvme_path",
                )
            };
            if tier != Tier::Nvme {
                return Ok(None);
            }
            let paths = paths.as_ref().map(|p| p.paths()).unwrap_or_default();
            let mut aio = config.aio.to_aio(timeout);
            aio.file_name = format!(
                "strata-{}.rank{rank}.swap",
                if params { "params" } else { "optim" }
            );
            SwapStore::open_with_pool(&paths, aio, &pool)
                .map(Some)
                .map_err(|e| EngineError::Setting {
                    key,
                    message: with_causes(&e),
                })
        };
        let shared = Arc::new(Shared {
            param_store: store(true)?,
            optim_store: store(false)?,
            norm_partials: Mutex::new(vec![Vec::new(); shards.len()]),
            io_timeout: timeout,
            counters: Counters::default(),
        });
        crate::outputs::cleanup::install();
        let on_signal = [&shared.param_store, &shared.optim_store]
            .into_iter()
            .flatten()
            .flat_map(SwapStore::file_paths)
            .map(|p| crate::outputs::cleanup::register(&p))
            .collect();
        let groups = plan.sub_groups.clone();
        let mut unit_groups = vec![0..0; shards.len()];
        for (k, g) in groups.iter().enumerate() {
            let r = &mut unit_groups[g.unit];
            if r.start == r.end {
                *r = k..k + 1;
            } else {
                r.end = k + 1;
            }
        }
        let moments = config.offload_optimizer.moments_dtype;
        let mbytes = match moments {
            MomentsDtype::Fp32 => 4,
            MomentsDtype::Bf16 => 2,
        };
        let alloc = |bytes: usize| {
            pool.alloc(bytes.max(1))
                .map(HostMem::new)
                .map_err(offload_error)
        };
        let host_states = |len: usize| -> Result<HostStates, EngineError> {
            Ok(HostStates {
                master: alloc(4 * len)?,
                m: alloc(mbytes * len)?,
                v: alloc(mbytes * len)?,
            })
        };
        let tiers = plan.tiers;
        let optimizer_off = tiers.optimizer != Tier::Device;
        let states = groups
            .iter()
            .zip(&plan.optimizer_on_host)
            .map(|(g, &on_host)| on_host.then(|| host_states(g.len)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        // The largest sub-group whose states live on NVMe (the optimizer's read buffers).
        let nvme_max = (tiers.optimizer == Tier::Nvme)
            .then(|| {
                groups
                    .iter()
                    .zip(&states)
                    .filter(|(_, st)| st.is_none())
                    .map(|(g, _)| g.len)
                    .max()
            })
            .flatten();
        let params = groups
            .iter()
            .zip(&states)
            .map(|(g, s)| -> Result<Option<ParamHome>, EngineError> {
                Ok(match tiers.params {
                    _ if !gathered[g.unit] => None,
                    Tier::Device => None,
                    Tier::Nvme => Some(ParamHome::Nvme),
                    Tier::Host => Some(ParamHome::Host(match s {
                        Some(s) if x == DType::F32 => s.master.clone(),
                        _ => alloc(x.size_bytes() * g.len)?,
                    })),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let grads = if optimizer_off {
            groups
                .iter()
                .map(|g| alloc(4 * g.len))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let obuf = config.offload_optimizer.buffer_count;
        let opt_sets = match nvme_max {
            Some(len) => (0..obuf)
                .map(|_| host_states(len))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let x_bytes = x.size_bytes() * sg_max;
        // Staging for updated compute weights that do not live in host memory (on NVMe, or on
        // the device: every unit at stage < 3, persistent units at stage 3).
        let staged = optimizer_off
            && params
                .iter()
                .any(|p| !matches!(p, Some(ParamHome::Host(_))));
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|&k| gathered[groups[k].unit]);
        // Per sub-group on NVMe: its place among the NVMe sub-groups of the order (its set).
        let mut position = vec![0; groups.len()];
        for (j, &k) in order.iter().filter(|&&k| states[k].is_none()).enumerate() {
            position[k] = j;
        }
        Ok(HostTier {
            order,
            position,
            plan_tiers: tiers,
            x,
            moments,
            unit_groups,
            states,
            grad_free: (0..groups.len()).map(|_| None).collect(),
            early: None,
            stepped: vec![false; groups.len()],
            grads,
            params,
            opt_sets,
            intake: optimizer_off
                .then(|| Ring::new(&pool, obuf, 4 * sg_max))
                .transpose()?,
            out: staged
                .then(|| Ring::new(&pool, obuf, x_bytes))
                .transpose()?,
            fetch: (tiers.params == Tier::Nvme)
                .then(|| Ring::new(&pool, config.offload_param.buffer_count, x_bytes))
                .transpose()?,
            param_written: (0..groups.len()).map(|_| None).collect(),
            groups,
            shared,
            _on_signal: on_signal,
            _pool: pool,
        })
    }

    pub fn tiers(&self) -> super::placement::Tiers {
        self.plan_tiers
    }

    /// Bytes moved so far (NVMe read/write with their time, host to device, device to host).
    pub fn traffic(&self) -> OffloadTraffic {
        self.shared.counters.snapshot()
    }

    fn count_h2d(&self, bytes: usize) {
        Counters::add(&self.shared.counters.h2d_bytes, bytes as u64);
    }

    /// The events after which `unit`'s updated compute weights are in place.
    pub fn written(&self, unit: usize) -> impl Iterator<Item = &Event> {
        self.unit_groups[unit]
            .clone()
            .filter_map(|k| self.param_written[k].as_ref())
    }

    /// The sub-groups of `unit`.
    fn of(&self, unit: usize) -> Vec<(usize, SubGroup)> {
        self.unit_groups[unit]
            .clone()
            .map(|k| (k, self.groups[k]))
            .collect()
    }

    // --- parameters -----------------------------------------------------------------------------

    /// Copies this rank's shard of `unit` from its tier into `slot` (its place in a gathered
    /// buffer, X) on the H2D queue, through the fetch ring from NVMe. The H2D queue must already
    /// wait for whatever held `slot` before.
    pub fn fetch_params(
        &mut self,
        dev: &dyn Device,
        unit: usize,
        slot: &Buf,
    ) -> Result<(), EngineError> {
        let xb = self.x.size_bytes();
        for (k, g) in self.of(unit) {
            let piece = slot.slice(g.start, g.len)?;
            if let Some(e) = &self.param_written[k] {
                dev.wait(Queue::Fetch, e)?;
                dev.wait(Queue::H2d, e)?;
            }
            match &self.params[k] {
                Some(ParamHome::Host(mem)) => {
                    // SAFETY: the H2D queue waited for the last write of this buffer (the
                    // optimizer's, `param_written`); the next write waits for this copy (the
                    // optimizer's step waits on the H2D queue before it starts).
                    unsafe { dev.copy_h2d(Queue::H2d, &piece, &mem.bytes()[..g.len * xb])? };
                    self.count_h2d(g.len * xb);
                }
                Some(ParamHome::Nvme) => {
                    let fetch = self.fetch.as_mut().ok_or_else(|| missing("fetch ring"))?;
                    let s = fetch.acquire(dev, Queue::Fetch)?;
                    let (mem, shared, name) = (
                        fetch.bufs[s].clone(),
                        Arc::clone(&self.shared),
                        key(&g, "param"),
                    );
                    dev.submit_host(
                        Queue::Fetch,
                        "nvme read params",
                        Box::new(move || shared.read(true, &name, &mem)),
                    )?;
                    dev.wait(Queue::H2d, &dev.record(Queue::Fetch)?)?;
                    let mem = &fetch.bufs[s];
                    // SAFETY: the H2D queue waited for the read into this slot; the slot is
                    // reused only after the event recorded just below.
                    unsafe { dev.copy_h2d(Queue::H2d, &piece, &mem.bytes()[..g.len * xb])? };
                    fetch.released[s] = Some(dev.record(Queue::H2d)?);
                    self.count_h2d(g.len * xb);
                }
                None => return Err(missing("parameters off the device")),
            }
        }
        Ok(())
    }

    // --- gradients ------------------------------------------------------------------------------

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
            self.shared.lock_partials()[unit].clear();
        }
        for (k, g) in self.of(unit) {
            let grad = self
                .grads
                .get(k)
                .ok_or_else(|| missing("gradient buffers"))?
                .clone();
            let src = reduced.slice(g.start, g.len)?;
            Counters::add(&self.shared.counters.d2h_bytes, 4 * g.len as u64);
            let shared = Arc::clone(&self.shared);
            // The first micro-batch lands in the gradient buffer itself; the others in a ring
            // slot, summed into it on the host queue.
            let slot = if micro == 0 {
                if let Some(e) = &self.grad_free[k] {
                    dev.wait(Queue::D2h, e)?;
                }
                // SAFETY: the D2H queue waited for the last reader of `grad` (the optimizer's
                // step, `grad_free`); its next readers wait for the event recorded after this.
                unsafe { dev.copy_d2h(Queue::D2h, &mut grad.bytes_mut()[..4 * g.len], &src)? };
                None
            } else {
                let intake = self
                    .intake
                    .as_mut()
                    .ok_or_else(|| missing("gradient intake"))?;
                let s = intake.acquire(dev, Queue::D2h)?;
                let slot = intake.bufs[s].clone();
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
            let job: crate::backend::HostJob = Box::new(move || {
                // SAFETY: ordered after the D2H copy (waited below) and before the slot's reuse
                // (its release event follows this job); the optimizer reads `grad` later on the
                // same queue.
                let dst = unsafe { grad.f32s_mut(g.len) };
                if let Some(slot) = &summed {
                    // SAFETY: as above.
                    add_into(dst, unsafe { slot.f32s(g.len) });
                }
                if last {
                    shared.lock_partials()[unit].extend(chunk_sums(dst));
                }
                Ok(())
            });
            dev.wait(Queue::Host, &copied)?;
            dev.submit_host(Queue::Host, "gradient intake", job)?;
            if let (Some((s, _)), Some(intake)) = (slot, self.intake.as_mut()) {
                intake.released[s] = Some(dev.record(Queue::Host)?);
            }
            // Its gradient complete, a resident sub-group is stepped now, during backward.
            if last && self.states[k].is_some() {
                if let Some(early) = &self.early {
                    let hypers = self.hypers(k, &early.shards, &early.segments, &|d| {
                        early.hyper[usize::from(d)]
                    });
                    let device_params = early.device_params[unit].clone();
                    self.adamw(dev, k, hypers, device_params, true)?;
                    self.stepped[k] = true;
                }
            }
        }
        Ok(dev.record(Queue::D2h)?)
    }

    /// The squared gradient norm of this rank's shards (after every intake finished), summed in
    /// the device's order: per unit in f64 over chunks, as f32 across units.
    pub fn grad_norm_squared(&self, dev: &dyn Device) -> Result<f32, EngineError> {
        dev.synchronize(Queue::Host)?;
        dev.synchronize(Queue::Io)?;
        let partials = self.shared.lock_partials();
        Ok(partials
            .iter()
            .map(|p| p.iter().sum::<f64>() as f32)
            .fold(0.0f32, |acc, s| acc + s))
    }

    // --- the optimizer ----------------------------------------------------------------------------

    /// Enqueues the host optimizer over every sub-group in order (the next forward's order):
    /// NVMe reads one set ahead, AdamW on the host queue, write-back and the updated compute
    /// weights to their tier. `hyper(decay)` gives the step's hyperparameters; `segments` the
    /// units' decay segments; `device_params(unit)` the device shard to refresh, if any.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        dev: &dyn Device,
        shards: &[Shard],
        segments: &[Vec<AdamSegment>],
        hyper: &dyn Fn(bool) -> AdamWHyper,
        device_params: &dyn Fn(usize) -> Option<Buf>,
    ) -> Result<(), EngineError> {
        let sets = self.opt_sets.len();
        let order = self.order.clone();
        // The sub-groups on NVMe, in the order; read[i]: the reads of the i-th of them, issued
        // `sets` ahead of its step (the resident sub-groups' steps run meanwhile).
        let on_nvme: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&k| self.states[k].is_none())
            .collect();
        let mut read: Vec<Option<Event>> = (0..on_nvme.len()).map(|_| None).collect();
        for (i, done) in read.iter_mut().enumerate().take(sets) {
            *done = Some(self.read_set(dev, on_nvme[i])?);
        }
        for &k in &order {
            if std::mem::take(&mut self.stepped[k]) {
                continue;
            }
            let g = self.groups[k];
            let hypers = self.hypers(k, shards, segments, hyper);
            let nvme = self.states[k].is_none().then(|| self.position[k]);
            if let Some(e) = nvme.and_then(|i| read[i].take()) {
                dev.wait(Queue::Host, &e)?;
            }
            self.adamw(dev, k, hypers, device_params(g.unit), false)?;
            if let Some(i) = nvme {
                self.write_set(dev, k)?;
                if let Some(&next) = on_nvme.get(i + sets) {
                    read[i + sets] = Some(self.read_set(dev, next)?);
                }
            }
        }
        self.early = None;
        Ok(())
    }

    /// Lets this step's AdamW start during backward: each resident sub-group is stepped as its
    /// last gradient arrives (`intake_grads`), the others in [`HostTier::step`], which ends it.
    pub fn begin_early_step(&mut self, early: EarlyStep) {
        self.stepped.iter_mut().for_each(|s| *s = false);
        self.early = Some(early);
    }

    /// The AdamW segments of sub-group `k` with their hyperparameters.
    fn hypers(
        &self,
        k: usize,
        shards: &[Shard],
        segments: &[Vec<AdamSegment>],
        hyper: &dyn Fn(bool) -> AdamWHyper,
    ) -> Vec<(AdamSegment, AdamWHyper)> {
        let g = self.groups[k];
        let abs = shards[g.unit].range().start + g.start;
        clip_segments(&segments[g.unit], &(abs..abs + g.len))
            .into_iter()
            .map(|s| (s, hyper(s.decay)))
            .collect()
    }

    fn set_of(&self, k: usize) -> Result<&HostStates, EngineError> {
        match &self.states[k] {
            Some(s) => Ok(s),
            None => self
                .opt_sets
                .get(self.position[k] % self.opt_sets.len().max(1))
                .ok_or_else(|| missing("optimizer buffers")),
        }
    }

    /// Enqueues the NVMe reads of sub-group `k`'s states; returns the event after them.
    fn read_set(&self, dev: &dyn Device, k: usize) -> Result<Event, EngineError> {
        let g = self.groups[k];
        let set = self.set_of(k)?;
        let mb = self.moment_bytes();
        let bufs = [
            (set.master.clone(), "master", 4),
            (set.m.clone(), "m", mb),
            (set.v.clone(), "v", mb),
        ];
        let shared = Arc::clone(&self.shared);
        dev.submit_host(
            Queue::Io,
            "nvme read optimizer",
            Box::new(move || {
                let items: Vec<(String, &HostMem)> = bufs
                    .iter()
                    .map(|(mem, what, _)| (key(&g, what), mem))
                    .collect();
                shared.read_all(false, &items)
            }),
        )?;
        Ok(dev.record(Queue::Io)?)
    }

    fn write_set(&self, dev: &dyn Device, k: usize) -> Result<(), EngineError> {
        let g = self.groups[k];
        let set = self.set_of(k)?;
        let mb = self.moment_bytes();
        let bufs = [
            (set.master.clone(), "master", 4),
            (set.m.clone(), "m", mb),
            (set.v.clone(), "v", mb),
        ];
        let shared = Arc::clone(&self.shared);
        dev.wait(Queue::Io, &dev.record(Queue::Host)?)?;
        dev.submit_host(
            Queue::Io,
            "nvme write optimizer",
            Box::new(move || {
                let items: Vec<(String, &HostMem, usize)> = bufs
                    .iter()
                    .map(|(mem, what, bytes)| (key(&g, what), mem, bytes * g.len))
                    .collect();
                shared.write_all(false, &items)
            }),
        )?;
        Ok(())
    }

    fn moment_bytes(&self) -> usize {
        match self.moments {
            MomentsDtype::Fp32 => 4,
            MomentsDtype::Bf16 => 2,
        }
    }

    /// AdamW on sub-group `k` on the host queue, then its compute weights to their tier.
    fn adamw(
        &mut self,
        dev: &dyn Device,
        k: usize,
        hypers: Vec<(AdamSegment, AdamWHyper)>,
        device_params: Option<Buf>,
        early: bool,
    ) -> Result<(), EngineError> {
        let g = self.groups[k];
        // Early (before the global norm is known): a unit whose gradient is not finite is left
        // as it is, so the step's non-finite norm stops the run before anything is updated
        // with it.
        let guard = early.then(|| (Arc::clone(&self.shared), g.unit));
        let set = self.set_of(k)?;
        let (master, m, v) = (set.master.clone(), set.m.clone(), set.v.clone());
        let grad = self
            .grads
            .get(k)
            .ok_or_else(|| missing("gradient buffers"))?
            .clone();
        // The compute weights' destination: host memory in place, or a staging slot.
        let (x, moments) = (self.x, self.moments);
        let (target, slot) = match (&self.params[k], self.out.as_mut()) {
            (Some(ParamHome::Host(mem)), _) => (mem.clone(), None),
            (_, Some(out)) => {
                let s = out.acquire(dev, Queue::Host)?;
                (out.bufs[s].clone(), Some(s))
            }
            (_, None) => return Err(missing("staging for updated parameters")),
        };
        if let Some(e) = &self.param_written[k] {
            // The previous fetch of these weights (host tier) read them before this rewrite.
            dev.wait(Queue::Host, e)?;
        }
        dev.wait(Queue::Host, &dev.record(Queue::H2d)?)?;
        let written = target.clone();
        dev.submit_host(
            Queue::Host,
            "host adamw",
            Box::new(move || {
                let update = guard.as_ref().is_none_or(|(shared, unit)| {
                    shared.lock_partials()[*unit].iter().all(|p| p.is_finite())
                });
                // SAFETY: the host queue waited for the reads of this sub-group's states (NVMe),
                // the intake of its gradient, and the last use of `target`; nothing else touches
                // them until the events recorded after this job.
                unsafe {
                    let (p, gr) = (master.f32s_mut(g.len), grad.f32s(g.len));
                    // fp32 compute weights on the host are the master weights themselves;
                    // 16-bit ones are rounded in the update's pass over each chunk.
                    let cast_to = (!target.same(&master)).then_some(&target);
                    if !update {
                        // The weights as they are, so the target holds them whatever it held.
                        if let Some(target) = cast_to {
                            write_compute_weights(target, x, p);
                        }
                        return Ok(());
                    }
                    for (seg, h) in &hypers {
                        let r = seg.offset..seg.offset + seg.len;
                        crate::optim::adamw_update_any(
                            &mut p[r.clone()],
                            &gr[r.clone()],
                            moments_view(&m, moments, r.clone()),
                            moments_view(&v, moments, r.clone()),
                            h,
                            cast_view(cast_to, x, r),
                        );
                    }
                    if let Some(target) = cast_to {
                        // What the update's pass did not write: f32 targets, and the shard's
                        // padding past the last tensor (no segment covers it).
                        let mut from = 0;
                        let mut spans: Vec<Range<usize>> = hypers
                            .iter()
                            .map(|(s, _)| s.offset..s.offset + s.len)
                            .collect();
                        spans.sort_by_key(|r| r.start);
                        spans.push(g.len..g.len);
                        for r in spans {
                            let upto = if x == DType::F32 { r.end } else { r.start };
                            if from < upto {
                                write_compute_range(target, x, p, from..upto);
                            }
                            from = from.max(r.end);
                        }
                    }
                }
                Ok(())
            }),
        )?;
        let updated = dev.record(Queue::Host)?;
        self.grad_free[k] = Some(dev.record(Queue::Host)?);
        match (&self.params[k], slot) {
            (Some(ParamHome::Host(_)), _) => self.param_written[k] = Some(updated),
            (Some(ParamHome::Nvme), Some(s)) => {
                let (shared, name, bytes) = (
                    Arc::clone(&self.shared),
                    key(&g, "param"),
                    g.len * x.size_bytes(),
                );
                dev.wait(Queue::Io, &updated)?;
                let mem = written.clone();
                dev.submit_host(
                    Queue::Io,
                    "nvme write params",
                    Box::new(move || shared.write(true, &name, &mem, bytes)),
                )?;
                let written = dev.record(Queue::Io)?;
                if let Some(out) = self.out.as_mut() {
                    out.released[s] = Some(dev.record(Queue::Io)?);
                }
                self.param_written[k] = Some(written);
            }
            (None, Some(s)) => {
                let dst = device_params
                    .ok_or_else(|| missing("device parameter shard"))?
                    .slice(g.start, g.len)?;
                dev.wait(Queue::H2d, &updated)?;
                // SAFETY: the H2D queue waited for the optimizer's write of the slot; the slot is
                // reused only after the event recorded just below.
                unsafe {
                    dev.copy_h2d(Queue::H2d, &dst, &written.bytes()[..g.len * x.size_bytes()])?
                };
                let copied = dev.record(Queue::H2d)?;
                self.count_h2d(g.len * x.size_bytes());
                if let Some(out) = self.out.as_mut() {
                    out.released[s] = Some(dev.record(Queue::H2d)?);
                }
                self.param_written[k] = Some(copied);
            }
            _ => return Err(missing("a home for updated parameters")),
        }
        Ok(())
    }

    // --- whole states to and from the host ----------------------------------------------------

    /// Writes the fp32 master weights of `unit` (this rank's shard, `part`), Adam's moments
    /// (`moments`, or zeros), and its compute weights to their tiers; `device_params` receives
    /// them when on the device. The queues must be idle; waits for every write.
    pub fn init_unit(
        &mut self,
        dev: &dyn Device,
        unit: usize,
        part: &[f32],
        moments: Option<(&[f32], &[f32])>,
        device_params: Option<&Buf>,
    ) -> Result<(), EngineError> {
        let xb = self.x.size_bytes();
        for (k, g) in self.of(unit) {
            let r = g.start..g.start + g.len;
            let values = &part[r.clone()];
            let set = self.set_of(k)?;
            let (master, m, v) = (set.master.clone(), set.m.clone(), set.v.clone());
            let mb = self.moment_bytes();
            if self.plan_tiers.optimizer != Tier::Device {
                // SAFETY: nothing else uses these buffers during initialisation (the queues are
                // idle: every write below is waited for).
                unsafe {
                    master.f32s_mut(g.len).copy_from_slice(values);
                    match moments {
                        Some((mv, vv)) => {
                            write_moments(&m, self.moments, &mv[r.clone()]);
                            write_moments(&v, self.moments, &vv[r]);
                        }
                        None => {
                            m.bytes_mut()[..mb * g.len].fill(0);
                            v.bytes_mut()[..mb * g.len].fill(0);
                        }
                    }
                }
                if self.states[k].is_none() {
                    for (mem, what, bytes) in [(&master, "master", 4), (&m, "m", mb), (&v, "v", mb)]
                    {
                        self.shared
                            .write(false, &key(&g, what), mem, bytes * g.len)?;
                    }
                }
            }
            match &self.params[k] {
                Some(ParamHome::Host(mem)) if !mem.same(&master) => {
                    // SAFETY: as above.
                    unsafe { write_compute_weights(mem, self.x, values) };
                }
                Some(ParamHome::Host(_)) => {}
                Some(ParamHome::Nvme) => {
                    let stage = self.fetch.as_ref().ok_or_else(|| missing("fetch ring"))?;
                    let mem = stage.bufs[0].clone();
                    // SAFETY: as above.
                    unsafe { write_compute_weights(&mem, self.x, values) };
                    self.shared
                        .write(true, &key(&g, "param"), &mem, xb * g.len)?;
                }
                None => {
                    if let (Some(dst), Some(intake)) = (device_params, &self.intake) {
                        let mem = intake.bufs[0].clone();
                        // SAFETY: as above; the copy is waited for before the buffer is reused.
                        unsafe {
                            write_compute_weights(&mem, self.x, values);
                            dev.copy_h2d(
                                Queue::H2d,
                                &dst.slice(g.start, g.len)?,
                                &mem.bytes()[..xb * g.len],
                            )?;
                        }
                        dev.synchronize(Queue::H2d)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// This rank's fp32 master weights of `unit` (its shard), read from their tier. The queues
    /// must be idle.
    pub fn read_master(
        &self,
        dev: &dyn Device,
        unit: usize,
        shard_len: usize,
    ) -> Result<Vec<f32>, EngineError> {
        Ok(self.read_states(dev, unit, shard_len, false)?.master)
    }

    /// This rank's fp32 master weights of `unit` and, with `moments`, Adam's m and v (as f32),
    /// read from their tier one sub-group at a time. The queues must be idle.
    pub fn read_states(
        &self,
        dev: &dyn Device,
        unit: usize,
        shard_len: usize,
        moments: bool,
    ) -> Result<OptimStates, EngineError> {
        dev.synchronize(Queue::Host)?;
        dev.synchronize(Queue::Io)?;
        let n = if moments { shard_len } else { 0 };
        let (mut master, mut m, mut v) =
            (vec![0.0f32; shard_len], vec![0.0f32; n], vec![0.0f32; n]);
        for (k, g) in self.of(unit) {
            let set = self.set_of(k)?;
            if self.states[k].is_none() {
                let mut items = vec![(key(&g, "master"), &set.master)];
                if moments {
                    items.extend([(key(&g, "m"), &set.m), (key(&g, "v"), &set.v)]);
                }
                self.shared.read_all(false, &items)?;
            }
            let r = g.start..g.start + g.len;
            // SAFETY: the queues are idle (synchronized above), so nothing writes the buffers.
            unsafe {
                master[r.clone()].copy_from_slice(set.master.f32s(g.len));
                if moments {
                    read_moments(&set.m, self.moments, &mut m[r.clone()]);
                    read_moments(&set.v, self.moments, &mut v[r]);
                }
            }
        }
        Ok(OptimStates { master, m, v })
    }
}

/// One unit's optimizer states on the host: fp32 master weights, Adam's m and v (as f32).
pub struct OptimStates {
    pub master: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// The elements `r` of 16-bit compute weights in `mem` (none for f32 or no target).
///
/// # Safety
/// As [`HostMem::bytes_mut`]: nothing else uses `mem` meanwhile.
unsafe fn cast_view(mem: Option<&HostMem>, x: DType, r: Range<usize>) -> crate::optim::Cast<'_> {
    let Some(mem) = mem else {
        return crate::optim::Cast::None;
    };
    // SAFETY: per this function's contract.
    let bytes = unsafe { mem.bytes_mut() };
    match x {
        DType::Bf16 => {
            let all: &mut [half::bf16] = bytemuck::cast_slice_mut(&mut bytes[..2 * r.end]);
            crate::optim::Cast::Bf16(&mut all[r])
        }
        DType::F16 => {
            let all: &mut [half::f16] = bytemuck::cast_slice_mut(&mut bytes[..2 * r.end]);
            crate::optim::Cast::F16(&mut all[r])
        }
        _ => crate::optim::Cast::None,
    }
}

/// Moments of a sub-group (their storage type) as f32 into `out`.
///
/// # Safety
/// As [`HostMem::bytes_mut`]: nothing writes `mem` meanwhile.
unsafe fn read_moments(mem: &HostMem, dtype: MomentsDtype, out: &mut [f32]) {
    // SAFETY: per this function's contract.
    unsafe {
        match dtype {
            MomentsDtype::Fp32 => out.copy_from_slice(mem.f32s(out.len())),
            MomentsDtype::Bf16 => {
                let all: &[half::bf16] = bytemuck::cast_slice(&mem.bytes()[..2 * out.len()]);
                for (o, x) in out.iter_mut().zip(all) {
                    *o = x.to_f32();
                }
            }
        }
    }
}

/// f32 moments into a sub-group's storage (bf16: rounded to nearest; exact for values that came
/// from bf16).
///
/// # Safety
/// As [`HostMem::bytes_mut`].
unsafe fn write_moments(mem: &HostMem, dtype: MomentsDtype, values: &[f32]) {
    use half::slice::HalfFloatSliceExt;
    // SAFETY: per this function's contract.
    unsafe {
        match dtype {
            MomentsDtype::Fp32 => mem.f32s_mut(values.len()).copy_from_slice(values),
            MomentsDtype::Bf16 => {
                let dst: &mut [half::bf16] =
                    bytemuck::cast_slice_mut(&mut mem.bytes_mut()[..2 * values.len()]);
                dst.convert_from_f32_slice(values);
            }
        }
    }
}

fn missing(what: &str) -> EngineError {
    EngineError::Device(DeviceError::op(
        "host tier",
        format!("no {what} in this placement"),
    ))
}

/// dst = src (copy) or dst += src.
fn add_into(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    dst.par_chunks_mut(NORM_CHUNK)
        .zip(src.par_chunks(NORM_CHUNK))
        .for_each(|(d, s)| crate::backend::cpu::add_into(d, s));
}

/// The gradient norm's partial sums of `x`, chunk by chunk (as optim::sum_of_squares).
fn chunk_sums(x: &[f32]) -> Vec<f64> {
    use rayon::prelude::*;
    x.par_chunks(NORM_CHUNK)
        .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
        .collect()
}

/// Adam's moments of a sub-group in their storage type.
///
/// # Safety
/// As [`HostMem::bytes_mut`].
unsafe fn moments_view(
    mem: &HostMem,
    dtype: MomentsDtype,
    r: Range<usize>,
) -> crate::optim::Moments<'_> {
    // SAFETY: per this function's contract.
    unsafe {
        match dtype {
            MomentsDtype::Fp32 => crate::optim::Moments::F32(&mut mem.f32s_mut(r.end)[r]),
            MomentsDtype::Bf16 => {
                let all: &mut [half::bf16] =
                    bytemuck::cast_slice_mut(&mut mem.bytes_mut()[..2 * r.end]);
                crate::optim::Moments::Bf16(&mut all[r])
            }
        }
    }
}

/// The compute weights (X) of fp32 `values` into `mem`.
///
/// # Safety
/// As [`HostMem::bytes_mut`].
unsafe fn write_compute_weights(mem: &HostMem, x: DType, values: &[f32]) {
    // SAFETY: per this function's contract.
    unsafe { write_compute_range(mem, x, values, 0..values.len()) }
}

/// `values[r]` rounded to `x` into elements `r` of `mem`.
///
/// # Safety
/// As [`write_compute_weights`].
unsafe fn write_compute_range(mem: &HostMem, x: DType, values: &[f32], r: Range<usize>) {
    use half::slice::HalfFloatSliceExt;
    // SAFETY: per this function's contract.
    let bytes = unsafe { mem.bytes_mut() };
    let src = &values[r.clone()];
    match x {
        DType::Bf16 => {
            let dst: &mut [half::bf16] = bytemuck::cast_slice_mut(&mut bytes[..2 * r.end]);
            dst[r].convert_from_f32_slice(src);
        }
        DType::F16 => {
            let dst: &mut [half::f16] = bytemuck::cast_slice_mut(&mut bytes[..2 * r.end]);
            dst[r].convert_from_f32_slice(src);
        }
        _ => {
            let dst: &mut [f32] = bytemuck::cast_slice_mut(&mut bytes[..4 * r.end]);
            if dst.as_ptr() != values.as_ptr() {
                dst[r].copy_from_slice(src);
            }
        }
    }
}
