//! `CpuDevice`: the CPU backend behind the device seam. Its "device memory" is one host arena
//! bounded by a budget (`train.device_memory`), so the engine's planning, streaming and offload
//! logic runs here exactly as on a GPU; its queues are worker threads ([`HostQueue`]) with the
//! ordering rules of CUDA streams, so work that forgets an event races here too. Layer
//! operations run the fp32 kernels of this module on the compute queue, inside the device's
//! rayon pool.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use strata_collectives::Communicator;

use super::{attention, crossentropy, elementwise, encoder, flash, layernorm, matmul};
use crate::backend::arena::{Location, Memory, ARENA_ALIGN_BYTES};
use crate::backend::host_queue::HostQueue;
use crate::backend::{
    attention_modes_differ, check, check_min, ensure, AdamWHyper, Arena, AttentionActs,
    AttentionScratch, AttentionShape, Backend, Buf, DType, Device, DeviceError, Event, EventKind,
    GradMode, HostJob, Precision, Queue, Result, StepProfile, NORM_PARTIALS_MAX,
};

/// Start-up options of a [`CpuDevice`].
#[derive(Debug, Clone)]
pub struct CpuOptions {
    /// Compute threads (0: every core).
    pub threads: usize,
    /// Size of the arena (what the dry run counted).
    pub arena_bytes: usize,
    /// `train.device_memory`: the most the arena may take (None: no limit).
    pub budget_bytes: Option<usize>,
    /// A wait fails when the queue it waits on completes nothing for this long.
    pub stall_timeout: Duration,
}

/// One aligned, zeroed host allocation: the CPU device's memory.
struct HostAllocation {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is plain memory owned by this value; access is ordered by the queues.
unsafe impl Send for HostAllocation {}
// SAFETY: as above; &HostAllocation exposes nothing.
unsafe impl Sync for HostAllocation {}

impl Drop for HostAllocation {
    fn drop(&mut self) {
        // SAFETY: ptr came from alloc_zeroed with this layout and is freed exactly once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Alignment of the arena's base: a page, so views can be used for O_DIRECT I/O as well.
const HOST_ARENA_ALIGN_BYTES: usize = 4096;

fn host_memory(bytes: usize, budget: Option<usize>) -> Result<Memory> {
    if let Some(budget) = budget.filter(|&b| bytes > b) {
        return Err(DeviceError::OutOfMemory {
            backend: "cpu",
            requested_bytes: bytes,
            available_bytes: budget,
            limit: "train.device_memory".into(),
        });
    }
    let size = bytes
        .max(ARENA_ALIGN_BYTES)
        .next_multiple_of(HOST_ARENA_ALIGN_BYTES);
    let layout = Layout::from_size_align(size, HOST_ARENA_ALIGN_BYTES)
        .map_err(|e| DeviceError::op("cpu arena", format!("{bytes} bytes: {e}")))?;
    // SAFETY: the layout has a non-zero size.
    let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(
        DeviceError::OutOfMemory {
            backend: "cpu",
            requested_bytes: bytes,
            available_bytes: 0,
            limit: "the host refused the allocation".into(),
        },
    )?;
    let owner = HostAllocation { ptr, layout };
    // SAFETY: the allocation is `size` bytes, owned by `owner`, freed only when it drops.
    Ok(unsafe { Memory::new(ptr.as_ptr() as u64, size, Location::Host, Box::new(owner)) })
}

/// The CPU backend.
pub struct CpuDevice {
    // Queues first: dropping them drains their jobs while the arena's memory is still alive.
    queues: [HostQueue; 7],
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    arena: Arena,
}

impl std::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuDevice")
            .field("threads", &self.threads)
            .field("arena", &self.arena)
            .finish()
    }
}

impl CpuDevice {
    pub fn new(opts: &CpuOptions) -> Result<CpuDevice> {
        let arena = Arena::new(host_memory(opts.arena_bytes, opts.budget_bytes)?);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads)
            .thread_name(|i| format!("strata-cpu-{i}"))
            .build()
            .map_err(|e| DeviceError::Unavailable {
                backend: "cpu",
                message: format!("cannot start {} compute threads: {e}", opts.threads),
            })?;
        let threads = pool.current_num_threads();
        let queue = |q: Queue| HostQueue::new(q.name(), opts.stall_timeout);
        Ok(CpuDevice {
            queues: [
                queue(Queue::Compute)?,
                queue(Queue::H2d)?,
                queue(Queue::D2h)?,
                queue(Queue::Comm)?,
                queue(Queue::Io)?,
                queue(Queue::Host)?,
                queue(Queue::Fetch)?,
            ],
            pool: Arc::new(pool),
            threads,
            arena,
        })
    }

    fn queue(&self, q: Queue) -> &HostQueue {
        &self.queues[q as usize]
    }

    /// Enqueues a kernel on the compute queue, to run inside the compute pool.
    fn compute(&self, op: &'static str, kernel: impl FnOnce() + Send + 'static) -> Result<()> {
        let pool = Arc::clone(&self.pool);
        self.queue(Queue::Compute).submit(
            op,
            Box::new(move || {
                pool.install(kernel);
                Ok(())
            }),
        )
    }
}

