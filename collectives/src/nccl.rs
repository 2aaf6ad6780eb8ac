//! The `nccl` backend through cudarc (dynamic loading, so it builds without CUDA). Device-buffer
//! collectives enqueue on the communicator's stream; the host-slice `Communicator` methods stage
//! through device memory and wait with a timeout.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys as nccl_sys};

use crate::comm::{check_lengths, Communicator};
use crate::elem::DType;
use crate::error::{CommError, Result};
use crate::store::StoreClient;
use crate::Backend;

/// Why the NCCL backend cannot run here, or None when it can (driver, libnccl and a GPU present).
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: is_culib_present only tries to dlopen the library candidates.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no CUDA driver (libcuda.so) found".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Some(
            "libnccl.so not found by the loader (cudarc looks for libnccl.so, not libnccl.so.2: \
             put a directory with a libnccl.so symlink on LD_LIBRARY_PATH)"
                .into(),
        );
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver reports no GPU".into()),
        Err(e) => Some(format!("the CUDA driver failed to count devices: {e:?}")),
    }
}

fn nccl_code(e: &nccl::NcclError) -> String {
    let hint = match e.0 {
        nccl_sys::ncclResult_t::ncclUnhandledCudaError => "a CUDA call inside NCCL failed",
        nccl_sys::ncclResult_t::ncclSystemError => "a system call failed (network, shared memory)",
        nccl_sys::ncclResult_t::ncclInternalError => "NCCL internal error",
        nccl_sys::ncclResult_t::ncclInvalidArgument => "invalid argument",
        nccl_sys::ncclResult_t::ncclInvalidUsage => "invalid usage",
        nccl_sys::ncclResult_t::ncclRemoteError => "a remote rank failed",
        _ => "unexpected status",
    };
    format!("{:?} ({hint})", e.0)
}

/// An owned `ncclComm_t`; aborted on drop, errors ignored (Drop never panics).
struct RawComm(nccl_sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls are not concurrent;
// every use goes through `NcclCommunicator::lock`.
unsafe impl Send for RawComm {}
// SAFETY: as above.
unsafe impl Sync for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful ncclCommInitRank and is dropped once.
        let _ = unsafe { nccl::comm_abort(self.0) };
    }
}

/// A rank of an NCCL communicator bound to one GPU and one stream.
pub struct NcclCommunicator {
    rank: usize,
    world: usize,
    timeout: Duration,
    // Field order is drop order: the communicator before its stream and context.
    comm: RawComm,
    stream: Arc<CudaStream>,
    _context: Arc<CudaContext>,
    lock: Mutex<()>,
    store: Arc<StoreClient>,
}

