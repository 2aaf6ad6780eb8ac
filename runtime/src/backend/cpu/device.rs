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

use super::elementwise;
use crate::backend::arena::{Location, Memory, ARENA_ALIGN_BYTES};
use crate::backend::host_queue::HostQueue;
use crate::backend::{
    check, check_min, ensure, AdamWHyper, Arena, Backend, Buf, Checked, DType, Device, DeviceError,
    Event, EventKind, HostJob, Precision, Queue, Result, StepProfile, NORM_PARTIALS_MAX,
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
    pub(super) fn compute(
        &self,
        op: &'static str,
        kernel: impl FnOnce() + Send + 'static,
    ) -> Result<()> {
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
pub(super) unsafe fn view<T>(buf: &Buf) -> &[T] {
    // SAFETY: per this function's contract.
    unsafe { std::slice::from_raw_parts(buf.ptr() as *const T, buf.len()) }
}

/// The buffer's elements as a mutable slice.
///
/// # Safety
/// As [`view`], and no other slice of these bytes exists while this one lives (`disjoint`
/// checked it for the job's other operands; the queues order every other user).
#[allow(clippy::mut_from_ref)]
pub(super) unsafe fn view_mut<T>(buf: &Buf) -> &mut [T] {
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

    fn launch(&self, op: Checked<'_>) -> Result<()> {
        self.launch_op(op)
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
        use crate::backend::{GeluBackward, GeluForward, GradMode, MatmulForward, ResidualForward};
        let dev = device(1 << 20);
        let a = dev.arena().alloc("a", F32, 64).unwrap();
        let dyn_dev: &dyn Device = &dev;
        // Overlapping output and input.
        let err = dyn_dev
            .run(GeluBackward {
                dinp: &a.slice(0, 32).unwrap(),
                dinp_mode: GradMode::Overwrite,
                inp: &a.slice(16, 32).unwrap(),
                dout: &a.slice(32, 32).unwrap(),
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlaps"), "{err}");
        // Wrong sizes name the operand.
        let err = dyn_dev
            .run(MatmulForward {
                out: &a,
                inp: &a,
                weight: &a,
                bias: None,
                n: 4,
                c: 4,
                oc: 4,
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("matmul_forward") && err.contains("out"),
            "{err}"
        );
        // A view from the dry run never reaches a kernel.
        let phantom = Arena::counting().alloc("phantom", F32, 64).unwrap();
        let err = dyn_dev
            .run(GeluForward {
                out: &a,
                inp: &phantom,
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("dry-run"), "{err}");
        // In place is allowed where the operation says so.
        dyn_dev.run(GeluForward { out: &a, inp: &a }).unwrap();
        let b = dev.arena().alloc("b", F32, 64).unwrap();
        dyn_dev
            .run(ResidualForward {
                out: &a,
                a: &a,
                b: &b,
            })
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