/// Fails unless every buffer is live host memory of an arena.
fn live(op: &'static str, bufs: &[&Buf]) -> Result<()> {
    bufs.iter()
        .try_for_each(|b| b.check_live(op, Location::Host))
}

/// Fails when an output overlaps an input or another output (the views handed to a kernel as
/// `&mut` and `&` must be disjoint).
fn disjoint(op: &'static str, outputs: &[&Buf], inputs: &[&Buf]) -> Result<()> {
    for (i, out) in outputs.iter().enumerate() {
        let clash = inputs
            .iter()
            .chain(&outputs[i + 1..])
            .find(|b| out.overlaps(b));
        if let Some(other) = clash {
            return Err(DeviceError::op(
                op,
                format!("{out:?} overlaps {other:?}; outputs must not alias other operands"),
            ));
        }
    }
    Ok(())
}

/// The buffer's elements as a slice.
///
/// # Safety
/// `buf` is live host memory holding `len` elements of `T`'s size, and while the slice lives no
/// one writes it: the queues order every writer before or after the job using it.
unsafe fn view<T>(buf: &Buf) -> &[T] {
    // SAFETY: per this function's contract.
    unsafe { std::slice::from_raw_parts(buf.ptr() as *const T, buf.len()) }
}

/// The buffer's elements as a mutable slice.
///
/// # Safety
/// As [`view`], and no other slice of these bytes exists while this one lives (`disjoint`
/// checked it for the job's other operands; the queues order every other user).
#[allow(clippy::mut_from_ref)]
unsafe fn view_mut<T>(buf: &Buf) -> &mut [T] {
    // SAFETY: per this function's contract.
    unsafe { std::slice::from_raw_parts_mut(buf.ptr() as *mut T, buf.len()) }
}

/// A host address handed to a copy job (the caller keeps the memory valid: copy_h2d/d2h's
/// contract).
struct HostPtr(*mut u8, usize);
// SAFETY: the pointer is only dereferenced by the copy job, while the caller's contract holds.
unsafe impl Send for HostPtr {}

const F32: DType = DType::F32;

impl Device for CpuDevice {
    fn backend(&self) -> Backend {
        Backend::Cpu
    }

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn precision(&self) -> Precision {
        Precision::Fp32
    }

    fn arena(&self) -> &Arena {
        &self.arena
    }

    fn record(&self, queue: Queue) -> Result<Event> {
        Ok(Event(EventKind::Host(self.queue(queue).record())))
    }

    fn wait(&self, queue: Queue, event: &Event) -> Result<()> {
        match &event.0 {
            EventKind::Host(ticket) => self.queue(queue).wait_for(ticket.clone()),
            EventKind::Cuda(_) => Err(DeviceError::op(
                "wait",
                "a CUDA event cannot order the CPU backend's queues",
            )),
        }
    }

    fn synchronize(&self, queue: Queue) -> Result<()> {
        self.queue(queue).synchronize()
    }

    fn submit_host(&self, queue: Queue, op: &'static str, job: HostJob) -> Result<()> {
        ensure(
            matches!(queue, Queue::Io | Queue::Host | Queue::Fetch),
            op,
            || {
                format!(
                    "host jobs run on the io or host queue, not {}",
                    queue.name()
                )
            },
        )?;
        self.queue(queue).submit(op, job)
    }

    fn queue_time(&self, queue: Queue) -> Option<crate::backend::host_queue::QueueTime> {
        Some(self.queue(queue).times())
    }

    fn memset(&self, queue: Queue, buf: &Buf, byte: u8) -> Result<()> {
        live("memset", &[buf])?;
        let buf = buf.clone();
        self.queue(queue).submit(
            "memset",
            Box::new(move || {
                // SAFETY: live host memory of size_bytes bytes; the queue orders this job
                // against other users.
                unsafe { std::ptr::write_bytes(buf.ptr() as *mut u8, byte, buf.size_bytes()) };
                Ok(())
            }),
        )
    }

    fn poison_nan(&self, queue: Queue, buf: &Buf) -> Result<()> {
        live("poison_nan", &[buf])?;
        ensure(buf.dtype() == F32, "poison_nan", || {
            format!(
                "the CPU backend computes in f32, got {}",
                buf.dtype().name()
            )
        })?;
        let buf = buf.clone();
        self.queue(queue).submit(
            "poison_nan",
            Box::new(move || {
                // SAFETY: as in memset.
                unsafe { view_mut::<f32>(&buf) }.fill(f32::NAN);
                Ok(())
            }),
        )
    }