impl NcclCommunicator {
    /// Binds GPU `local_rank % device_count`, exchanges the unique id through the store, inits the communicator.
    pub(crate) fn new(
        store: Arc<StoreClient>,
        rank: usize,
        world: usize,
        local_rank: usize,
        timeout: Duration,
    ) -> Result<Self> {
        if let Some(why) = unavailable_reason() {
            return Err(CommError::NcclUnavailable(why));
        }
        let err = |op: &'static str| move |detail: String| CommError::Nccl { rank, op, detail };
        let devices = CudaContext::device_count()
            .map_err(|e| err("init")(format!("{e:?}")))?
            .max(1) as usize;
        let context =
            CudaContext::new(local_rank % devices).map_err(|e| err("init")(format!("{e:?}")))?;
        let stream = context
            .new_stream()
            .map_err(|e| err("init")(format!("{e:?}")))?;
        let id_bytes: Vec<u8> = if rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| err("get_unique_id")(nccl_code(&e)))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            store.set("nccl/id", &bytes)?;
            bytes
        } else {
            store.wait_get("nccl/id", 0)?
        };
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            return Err(err("init")(format!(
                "unique id of {} bytes from the store",
                id_bytes.len()
            )));
        }
        for (d, s) in internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        let id = nccl_sys::ncclUniqueId { internal };
        let mut comm = std::mem::MaybeUninit::<nccl_sys::ncclComm_t>::uninit();
        let (world_i32, rank_i32) = (
            i32::try_from(world).map_err(|_| err("init")("world size over i32".into()))?,
            i32::try_from(rank).map_err(|_| err("init")("rank over i32".into()))?,
        );
        context
            .bind_to_thread()
            .map_err(|e| err("init")(format!("{e:?}")))?;
        // SAFETY: `comm` is a valid out-pointer; the id is the one rank 0 generated.
        unsafe { nccl::comm_init_rank(comm.as_mut_ptr(), world_i32, id, rank_i32) }
            .map_err(|e| err("comm_init_rank")(nccl_code(&e)))?;
        // SAFETY: comm_init_rank succeeded, so it wrote the handle.
        let comm = RawComm(unsafe { comm.assume_init() });
        Ok(Self {
            rank,
            world,
            timeout,
            comm,
            stream,
            _context: context,
            lock: Mutex::new(()),
            store,
        })
    }

    /// The stream NCCL work is enqueued on; order compute streams against it with events.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits (bounded by `dist.timeout`) for the work enqueued so far on the NCCL stream.
    pub fn synchronize(&self, op: &'static str) -> Result<()> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| self.error(op, format!("{e:?}")))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.error(op, format!("{e:?}"))),
            }
            if Instant::now() >= deadline {
                let gone = self
                    .store
                    .closed_ranks(Duration::from_millis(200))
                    .ok()
                    .and_then(|c| c.into_iter().find(|&r| r != self.rank));
                return Err(match gone {
                    Some(peer) => CommError::PeerGone {
                        rank: self.rank,
                        peer,
                        op,
                        detail: "its rendezvous connection closed".into(),
                    },
                    None => self.error(
                        op,
                        format!(
                            "not complete after {:?}; NCCL does not say which rank is missing",
                            self.timeout
                        ),
                    ),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn error(&self, op: &'static str, detail: String) -> CommError {
        CommError::Nccl {
            rank: self.rank,
            op,
            detail,
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enqueues an in-place sum all-reduce of `count` elements at device address `ptr` on
    /// `stream` (the caller's stream, e.g. an engine's communication queue), so the caller orders
    /// it against its own work with events. bf16 is summed by NCCL in bf16.
    ///
    /// # Safety
    /// `ptr` must be a device allocation of at least `count` elements of `dtype` in this
    /// communicator's device (primary context), live until the work enqueued on `stream`
    /// completes; `stream` must be a live stream of that context.
    pub unsafe fn all_reduce_on_stream(
        &self,
        ptr: u64,
        count: usize,
        dtype: DType,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        let _g = self.guard();
        // SAFETY: the caller's contract: a live allocation of `count` elements, a live stream.
        unsafe {
            nccl::all_reduce(
                ptr as *const std::ffi::c_void,
                ptr as *mut std::ffi::c_void,
                count,
                nccl_dtype(dtype),
                nccl_sys::ncclRedOp_t::ncclSum,
                self.comm.0,
                stream as _,
            )
        }
        .map(|_| ())
        .map_err(|e| self.error("all_reduce", nccl_code(&e)))
    }

    /// Enqueues `recv (world·count) = concat over ranks of send (count)` on `stream`.
    ///
    /// # Safety
    /// As [`Self::all_reduce_on_stream`], for `send` (count elements) and `recv` (world·count
    /// elements), which must not overlap except as NCCL's in-place layout allows.
    pub unsafe fn all_gather_on_stream(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        let _g = self.guard();
        // SAFETY: the caller's contract: live allocations of the sizes above, a live stream.
        unsafe {
            nccl::all_gather(
                send as *const std::ffi::c_void,
                recv as *mut std::ffi::c_void,
                count,
                nccl_dtype(dtype),
                self.comm.0,
                stream as _,
            )
        }
        .map(|_| ())
        .map_err(|e| self.error("all_gather", nccl_code(&e)))
    }

    /// Enqueues a sum `recv (count) = (Σ over ranks of send (world·count))[rank·count..]` on
    /// `stream`.
    ///
    /// # Safety
    /// As [`Self::all_gather_on_stream`], with `send` of world·count and `recv` of count
    /// elements.
    pub unsafe fn reduce_scatter_on_stream(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        let _g = self.guard();
        // SAFETY: the caller's contract: live allocations of the sizes above, a live stream.
        unsafe {
            nccl::reduce_scatter(
                send as *const std::ffi::c_void,
                recv as *mut std::ffi::c_void,
                count,
                nccl_dtype(dtype),
                nccl_sys::ncclRedOp_t::ncclSum,
                self.comm.0,
                stream as _,
            )
        }
        .map(|_| ())
        .map_err(|e| self.error("reduce_scatter", nccl_code(&e)))
    }

    fn raw_all_gather<T>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
        count: usize,
        ty: nccl_sys::ncclDataType_t,
    ) -> Result<()> {
        let _g = self.guard();
        let (src, _s) = send.device_ptr(&self.stream);
        let (dst, _d) = recv.device_ptr_mut(&self.stream);
        // SAFETY: both pointers are live device allocations of the checked lengths, ordered on our stream.
        unsafe {
            nccl::all_gather(
                src as _,
                dst as _,
                count,
                ty,
                self.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map(|_| ())
        .map_err(|e| self.error("all_gather", nccl_code(&e)))
    }

    fn raw_reduce_scatter<T>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
        count: usize,
        ty: nccl_sys::ncclDataType_t,
    ) -> Result<()> {
        let _g = self.guard();
        let (src, _s) = send.device_ptr(&self.stream);
        let (dst, _d) = recv.device_ptr_mut(&self.stream);
        // SAFETY: as in raw_all_gather.
        unsafe {
            nccl::reduce_scatter(
                src as _,
                dst as _,
                count,
                ty,
                nccl_sys::ncclRedOp_t::ncclSum,
                self.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map(|_| ())
        .map_err(|e| self.error("reduce_scatter", nccl_code(&e)))
    }

    fn raw_all_reduce<T>(
        &self,
        buf: &mut CudaSlice<T>,
        count: usize,
        ty: nccl_sys::ncclDataType_t,
    ) -> Result<()> {
        let _g = self.guard();
        let (ptr, _p) = buf.device_ptr_mut(&self.stream);
        // SAFETY: in-place all-reduce on a live allocation of `count` elements.
        unsafe {
            nccl::all_reduce(
                ptr as _,
                ptr as _,
                count,
                ty,
                nccl_sys::ncclRedOp_t::ncclSum,
                self.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map(|_| ())
        .map_err(|e| self.error("all_reduce", nccl_code(&e)))
    }

    /// In-place broadcast of the bytes of `buf` from `root`.
    fn raw_broadcast(&self, buf: &mut CudaSlice<u8>, root: usize) -> Result<()> {
        let _g = self.guard();
        let count = buf.len();
        let (ptr, _p) = buf.device_ptr_mut(&self.stream);
        let root =
            i32::try_from(root).map_err(|_| self.error("broadcast", "root over i32".into()))?;
        // SAFETY: in-place broadcast of the `count` bytes of a live allocation.
        unsafe {
            nccl::broadcast(
                ptr as _,
                ptr as _,
                count,
                nccl_sys::ncclDataType_t::ncclUint8,
                root,
                self.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map(|_| ())
        .map_err(|e| self.error("broadcast", nccl_code(&e)))
    }

    fn upload(&self, op: &'static str, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        self.stream
            .clone_htod(bytes)
            .map_err(|e| self.error(op, format!("{e:?}")))
    }

    fn download(&self, op: &'static str, src: &CudaSlice<u8>, dst: &mut [u8]) -> Result<()> {
        self.synchronize(op)?;
        self.stream
            .memcpy_dtoh(src, dst)
            .map_err(|e| self.error(op, format!("{e:?}")))?;
        self.synchronize(op)
    }
}

fn check_root(root: usize, world: usize) -> Result<()> {
    if root < world {
        Ok(())
    } else {
        Err(CommError::InvalidArgument {
            op: "broadcast",
            detail: format!("root {root} is not a rank of a world of {world}"),
        })
    }
}

fn nccl_dtype(dtype: DType) -> nccl_sys::ncclDataType_t {
    match dtype {
        DType::F32 => nccl_sys::ncclDataType_t::ncclFloat32,
        DType::Bf16 => nccl_sys::ncclDataType_t::ncclBfloat16,
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> Backend {
        Backend::Nccl
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_gather_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_lengths("all_gather", self.world, dtype, send.len(), recv.len())?;
        let src = self.upload("all_gather", send)?;
        let mut dst = self.upload("all_gather", recv)?;
        self.raw_all_gather(
            &src,
            &mut dst,
            send.len() / dtype.size_bytes(),
            nccl_dtype(dtype),
        )?;
        self.download("all_gather", &dst, recv)
    }

    fn reduce_scatter_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_lengths("reduce_scatter", self.world, dtype, send.len(), recv.len())?;
        let src = self.upload("reduce_scatter", send)?;
        let mut dst = self.upload("reduce_scatter", recv)?;
        self.raw_reduce_scatter(
            &src,
            &mut dst,
            recv.len() / dtype.size_bytes(),
            nccl_dtype(dtype),
        )?;
        self.download("reduce_scatter", &dst, recv)
    }

    fn all_reduce_bytes(&self, dtype: DType, buf: &mut [u8]) -> Result<()> {
        check_lengths("all_reduce", self.world, dtype, buf.len(), buf.len())?;
        let mut dev = self.upload("all_reduce", buf)?;
        self.raw_all_reduce(&mut dev, buf.len() / dtype.size_bytes(), nccl_dtype(dtype))?;
        self.download("all_reduce", &dev, buf)
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world)?;
        let mut dev = self.upload("broadcast", buf)?;
        self.raw_broadcast(&mut dev, root)?;
        self.download("broadcast", &dev, buf)
    }

    fn barrier(&self) -> Result<()> {
        let mut token = [0u8; 4];
        self.all_reduce_bytes(DType::F32, &mut token)
    }

    fn as_dyn(&self) -> &dyn Communicator {
        self
    }

    fn as_nccl(&self) -> Option<&NcclCommunicator> {
        Some(self)
    }
}
