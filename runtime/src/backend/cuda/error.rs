//! `CudaError`: every failure of the CUDA backend as a value with readable text.

use cudarc::cublas::result::CublasError;
use cudarc::driver::result::DriverError;
use cudarc::nccl::result::NcclError;
use cudarc::nvrtc::result::NvrtcError;

/// Errors of the CUDA backend. Operating errors (no driver, missing library, out of memory,
/// a failed launch) and violated launcher preconditions are both reported here; nothing in
/// the backend panics on them.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver: libcuda.so.1 cannot be loaded ({hint})")]
    NoDriver { hint: String },

    #[error("no usable CUDA device: {message}")]
    NoDevice { message: String },

    #[error("CUDA library {library} not found (searched: {searched}); {hint}")]
    LibraryNotFound {
        library: &'static str,
        searched: String,
        hint: String,
    },

    #[error("CUDA driver call {op} failed: {message}")]
    Driver { op: &'static str, message: String },

    #[error("cuBLAS call {op} failed: {message}")]
    Blas { op: &'static str, message: String },

    #[error("NVRTC could not compile {kernel_file} ({precision}, {arch}): {message}\n{log}")]
    Compile {
        kernel_file: &'static str,
        precision: &'static str,
        arch: String,
        message: String,
        log: String,
    },

    #[error("NVRTC: {message}")]
    Nvrtc { message: String },

    #[error("NCCL call {op} failed: {message}")]
    Nccl { op: &'static str, message: String },

    #[error("{op}: {message}")]
    Precondition { op: &'static str, message: String },

    #[error(
        "out of device memory: the arena needs {requested_bytes} bytes, {free_bytes} of \
         {total_bytes} bytes are free on the device"
    )]
    DeviceOutOfMemory {
        requested_bytes: usize,
        free_bytes: usize,
        total_bytes: usize,
    },

    /// A failure of the shared device layer (arena bounds, a dry-run view).
    #[error(transparent)]
    Device(Box<crate::backend::DeviceError>),

    #[error(
        "kernel {kernel} is not in the loaded module (the .cu sources and launchers disagree)"
    )]
    MissingKernel { kernel: &'static str },
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

impl CudaError {
    /// Maps a driver error to text with the driver's own name and description.
    pub fn driver(op: &'static str, error: DriverError) -> Self {
        let name = error
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", error.0));
        let text = error
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        CudaError::Driver {
            op,
            message: format!("{name}: {text}"),
        }
    }

    pub fn blas(op: &'static str, error: CublasError) -> Self {
        use cudarc::cublas::sys::cublasStatus_t as S;
        let text = match error.0 {
            S::CUBLAS_STATUS_NOT_INITIALIZED => "cuBLAS not initialized (no device or driver?)",
            S::CUBLAS_STATUS_ALLOC_FAILED => "cuBLAS could not allocate memory",
            S::CUBLAS_STATUS_INVALID_VALUE => "invalid value (shape, leading dimension, pointer)",
            S::CUBLAS_STATUS_ARCH_MISMATCH => "operation not supported on this GPU architecture",
            S::CUBLAS_STATUS_MAPPING_ERROR => "GPU memory mapping error",
            S::CUBLAS_STATUS_EXECUTION_FAILED => "kernel failed to execute",
            S::CUBLAS_STATUS_INTERNAL_ERROR => "internal cuBLAS error",
            S::CUBLAS_STATUS_NOT_SUPPORTED => "combination of types/parameters not supported",
            _ => "",
        };
        CudaError::Blas {
            op,
            message: format!("{:?} {text}", error.0),
        }
    }

    pub fn nvrtc(error: NvrtcError) -> Self {
        CudaError::Nvrtc {
            message: format!("{error}"),
        }
    }

    /// `NcclError` has no Display in cudarc 0.19: map the code ourselves.
    pub fn nccl(op: &'static str, error: NcclError) -> Self {
        use cudarc::nccl::sys::ncclResult_t as R;
        let text = match error.0 {
            R::ncclSuccess => "success",
            R::ncclUnhandledCudaError => "a CUDA call inside NCCL failed",
            R::ncclSystemError => "a system call failed (network, shared memory, /dev/shm size?)",
            R::ncclInternalError => "internal NCCL error",
            R::ncclInvalidArgument => "invalid argument (buffer, count, datatype, root)",
            R::ncclInvalidUsage => "invalid usage (e.g. two ranks on one GPU)",
            R::ncclRemoteError => "a remote rank failed or disconnected",
            R::ncclInProgress => "operation still in progress",
            R::ncclNumResults => "unknown NCCL result",
        };
        CudaError::Nccl {
            op,
            message: format!("{:?}: {text}", error.0),
        }
    }

    pub fn precondition(op: &'static str, message: impl Into<String>) -> Self {
        CudaError::Precondition {
            op,
            message: message.into(),
        }
    }
}

/// `Err(CudaError::Precondition)` unless `cond` holds; the message is built only on failure.
pub fn ensure(cond: bool, op: &'static str, message: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(CudaError::precondition(op, message()))
    }
}

impl From<crate::backend::DeviceError> for CudaError {
    fn from(e: crate::backend::DeviceError) -> Self {
        CudaError::Device(Box::new(e))
    }
}

/// The seam's error for a CUDA failure: no CUDA type crosses into the engine's API.
impl From<CudaError> for crate::backend::DeviceError {
    fn from(e: CudaError) -> Self {
        use crate::backend::DeviceError;
        match e {
            CudaError::Device(inner) => *inner,
            CudaError::DeviceOutOfMemory {
                requested_bytes,
                free_bytes,
                total_bytes,
            } => DeviceError::OutOfMemory {
                backend: "cuda",
                requested_bytes,
                available_bytes: free_bytes,
                limit: format!("free memory of the GPU ({total_bytes} bytes in all)"),
            },
            e @ (CudaError::NoDriver { .. }
            | CudaError::NoDevice { .. }
            | CudaError::LibraryNotFound { .. }
            | CudaError::Nvrtc { .. }
            | CudaError::Compile { .. }) => DeviceError::Unavailable {
                backend: "cuda",
                message: e.to_string(),
            },
            CudaError::Precondition { op, message } => DeviceError::Op { op, message },
            other => DeviceError::Op {
                op: "cuda",
                message: other.to_string(),
            },
        }
    }
}