    unsafe fn copy_h2d(&self, queue: Queue, dst: &Buf, src: &[u8]) -> Result<()> {
        live("copy_h2d", &[dst])?;
        ensure(src.len() == dst.size_bytes(), "copy_h2d", || {
            format!(
                "host {} bytes, device buffer {} bytes",
                src.len(),
                dst.size_bytes()
            )
        })?;
        let (dst, src) = (dst.clone(), HostPtr(src.as_ptr() as *mut u8, src.len()));
        self.queue(queue).submit(
            "copy_h2d",
            Box::new(move || {
                let src = src;
                // SAFETY: the caller keeps `src` valid and unmodified until this job completes
                // (copy_h2d's contract); dst is live arena memory of the same length.
                unsafe { std::ptr::copy_nonoverlapping(src.0, dst.ptr() as *mut u8, src.1) };
                Ok(())
            }),
        )
    }

    unsafe fn copy_d2h(&self, queue: Queue, dst: &mut [u8], src: &Buf) -> Result<()> {
        live("copy_d2h", &[src])?;
        ensure(dst.len() == src.size_bytes(), "copy_d2h", || {
            format!(
                "host {} bytes, device buffer {} bytes",
                dst.len(),
                src.size_bytes()
            )
        })?;
        let (src, dst) = (src.clone(), HostPtr(dst.as_mut_ptr(), dst.len()));
        self.queue(queue).submit(
            "copy_d2h",
            Box::new(move || {
                let dst = dst;
                // SAFETY: the caller keeps `dst` valid and untouched until this job completes
                // (copy_d2h's contract); src is live arena memory of the same length.
                unsafe { std::ptr::copy_nonoverlapping(src.ptr() as *const u8, dst.0, dst.1) };
                Ok(())
            }),
        )
    }

