//! NVRTC compilation of the kernel sources in runtime/kernels, embedded with `include_str!`.
//!
//! One translation unit per kernel file and precision:
//! `#define STRATA_FLOATX_<P>` + common.cuh + `<file>.cu`. PTX is compiled once per process and
//! (precision, arch) and cached; each `GpuContext` loads the cached PTX into its own modules.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::error::{CudaError, Result};
use super::loader::{self, CudaLibrary};
use super::Precision;

/// Prepended to every kernel file (shared typedefs, conversions, reductions).
pub const COMMON_SOURCE: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel file: (file name, source, kernel entry points it defines).
pub const KERNEL_FILES: &[(&str, &str, &[&str])] = &[
    (
        "encoder.cu",
        include_str!("../../../kernels/encoder.cu"),
        &[
            "encoder_forward",
            "encoder_backward_wpe",
            "encoder_backward_wte",
        ],
    ),
    (
        "layernorm.cu",
        include_str!("../../../kernels/layernorm.cu"),
        &["layernorm_forward", "layernorm_backward"],
    ),
    (
        "gelu.cu",
        include_str!("../../../kernels/gelu.cu"),
        &[
            "gelu_forward",
            "gelu_backward",
            "gelu_forward_vec",
            "gelu_backward_vec",
        ],
    ),
    (
        "attention.cu",
        include_str!("../../../kernels/attention.cu"),
        &[
            "attention_permute",
            "attention_permute_backward",
            "attention_unpermute",
            "attention_unpermute_backward",
            "attention_softmax_forward",
            "attention_softmax_backward",
            "attention_permute_vec",
            "attention_permute_backward_vec",
            "attention_unpermute_vec",
            "attention_unpermute_backward_vec",
        ],
    ),
    (
        "flash_attention.cu",
        include_str!("../../../kernels/flash_attention.cu"),
        super::flash::FLASH_KERNEL_NAMES,
    ),
    (
        "rmsnorm.cu",
        include_str!("../../../kernels/rmsnorm.cu"),
        &["rmsnorm_forward", "rmsnorm_backward"],
    ),
    (
        "decode.cu",
        include_str!("../../../kernels/decode.cu"),
        &["kv_cache_write", "cached_attention"],
    ),
    (
        "rotary.cu",
        include_str!("../../../kernels/rotary.cu"),
        &["rotary"],
    ),
    (
        "swiglu.cu",
        include_str!("../../../kernels/swiglu.cu"),
        &["swiglu_forward", "swiglu_backward"],
    ),
    (
        "crossentropy.cu",
        include_str!("../../../kernels/crossentropy.cu"),
        &["crossentropy_forward_backward"],
    ),
    (
        "residual.cu",
        include_str!("../../../kernels/residual.cu"),
        &[
            "residual_forward",
            "accumulate",
            "add_bias",
            "bias_backward",
            "residual_forward_vec",
            "accumulate_vec",
            "add_bias_vec",
        ],
    ),
    (
        "cast.cu",
        include_str!("../../../kernels/cast.cu"),
        &[
            "cast_f32_to_x",
            "cast_x_to_f32",
            "accumulate_x_to_f32",
            "scale_f32",
            "add_f32",
        ],
    ),
    (
        "norm.cu",
        include_str!("../../../kernels/norm.cu"),
        &[
            "norm_squared_partial_f32",
            "norm_squared_partial_x",
            "norm_squared_finalize",
        ],
    ),
    (
        "adamw.cu",
        include_str!("../../../kernels/adamw.cu"),
        &["adamw_update"],
    ),
];

/// The full translation unit NVRTC compiles for one kernel file at `precision`; `#line`
/// directives keep compiler messages pointing at the right file and line.
pub fn translation_unit(file_name: &str, file_source: &str, precision: Precision) -> String {
    format!(
        "#define {}\n#line 1 \"common.cuh\"\n{COMMON_SOURCE}\n#line 1 \"{file_name}\"\n{file_source}\n",
        super::nvrtc_define(precision)
    )
}

/// NVRTC options: the architecture (e.g. "sm_90"), C++17, and the include dirs for cuda_bf16.h.
pub fn compile_options(arch: &str, include_dirs: &[std::path::PathBuf]) -> CompileOptions {
    CompileOptions {
        include_paths: include_dirs
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect(),
        options: vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".to_string(),
        ],
        ..Default::default()
    }
}

/// Compiles one kernel file for `precision` and `arch`. Needs libnvrtc and the CUDA headers,
/// not a GPU.
pub fn compile_file(file: &'static str, precision: Precision, arch: &str) -> Result<Ptx> {
    loader::require(CudaLibrary::Nvrtc)?;
    if !loader::cudarc_can_load(CudaLibrary::Nvrtc) {
        return Err(CudaError::Nvrtc {
            message: "libnvrtc was found but cudarc cannot load it by name; add its directory \
                      to LD_LIBRARY_PATH"
                .into(),
        });
    }
    let source = KERNEL_FILES
        .iter()
        .find(|(name, _, _)| *name == file)
        .map(|(_, src, _)| *src)
        .ok_or(CudaError::MissingKernel { kernel: file })?;
    let include_dirs = loader::include_search_dirs();
    if include_dirs.is_empty() {
        return Err(CudaError::Nvrtc {
            message: "cuda_bf16.h not found: set CUDA_HOME, or STRATA_CUDA_INCLUDE to a directory \
                      holding the CUDA headers (scripts/install-nvrtc.sh prints one)"
                .into(),
        });
    }
    let mut opts = compile_options(arch, &include_dirs);
    opts.name = Some(file.to_string());
    cudarc::nvrtc::compile_ptx_with_opts(translation_unit(file, source, precision), opts).map_err(
        |e| {
            let (message, log) = match e {
                CompileError::CompileError { nvrtc, log, .. } => {
                    (format!("{nvrtc}"), log.to_string_lossy().into_owned())
                }
                other => (format!("{other}"), String::new()),
            };
            CudaError::Compile {
                kernel_file: file,
                precision: precision.name(),
                arch: arch.to_string(),
                message,
                log,
            }
        },
    )
}

/// PTX of every kernel file for (precision, arch), compiled once per process.
pub fn compiled_ptx(precision: Precision, arch: &str) -> Result<Vec<(&'static str, Ptx)>> {
    type Cache = Mutex<HashMap<(Precision, String), Vec<(&'static str, Ptx)>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (precision, arch.to_string());
    {
        let guard = cache.lock().unwrap_or_else(|poison| poison.into_inner());
        if let Some(ptx) = guard.get(&key) {
            return Ok(ptx.clone());
        }
    }
    let started = std::time::Instant::now();
    let mut out = Vec::with_capacity(KERNEL_FILES.len());
    for (file, _, _) in KERNEL_FILES {
        out.push((*file, compile_file(file, precision, arch)?));
    }
    tracing::info!(
        precision = precision.name(),
        arch,
        files = out.len(),
        ms = started.elapsed().as_millis() as u64,
        "compiled CUDA kernels with NVRTC"
    );
    let mut guard = cache.lock().unwrap_or_else(|poison| poison.into_inner());
    guard.insert(key, out.clone());
    Ok(out)
}