    fn copy_d2d(&self, queue: Queue, dst: &Buf, src: &Buf) -> Result<()> {
        live("copy_d2d", &[dst, src])?;
        ensure(dst.size_bytes() == src.size_bytes(), "copy_d2d", || {
            format!(
                "dst {} bytes, src {} bytes",
                dst.size_bytes(),
                src.size_bytes()
            )
        })?;
        disjoint("copy_d2d", &[dst], &[src])?;
        let (dst, src) = (dst.clone(), src.clone());
        self.queue(queue).submit(
            "copy_d2d",
            Box::new(move || {
                // SAFETY: two disjoint live ranges of equal size (checked above).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.ptr() as *const u8,
                        dst.ptr() as *mut u8,
                        src.size_bytes(),
                    )
                };
                Ok(())
            }),
        )
    }

    fn all_reduce(&self, comm: &Arc<dyn Communicator>, buf: &Buf) -> Result<()> {
        live("all_reduce", &[buf])?;
        ensure(buf.dtype() == F32, "all_reduce", || {
            format!("the CPU backend reduces f32, got {}", buf.dtype().name())
        })?;
        let (comm, buf) = (Arc::clone(comm), buf.clone());
        self.queue(Queue::Comm).submit(
            "all_reduce",
            Box::new(move || {
                // SAFETY: live host memory; the comm queue owns it until this job completes.
                let data = unsafe { view_mut::<f32>(&buf) };
                comm.all_reduce(data).map_err(|source| DeviceError::Comm {
                    queue: "comm",
                    source,
                })
            }),
        )
    }

    fn all_gather(&self, comm: &Arc<dyn Communicator>, send: &Buf, recv: &Buf) -> Result<()> {
        let op = "all_gather";
        live(op, &[send, recv])?;
        check(op, "send", send, F32, send.len())?;
        check(op, "recv", recv, F32, send.len() * comm.world_size())?;
        disjoint(op, &[recv], &[send])?;
        let (comm, send, recv) = (Arc::clone(comm), send.clone(), recv.clone());
        self.queue(Queue::Comm).submit(
            op,
            Box::new(move || {
                // SAFETY: live, disjoint host memory; the comm queue owns it during this job.
                let (s, r) = unsafe { (view::<f32>(&send), view_mut::<f32>(&recv)) };
                comm.all_gather(s, r).map_err(|source| DeviceError::Comm {
                    queue: "comm",
                    source,
                })
            }),
        )
    }

    fn all_gather_in_place(
        &self,
        comm: &Arc<dyn Communicator>,
        buf: &Buf,
        scratch: &Buf,
    ) -> Result<()> {
        let op = "all_gather_in_place";
        let world = comm.world_size();
        live(op, &[buf, scratch])?;
        ensure(buf.len() % world == 0, op, || {
            format!("{buf:?} does not split into {world} parts")
        })?;
        let n = buf.len() / world;
        check(op, "buf", buf, F32, buf.len())?;
        check_min(op, "scratch", scratch, F32, n)?;
        disjoint(op, &[scratch], &[buf])?;
        let (comm, buf, scratch) = (Arc::clone(comm), buf.clone(), scratch.slice(0, n)?);
        self.queue(Queue::Comm).submit(
            op,
            Box::new(move || {
                let rank = comm.rank();
                // SAFETY: live, disjoint host memory; the comm queue owns both during this job.
                let (all, part) = unsafe { (view_mut::<f32>(&buf), view_mut::<f32>(&scratch)) };
                part.copy_from_slice(&all[rank * n..(rank + 1) * n]);
                comm.all_gather(part, all)
                    .map_err(|source| DeviceError::Comm {
                        queue: "comm",
                        source,
                    })
            }),
        )
    }

    fn reduce_scatter_add(
        &self,
        comm: &Arc<dyn Communicator>,
        send: &Buf,
        recv: &Buf,
        scratch: &Buf,
    ) -> Result<()> {
        let op = "reduce_scatter_add";
        live(op, &[send, recv, scratch])?;
        check(op, "recv", recv, F32, recv.len())?;
        check(op, "send", send, F32, recv.len() * comm.world_size())?;
        check(op, "scratch", scratch, F32, recv.len())?;
        disjoint(op, &[recv, scratch], &[send])?;
        let (comm, bufs) = (Arc::clone(comm), [send, recv, scratch].map(Buf::clone));
        let pool = Arc::clone(&self.pool);
        self.queue(Queue::Comm).submit(
            op,
            Box::new(move || {
                let [send, recv, scratch] = &bufs;
                // SAFETY: live, disjoint host memory; the comm queue owns it during this job.
                let (s, r, tmp) = unsafe {
                    (
                        view::<f32>(send),
                        view_mut::<f32>(recv),
                        view_mut::<f32>(scratch),
                    )
                };
                comm.reduce_scatter(s, tmp)
                    .map_err(|source| DeviceError::Comm {
                        queue: "comm",
                        source,
                    })?;
                pool.install(|| elementwise::add_into(r, tmp));
                Ok(())
            }),
        )
    }

    fn profile_start(&self) -> Result<()> {
        self.queue(Queue::Compute).profile_start();
        Ok(())
    }

    fn profile_finish(&self) -> Result<StepProfile> {
        Ok(StepProfile {
            ops: self.queue(Queue::Compute).profile_finish()?,
            copies: Vec::new(),
        })
    }

    fn encoder_forward(
        &self,
        out: &Buf,
        inp: &Buf,
        wte: &Buf,
        wpe: &Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "encoder_forward";
        check(op, "out", out, F32, b * t * c)?;
        check(op, "inp", inp, DType::I32, b * t)?;
        check_min(op, "wte", wte, F32, c)?;
        check_min(op, "wpe", wpe, F32, t * c)?;
        live(op, &[out, inp, wte, wpe])?;
        disjoint(op, &[out], &[inp, wte, wpe])?;
        let (out, inp, wte, wpe) = (out.clone(), inp.clone(), wte.clone(), wpe.clone());
        self.compute(op, move || {
            // SAFETY: live, checked sizes, out disjoint from the inputs; queue-ordered.
            let (o, tokens, e, p) =
                unsafe { (view_mut(&out), view::<u32>(&inp), view(&wte), view(&wpe)) };
            encoder::encoder_forward(o, tokens, e, p, t, c);
        })
    }

    fn encoder_backward(
        &self,
        dwte: &Buf,
        dwpe: &Buf,
        dout: &Buf,
        inp: &Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "encoder_backward";
        check_min(op, "dwte", dwte, F32, c)?;
        check_min(op, "dwpe", dwpe, F32, t * c)?;
        check(op, "dout", dout, F32, b * t * c)?;
        check(op, "inp", inp, DType::I32, b * t)?;
        live(op, &[dwte, dwpe, dout, inp])?;
        disjoint(op, &[dwte, dwpe], &[dout, inp])?;
        let (dwte, dwpe, dout, inp) = (dwte.clone(), dwpe.clone(), dout.clone(), inp.clone());
        self.compute(op, move || {
            // SAFETY: as in encoder_forward.
            let (de, dp, d, tokens) = unsafe {
                (
                    view_mut(&dwte),
                    view_mut(&dwpe),
                    view(&dout),
                    view::<u32>(&inp),
                )
            };
            encoder::encoder_backward(de, dp, d, tokens, t, c);
        })
    }

    fn layernorm_forward(
        &self,
        out: &Buf,
        mean: &Buf,
        rstd: &Buf,
        inp: &Buf,
        weight: &Buf,
        bias: &Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "layernorm_forward";
        for (name, buf, len) in [
            ("out", out, n * c),
            ("mean", mean, n),
            ("rstd", rstd, n),
            ("inp", inp, n * c),
            ("weight", weight, c),
            ("bias", bias, c),
        ] {
            check(op, name, buf, F32, len)?;
        }
        live(op, &[out, mean, rstd, inp, weight, bias])?;
        disjoint(op, &[out, mean, rstd], &[inp, weight, bias])?;
        let bufs = [out, mean, rstd, inp, weight, bias].map(Buf::clone);
        self.compute(op, move || {
            let [out, mean, rstd, inp, weight, bias] = &bufs;
            // SAFETY: as in encoder_forward.
            unsafe {
                layernorm::layernorm_forward(
                    view_mut(out),
                    view_mut(mean),
                    view_mut(rstd),
                    view(inp),
                    view(weight),
                    view(bias),
                    c,
                )
            };
        })
    }

    fn layernorm_backward(
        &self,
        dinp: &Buf,
        dweight: &Buf,
        dbias: &Buf,
        dout: &Buf,
        inp: &Buf,
        weight: &Buf,
        mean: &Buf,
        rstd: &Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "layernorm_backward";
        for (name, buf, len) in [
            ("dinp", dinp, n * c),
            ("dweight", dweight, c),
            ("dbias", dbias, c),
            ("dout", dout, n * c),
            ("inp", inp, n * c),
            ("weight", weight, c),
            ("mean", mean, n),
            ("rstd", rstd, n),
        ] {
            check(op, name, buf, F32, len)?;
        }
        live(op, &[dinp, dweight, dbias, dout, inp, weight, mean, rstd])?;
        disjoint(
            op,
            &[dinp, dweight, dbias],
            &[dout, inp, weight, mean, rstd],
        )?;
        let bufs = [dinp, dweight, dbias, dout, inp, weight, mean, rstd].map(Buf::clone);
        self.compute(op, move || {
            let [dinp, dweight, dbias, dout, inp, weight, mean, rstd] = &bufs;
            // SAFETY: as in encoder_forward.
            unsafe {
                layernorm::layernorm_backward(
                    view_mut(dinp),
                    view_mut(dweight),
                    view_mut(dbias),
                    view(dout),
                    view(inp),
                    view(weight),
                    view(mean),
                    view(rstd),
                    c,
                )
            };
        })
    }

    fn matmul_forward(
        &self,
        out: &Buf,
        inp: &Buf,
        weight: &Buf,
        bias: Option<&Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_forward";
        check(op, "out", out, F32, n * oc)?;
        check(op, "inp", inp, F32, n * c)?;
        check(op, "weight", weight, F32, oc * c)?;
        if let Some(bias) = bias {
            check(op, "bias", bias, F32, oc)?;
            live(op, &[bias])?;
            disjoint(op, &[out], &[bias])?;
        }
        live(op, &[out, inp, weight])?;
        disjoint(op, &[out], &[inp, weight])?;
        let (out, inp, weight, bias) = (out.clone(), inp.clone(), weight.clone(), bias.cloned());
        self.compute(op, move || {
            // SAFETY: as in encoder_forward.
            let bias = bias.as_ref().map(|b| unsafe { view(b) });
            unsafe {
                matmul::matmul_forward(view_mut(&out), view(&inp), view(&weight), bias, n, c, oc)
            };
        })
    }

    fn matmul_backward(
        &self,
        dinp: &Buf,
        dinp_mode: GradMode,
        dweight: &Buf,
        dbias: Option<&Buf>,
        dout: &Buf,
        inp: &Buf,
        weight: &Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward";
        check(op, "dinp", dinp, F32, n * c)?;
        check(op, "dweight", dweight, F32, oc * c)?;
        check(op, "dout", dout, F32, n * oc)?;
        check(op, "inp", inp, F32, n * c)?;
        check(op, "weight", weight, F32, oc * c)?;
        live(op, &[dinp, dweight, dout, inp, weight])?;
        let mut outputs = vec![dinp, dweight];
        if let Some(dbias) = dbias {
            check(op, "dbias", dbias, F32, oc)?;
            live(op, &[dbias])?;
            outputs.push(dbias);
        }
        disjoint(op, &outputs, &[dout, inp, weight])?;
        let accumulate = dinp_mode == GradMode::Accumulate;
        let bufs = [dinp, dweight, dout, inp, weight].map(Buf::clone);
        let dbias = dbias.cloned();
        self.compute(op, move || {
            let [dinp, dweight, dout, inp, weight] = &bufs;
            // SAFETY: as in encoder_forward.
            unsafe {
                matmul::matmul_backward(
                    Some(view_mut(dinp)),
                    accumulate,
                    view_mut(dweight),
                    dbias.as_ref().map(|b| view_mut(b)),
                    view(dout),
                    view(inp),
                    view(weight),
                    n,
                    c,
                    oc,
                )
            };
        })
    }

    fn attention_forward(
        &self,
        out: &Buf,
        acts: &AttentionActs,
        qkv: &Buf,
        s: AttentionShape,
    ) -> Result<()> {
        let op = "attention_forward";
        ensure(s.nh > 0 && s.c % s.nh == 0, op, || {
            format!("C = {} must be a positive multiple of NH = {}", s.c, s.nh)
        })?;
        let btc = s.b * s.t * s.c;
        check(op, "out", out, F32, btc)?;
        check(op, "qkv", qkv, F32, 3 * btc)?;
        match acts {
            AttentionActs::Materialized { qkvr, att, vaccum } => {
                check(op, "acts.qkvr", qkvr, F32, s.qkvr_len())?;
                check(op, "acts.att", att, F32, s.scores_len())?;
                check(op, "acts.vaccum", vaccum, F32, btc)?;
                live(op, &[out, qkv, qkvr, att, vaccum])?;
                disjoint(op, &[out, qkvr, att, vaccum], &[qkv])?;
                let bufs = [out, qkv, qkvr, att, vaccum].map(Buf::clone);
                self.compute(op, move || {
                    let [out, qkv, qkvr, att, vaccum] = &bufs;
                    // SAFETY: as in encoder_forward.
                    unsafe {
                        attention::attention_forward(
                            view_mut(out),
                            view_mut(qkvr),
                            view_mut(att),
                            view_mut(vaccum),
                            view(qkv),
                            s,
                        )
                    };
                })
            }
            AttentionActs::Fused { lse } => {
                check(op, "acts.lse", lse, F32, s.rows_len())?;
                live(op, &[out, qkv, lse])?;
                disjoint(op, &[out, lse], &[qkv])?;
                let bufs = [out, qkv, lse].map(Buf::clone);
                self.compute(op, move || {
                    let [out, qkv, lse] = &bufs;
                    // SAFETY: as in encoder_forward.
                    unsafe { flash::flash_forward(view_mut(out), view_mut(lse), view(qkv), s) };
                })
            }
        }
    }

    fn attention_backward(
        &self,
        dqkv: &Buf,
        dout: &Buf,
        qkv: &Buf,
        out: &Buf,
        acts: &AttentionActs,
        scratch: &AttentionScratch,
        s: AttentionShape,
    ) -> Result<()> {
        let op = "attention_backward";
        let btc = s.b * s.t * s.c;
        check(op, "dqkv", dqkv, F32, 3 * btc)?;
        check(op, "dout", dout, F32, btc)?;
        match (acts, scratch) {
            (
                AttentionActs::Materialized { qkvr, att, .. },
                AttentionScratch::Materialized {
                    dqkvr,
                    datt,
                    dvaccum,
                },
            ) => {
                check(op, "acts.qkvr", qkvr, F32, s.qkvr_len())?;
                check(op, "acts.att", att, F32, s.scores_len())?;
                check(op, "scratch.dqkvr", dqkvr, F32, s.qkvr_len())?;
                check(op, "scratch.datt", datt, F32, s.scores_len())?;
                check(op, "scratch.dvaccum", dvaccum, F32, btc)?;
                let outputs = [dqkv, dqkvr, datt, dvaccum];
                let inputs = [dout, qkvr, att];
                live(op, &outputs)?;
                live(op, &inputs)?;
                disjoint(op, &outputs, &inputs)?;
                let bufs = [dqkv, dout, qkvr, att, dqkvr, datt, dvaccum].map(Buf::clone);
                self.compute(op, move || {
                    let [dqkv, dout, qkvr, att, dqkvr, datt, dvaccum] = &bufs;
                    // SAFETY: as in encoder_forward.
                    unsafe {
                        attention::attention_backward(
                            view_mut(dqkv),
                            view(dout),
                            view(qkvr),
                            view(att),
                            view_mut(dqkvr),
                            view_mut(datt),
                            view_mut(dvaccum),
                            s,
                        )
                    };
                })
            }
            (AttentionActs::Fused { lse }, AttentionScratch::Fused { delta }) => {
                check(op, "qkv", qkv, F32, 3 * btc)?;
                check(op, "out", out, F32, btc)?;
                check(op, "acts.lse", lse, F32, s.rows_len())?;
                check(op, "scratch.delta", delta, F32, s.rows_len())?;
                let outputs = [dqkv, delta];
                let inputs = [dout, qkv, out, lse];
                live(op, &outputs)?;
                live(op, &inputs)?;
                disjoint(op, &outputs, &inputs)?;
                let bufs = [dqkv, delta, dout, qkv, out, lse].map(Buf::clone);
                self.compute(op, move || {
                    let [dqkv, delta, dout, qkv, out, lse] = &bufs;
                    // SAFETY: as in encoder_forward.
                    unsafe {
                        flash::flash_backward(
                            view_mut(dqkv),
                            view_mut(delta),
                            view(dout),
                            view(qkv),
                            view(out),
                            view(lse),
                            s,
                        )
                    };
                })
            }
            (acts, scratch) => Err(attention_modes_differ(op, acts, scratch)),
        }
    }

    fn gelu_forward(&self, out: &Buf, inp: &Buf) -> Result<()> {
        let op = "gelu_forward";
        check(op, "out", out, F32, inp.len())?;
        check(op, "inp", inp, F32, out.len())?;
        live(op, &[out, inp])?;
        let (out, inp) = (out.clone(), inp.clone());
        if out.same_range(&inp) {
            // SAFETY: one view of a live buffer; queue-ordered.
            return self.compute(op, move || {
                elementwise::gelu_in_place(unsafe { view_mut(&out) })
            });
        }
        disjoint(op, &[&out], &[&inp])?;
        self.compute(op, move || {
            // SAFETY: as in encoder_forward.
            unsafe { elementwise::gelu_forward(view_mut(&out), view(&inp)) };
        })
    }

    fn gelu_backward(&self, dinp: &Buf, mode: GradMode, inp: &Buf, dout: &Buf) -> Result<()> {
        let op = "gelu_backward";
        let n = inp.len();
        check(op, "dinp", dinp, F32, n)?;
        check(op, "inp", inp, F32, n)?;
        check(op, "dout", dout, F32, n)?;
        live(op, &[dinp, inp, dout])?;
        disjoint(op, &[dinp], &[inp, dout])?;
        let accumulate = mode == GradMode::Accumulate;
        let bufs = [dinp, inp, dout].map(Buf::clone);
        self.compute(op, move || {
            let [dinp, inp, dout] = &bufs;
            // SAFETY: as in encoder_forward.
            unsafe {
                elementwise::gelu_backward(view_mut(dinp), view(inp), view(dout), accumulate)
            };
        })
    }

    fn residual_forward(&self, out: &Buf, a: &Buf, b: &Buf) -> Result<()> {
        let op = "residual_forward";
        let n = out.len();
        check(op, "out", out, F32, n)?;
        check(op, "a", a, F32, n)?;
        check(op, "b", b, F32, n)?;
        live(op, &[out, a, b])?;
        // out may be a or b: then it is an accumulation of the other one.
        let in_place = if out.same_range(a) {
            Some(b)
        } else if out.same_range(b) {
            Some(a)
        } else {
            None
        };
        if let Some(other) = in_place {
            return self.accumulate(out, other);
        }
        disjoint(op, &[out], &[a, b])?;
        let bufs = [out, a, b].map(Buf::clone);
        self.compute(op, move || {
            let [out, a, b] = &bufs;
            // SAFETY: as in encoder_forward.
            unsafe { elementwise::residual_forward(view_mut(out), view(a), view(b)) };
        })
    }

    fn accumulate(&self, dst: &Buf, src: &Buf) -> Result<()> {
        let op = "accumulate";
        check(op, "dst", dst, F32, src.len())?;
        check(op, "src", src, F32, dst.len())?;
        live(op, &[dst, src])?;
        disjoint(op, &[dst], &[src])?;
        let (dst, src) = (dst.clone(), src.clone());
        self.compute(op, move || {
            // SAFETY: as in encoder_forward.
            unsafe { elementwise::add_into(view_mut(&dst), view(&src)) };
        })
    }

    fn crossentropy_forward_backward(
        &self,
        logits: &Buf,
        losses: &Buf,
        targets: &Buf,
        r: usize,
        v: usize,
        vp: usize,
        dloss: Option<f32>,
    ) -> Result<()> {
        let op = "crossentropy_forward_backward";
        ensure(v > 0 && v <= vp, op, || {
            format!("need 0 < V <= Vp, got V={v} Vp={vp}")
        })?;
        check(op, "logits", logits, F32, r * vp)?;
        check(op, "losses", losses, F32, r)?;
        check(op, "targets", targets, DType::I32, r)?;
        live(op, &[logits, losses, targets])?;
        disjoint(op, &[logits, losses], &[targets])?;
        let bufs = [logits, losses, targets].map(Buf::clone);
        self.compute(op, move || {
            let [logits, losses, targets] = &bufs;
            // SAFETY: as in encoder_forward.
            unsafe {
                crossentropy::softmax_crossentropy(
                    view_mut(logits),
                    view::<u32>(targets),
                    view_mut(losses),
                    dloss,
                    v,
                    vp,
                )
            };
        })
    }

    fn cast_f32_to_x(&self, out: &Buf, inp: &Buf) -> Result<()> {
        check("cast_f32_to_x", "out", out, F32, inp.len())?;
        self.copy_d2d(Queue::Compute, out, inp)
    }

    fn cast_x_to_f32(&self, out: &Buf, inp: &Buf) -> Result<()> {
        check("cast_x_to_f32", "out", out, F32, inp.len())?;
        self.copy_d2d(Queue::Compute, out, inp)
    }

    fn grad_norm_squared(
        &self,
        out: &Buf,
        partials: &Buf,
        grads: &Buf,
        accumulate: bool,
    ) -> Result<()> {
        let op = "grad_norm_squared";
        check(op, "out", out, F32, 1)?;
        check_min(op, "partials", partials, F32, NORM_PARTIALS_MAX)?;
        check(op, "grads", grads, F32, grads.len())?;
        live(op, &[out, grads])?;
        disjoint(op, &[out], &[grads])?;
        let (out, grads) = (out.clone(), grads.clone());
        self.compute(op, move || {
            // SAFETY: as in encoder_forward.
            let (out, grads) = unsafe { (view_mut::<f32>(&out), view(&grads)) };
            let base = if accumulate { out[0] } else { 0.0 };
            out[0] = base + super::adamw::sum_of_squares(grads) as f32;
        })
    }

    fn adamw(
        &self,
        params: &Buf,
        params_x: Option<&Buf>,
        grads: &Buf,
        m: &Buf,
        v: &Buf,
        hyper: &AdamWHyper,
    ) -> Result<()> {
        let op = "adamw";
        let n = params.len();
        ensure(hyper.step >= 1, op, || "step counts from 1".into())?;
        for (name, buf) in [("params", params), ("grads", grads), ("m", m), ("v", v)] {
            check(op, name, buf, F32, n)?;
        }
        live(op, &[params, grads, m, v])?;
        disjoint(op, &[params, m, v], &[grads])?;
        let hyper = *hyper;
        let bufs = [params, grads, m, v].map(Buf::clone);
        self.compute(op, move || {
            let [params, grads, m, v] = &bufs;
            // SAFETY: as in encoder_forward.
            unsafe {
                super::adamw::adamw_update(
                    view_mut(params),
                    view(grads),
                    view_mut(m),
                    view_mut(v),
                    &hyper,
                )
            };
        })?;
        match params_x {
            // The compute copy of fp32 weights is a copy (or the master buffer itself).
            Some(x) if !x.same_range(params) => self.copy_d2d(Queue::Compute, x, params),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn device(arena_bytes: usize) -> CpuDevice {
        CpuDevice::new(&CpuOptions {
            threads: 1,
            arena_bytes,
            budget_bytes: None,
            stall_timeout: Duration::from_secs(20),
        })
        .unwrap()
    }

    /// Holds the H2D queue behind a job on the I/O queue until the returned sender is used.
    fn gate_h2d(dev: &CpuDevice) -> mpsc::Sender<()> {
        let (open, gate) = mpsc::channel::<()>();
        dev.queue(Queue::Io)
            .submit(
                "gate",
                Box::new(move || {
                    gate.recv_timeout(Duration::from_secs(10))
                        .map_err(|e| DeviceError::op("gate", e.to_string()))
                }),
            )
            .unwrap();
        dev.wait(Queue::H2d, &dev.record(Queue::Io).unwrap())
            .unwrap();
        open
    }

    #[test]
    fn queues_run_concurrently_so_a_forgotten_wait_reads_stale_data() {
        let dev = device(1 << 20);
        let n = 1024;
        let (src, dst) = (
            dev.arena().alloc("src", F32, n).unwrap(),
            dev.arena().alloc("dst", F32, n).unwrap(),
        );
        let ones = vec![1.0f32; n];
        let dyn_dev: &dyn Device = &dev;

        // Without a wait: compute copies `src` while the H2D copy into it is still held back.
        let open = gate_h2d(&dev);
        // SAFETY: `ones` outlives the copy (the H2D queue is synchronized below).
        unsafe { dev.copy_h2d(Queue::H2d, &src, bytemuck::cast_slice(&ones)) }.unwrap();
        dev.copy_d2d(Queue::Compute, &dst, &src).unwrap();
        dev.synchronize(Queue::Compute).unwrap();
        open.send(()).unwrap();
        dev.synchronize(Queue::H2d).unwrap();
        assert_eq!(dyn_dev.download::<f32>(&src).unwrap(), ones);
        assert!(
            dyn_dev
                .download::<f32>(&dst)
                .unwrap()
                .iter()
                .all(|&x| x == 0.0),
            "compute ran before the copy it did not wait for"
        );

        // With the wait: compute sees the copied data.
        dev.memset(Queue::H2d, &src, 0).unwrap();
        let open = gate_h2d(&dev);
        // SAFETY: as above.
        unsafe { dev.copy_h2d(Queue::H2d, &src, bytemuck::cast_slice(&ones)) }.unwrap();
        dev.wait(Queue::Compute, &dev.record(Queue::H2d).unwrap())
            .unwrap();
        dev.copy_d2d(Queue::Compute, &dst, &src).unwrap();
        open.send(()).unwrap();
        dev.synchronize(Queue::Compute).unwrap();
        assert_eq!(dyn_dev.download::<f32>(&dst).unwrap(), ones);
    }

    #[test]
    fn operations_check_their_operands_before_they_are_enqueued() {
        let dev = device(1 << 20);
        let a = dev.arena().alloc("a", F32, 64).unwrap();
        // Overlapping output and input.
        let err = dev
            .gelu_backward(
                &a.slice(0, 32).unwrap(),
                GradMode::Overwrite,
                &a.slice(16, 32).unwrap(),
                &a.slice(32, 32).unwrap(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlaps"), "{err}");
        // Wrong sizes name the operand.
        let err = dev
            .matmul_forward(&a, &a, &a, None, 4, 4, 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("matmul_forward") && err.contains("out"),
            "{err}"
        );
        // A view from the dry run never reaches a kernel.
        let phantom = Arena::counting().alloc("phantom", F32, 64).unwrap();
        let err = dev.gelu_forward(&a, &phantom).unwrap_err().to_string();
        assert!(err.contains("dry-run"), "{err}");
        // In place is allowed where the operation says so.
        dev.gelu_forward(&a, &a).unwrap();
        dev.residual_forward(&a, &a, &dev.arena().alloc("b", F32, 64).unwrap())
            .unwrap();
        dev.synchronize(Queue::Compute).unwrap();
    }

    #[test]
    fn a_budget_below_the_arena_is_refused_like_a_full_gpu() {
        let err = CpuDevice::new(&CpuOptions {
            threads: 1,
            arena_bytes: 10 << 20,
            budget_bytes: Some(1 << 20),
            stall_timeout: Duration::from_secs(1),
        })
        .unwrap_err();
        assert!(
            matches!(err, DeviceError::OutOfMemory { requested_bytes, available_bytes, .. }
            if requested_bytes == 10 << 20 && available_bytes == 1 << 20)
        );
        assert!(err.to_string().contains("train.device_memory"), "{err}");
    }
}
