//! Finding the CUDA libraries at run time.
//!
//! cudarc loads libcuda, libnvrtc, libcublas(Lt) and libnccl with `dlopen` by bare file name,
//! so they must be on the loader's search path. On a stock CUDA install libcublas.so.13 is
//! not in the loader cache (it lives in /usr/local/cuda/targets/x86_64-linux/lib), and
//! LD_LIBRARY_PATH cannot be changed after the process started. So strata pre-loads each
//! missing library by absolute path from the usual places (`library_search_dirs`) with
//! RTLD_GLOBAL and keeps it loaded: glibc's later `dlopen("libcublas.so.13")` then matches the
//! already-loaded object by its SONAME and cudarc finds it.
//!
//! Exception: cudarc asks for `libnccl.so` (not `libnccl.so.2`), which a pre-loaded
//! `libnccl.so.2` does not satisfy; where only the versioned name exists, the fix is a
//! directory with a `libnccl.so` symlink on LD_LIBRARY_PATH (`nccl_hint` says so).

use std::ffi::{c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::error::{CudaError, Result};

/// A CUDA library strata uses, with the file names tried in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaLibrary {
    Driver,
    NvrtcBuiltins,
    Nvrtc,
    CublasLt,
    Cublas,
    Nccl,
}

impl CudaLibrary {
    /// Pre-load order: dependencies first (builtins before nvrtc, cublasLt before cublas).
    pub const ALL: [CudaLibrary; 6] = [
        CudaLibrary::Driver,
        CudaLibrary::NvrtcBuiltins,
        CudaLibrary::Nvrtc,
        CudaLibrary::CublasLt,
        CudaLibrary::Cublas,
        CudaLibrary::Nccl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CudaLibrary::Driver => "libcuda",
            CudaLibrary::NvrtcBuiltins => "libnvrtc-builtins",
            CudaLibrary::Nvrtc => "libnvrtc",
            CudaLibrary::CublasLt => "libcublasLt",
            CudaLibrary::Cublas => "libcublas",
            CudaLibrary::Nccl => "libnccl",
        }
    }

    fn file_names(self) -> &'static [&'static str] {
        match self {
            CudaLibrary::Driver => &["libcuda.so.1", "libcuda.so"],
            CudaLibrary::NvrtcBuiltins => &["libnvrtc-builtins.so.13.0", "libnvrtc-builtins.so.13"],
            CudaLibrary::Nvrtc => &["libnvrtc.so.13", "libnvrtc.so"],
            CudaLibrary::CublasLt => &["libcublasLt.so.13", "libcublasLt.so"],
            CudaLibrary::Cublas => &["libcublas.so.13", "libcublas.so"],
            CudaLibrary::Nccl => &["libnccl.so", "libnccl.so.2"],
        }
    }

    /// A symbol every version of the library exports (used to find its path and version).
    fn probe_symbol(self) -> Option<&'static str> {
        match self {
            CudaLibrary::Driver => Some("cuDriverGetVersion"),
            CudaLibrary::NvrtcBuiltins => None,
            CudaLibrary::Nvrtc => Some("nvrtcVersion"),
            CudaLibrary::CublasLt => Some("cublasLtGetVersion"),
            CudaLibrary::Cublas => Some("cublasGetProperty"),
            CudaLibrary::Nccl => Some("ncclGetVersion"),
        }
    }
}

/// What the loader found for one library.
#[derive(Debug, Clone)]
pub struct LibraryStatus {
    pub library: CudaLibrary,
    /// Path of the loaded object, or None when it could not be loaded.
    pub path: Option<PathBuf>,
    /// True when strata had to pre-load it by absolute path (it was not on the search path).
    pub preloaded: bool,
    /// Version as text ("13.0.88", "2.28.3", driver "13.0"), when the library reports one.
    pub version: Option<String>,
    /// Why it could not be loaded (dlerror of the last attempt).
    pub error: Option<String>,
}

/// Directories searched for CUDA libraries not on the loader path, in order:
/// $STRATA_CUDA_LIB_DIR (colon-separated), $CUDA_HOME / $CUDA_PATH / $CUDA_ROOT
/// (targets/x86_64-linux/lib, lib64, lib), /usr/local/cuda (same), and the lib dir beside
/// $STRATA_CUDA_INCLUDE (the pip-wheel layout nvidia/cu13/{lib,include}).
pub fn library_search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(v) = std::env::var_os("STRATA_CUDA_LIB_DIR") {
        dirs.extend(std::env::split_paths(&v));
    }
    for root in cuda_roots() {
        dirs.push(root.join("targets/x86_64-linux/lib"));
        dirs.push(root.join("lib64"));
        dirs.push(root.join("lib"));
    }
    if let Some(inc) = std::env::var_os("STRATA_CUDA_INCLUDE") {
        if let Some(parent) = Path::new(&inc).parent() {
            dirs.push(parent.join("lib"));
        }
    }
    dedup_existing(dirs)
}

/// Directories that may hold `cuda_bf16.h` for NVRTC, in order: $STRATA_CUDA_INCLUDE,
/// $CUDA_HOME / $CUDA_PATH / $CUDA_ROOT / /usr/local/cuda (include, targets/x86_64-linux/include),
/// and the include dir beside the loaded libnvrtc (pip-wheel layout).
pub fn include_search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(v) = std::env::var_os("STRATA_CUDA_INCLUDE") {
        dirs.extend(std::env::split_paths(&v));
    }
    for root in cuda_roots() {
        dirs.push(root.join("include"));
        dirs.push(root.join("targets/x86_64-linux/include"));
    }
    if let Some(path) = status(CudaLibrary::Nvrtc).path.as_ref() {
        if let Some(lib_dir) = path.parent() {
            dirs.push(lib_dir.join("../include"));
        }
    }
    dedup_existing(dirs)
        .into_iter()
        .filter(|d| d.join("cuda_bf16.h").is_file())
        .collect()
}

fn cuda_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

fn dedup_existing(dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let d = d.canonicalize().unwrap_or(d);
        if d.is_dir() && !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// Loads (once per process) every CUDA library that is present, pre-loading from
/// `library_search_dirs` what the loader path lacks, and returns what was found.
pub fn load_all() -> &'static [LibraryStatus] {
    static STATUS: OnceLock<Vec<LibraryStatus>> = OnceLock::new();
    STATUS.get_or_init(|| CudaLibrary::ALL.iter().map(|&lib| load(lib)).collect())
}

/// Status of one library (loads all of them on first use).
pub fn status(library: CudaLibrary) -> LibraryStatus {
    load_all()
        .iter()
        .find(|s| s.library == library)
        .cloned()
        .unwrap_or(LibraryStatus {
            library,
            path: None,
            preloaded: false,
            version: None,
            error: Some("not probed".into()),
        })
}

/// Ok(path) when `library` is loaded; otherwise an error that says what to set.
pub fn require(library: CudaLibrary) -> Result<PathBuf> {
    let s = status(library);
    if let Some(path) = s.path {
        return Ok(path);
    }
    let searched: Vec<String> = library_search_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    let searched = if searched.is_empty() {
        "the loader path only (no CUDA_HOME, no /usr/local/cuda)".to_string()
    } else {
        format!("the loader path, {}", searched.join(", "))
    };
    if library == CudaLibrary::Driver {
        return Err(CudaError::NoDriver {
            hint: "install the NVIDIA driver, or run with device = \"cpu\"".into(),
        });
    }
    let hint = match library {
        CudaLibrary::Nccl => nccl_hint(),
        _ => "set CUDA_HOME to the CUDA 13 toolkit, or add its lib dir (e.g. \
              /usr/local/cuda/targets/x86_64-linux/lib) to LD_LIBRARY_PATH"
            .to_string(),
    };
    Err(CudaError::LibraryNotFound {
        library: library.name(),
        searched,
        hint,
    })
}

/// How to make libnccl loadable when only `libnccl.so.2` exists.
pub fn nccl_hint() -> String {
    "cudarc looks for libnccl.so, not libnccl.so.2: mkdir -p ~/.strata/lib && \
     ln -sf $(ldconfig -p | awk '/libnccl.so.2 /{print $NF; exit}') ~/.strata/lib/libnccl.so \
     && export LD_LIBRARY_PATH=~/.strata/lib:$LD_LIBRARY_PATH"
        .to_string()
}

/// True when libcuda can be loaded, checked through cudarc's own loader so that a later
/// `CudaContext::new` does not panic.
pub fn driver_present() -> bool {
    // The driver first, alone: without one no other CUDA library is loaded, so a run on the CPU
    // does not map NVRTC or cuBLAS (tens of MiB of resident memory) just to find out.
    if load(CudaLibrary::Driver).path.is_none() {
        return false;
    }
    let _ = load_all();
    // SAFETY: is_culib_present only tries dlopen on candidate names and drops the handles.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cudarc's own loader can now load NVRTC / cuBLAS / cuBLASLt (after pre-loading).
pub fn cudarc_can_load(library: CudaLibrary) -> bool {
    let _ = load_all();
    // SAFETY: each is_culib_present only tries dlopen on candidate names and drops the handles.
    unsafe {
        match library {
            CudaLibrary::Driver => cudarc::driver::sys::is_culib_present(),
            CudaLibrary::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            CudaLibrary::Cublas => cudarc::cublas::sys::is_culib_present(),
            CudaLibrary::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
            CudaLibrary::Nccl => cudarc::nccl::sys::is_culib_present(),
            CudaLibrary::NvrtcBuiltins => status(library).path.is_some(),
        }
    }
}

fn load(library: CudaLibrary) -> LibraryStatus {
    let mut last_error = None;
    for name in library.file_names() {
        match dlopen_global(name) {
            Ok(handle) => return loaded(library, handle, false),
            Err(e) => last_error = Some(e),
        }
    }
    // The driver must come from the loader path: /usr/local/cuda/lib64/stubs holds a stub
    // libcuda that would load and then fail every call, so it is never searched.
    if library != CudaLibrary::Driver {
        for dir in library_search_dirs() {
            for name in library.file_names() {
                let candidate = dir.join(name);
                if !candidate.is_file() {
                    continue;
                }
                match dlopen_global(&candidate.to_string_lossy()) {
                    Ok(handle) => {
                        tracing::debug!(path = %candidate.display(), "pre-loaded CUDA library");
                        return loaded(library, handle, true);
                    }
                    Err(e) => last_error = Some(e),
                }
            }
        }
    }
    LibraryStatus {
        library,
        path: None,
        preloaded: false,
        version: None,
        error: last_error,
    }
}

fn loaded(library: CudaLibrary, handle: *mut c_void, preloaded: bool) -> LibraryStatus {
    let symbol = library.probe_symbol().and_then(|name| dlsym(handle, name));
    let path = symbol
        .and_then(object_path_of)
        .or_else(|| mapped_path(library.file_names()[0]));
    let version = symbol.and_then(|sym| version_of(library, sym));
    // The handle is intentionally never closed: the library stays loaded for the process,
    // which is what lets cudarc's later dlopen by SONAME find it.
    LibraryStatus {
        library,
        path,
        preloaded,
        version,
        error: None,
    }
}

fn dlopen_global(name: &str) -> std::result::Result<*mut c_void, String> {
    let cname = CString::new(name).map_err(|_| format!("bad library name {name:?}"))?;
    // SAFETY: cname is a valid NUL-terminated string; dlopen has no other preconditions.
    // Loading runs the library's initializers, which is what using it requires anyway.
    let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        Err(last_dl_error())
    } else {
        Ok(handle)
    }
}

fn last_dl_error() -> String {
    // SAFETY: dlerror returns null or a pointer to a NUL-terminated string owned by libc,
    // valid until the next dl* call on this thread; it is copied at once.
    unsafe {
        let msg = libc::dlerror();
        if msg.is_null() {
            "unknown dlopen error".to_string()
        } else {
            CStr::from_ptr(msg).to_string_lossy().into_owned()
        }
    }
}

fn dlsym(handle: *mut c_void, name: &str) -> Option<*mut c_void> {
    let cname = CString::new(name).ok()?;
    // SAFETY: handle came from a successful dlopen and is never closed; cname is valid.
    let sym = unsafe { libc::dlsym(handle, cname.as_ptr()) };
    (!sym.is_null()).then_some(sym)
}

fn object_path_of(symbol: *mut c_void) -> Option<PathBuf> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: symbol is an address inside a loaded object; info is a valid out-pointer.
    let ok = unsafe { libc::dladdr(symbol, info.as_mut_ptr()) };
    if ok == 0 {
        return None;
    }
    // SAFETY: dladdr succeeded, so info is initialized; dli_fname is null or a C string
    // owned by the loader for as long as the object stays loaded (forever here).
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: see above.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    let path = PathBuf::from(name.to_string_lossy().into_owned());
    Some(path.canonicalize().unwrap_or(path))
}

/// Path of a mapped object whose file name starts with `prefix` (from /proc/self/maps).
fn mapped_path(prefix: &str) -> Option<PathBuf> {
    let stem = prefix.split(".so").next().unwrap_or(prefix);
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&format!("{stem}.so")))
        })
}

type IntOut = unsafe extern "C" fn(*mut c_int) -> c_int;
type IntIntOut = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type PropertyOut = unsafe extern "C" fn(c_int, *mut c_int) -> c_int;
type SizeRet = unsafe extern "C" fn() -> usize;

fn version_of(library: CudaLibrary, symbol: *mut c_void) -> Option<String> {
    // SAFETY: `symbol` was looked up by the exact exported name whose C signature is the
    // one transmuted to here (CUDA/NCCL public headers); the calls only write ints.
    unsafe {
        match library {
            CudaLibrary::Driver => {
                let f: IntOut = std::mem::transmute::<*mut c_void, IntOut>(symbol);
                let mut v: c_int = 0;
                (f(&mut v) == 0).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
            }
            CudaLibrary::Nvrtc => {
                let f: IntIntOut = std::mem::transmute::<*mut c_void, IntIntOut>(symbol);
                let (mut major, mut minor): (c_int, c_int) = (0, 0);
                (f(&mut major, &mut minor) == 0).then(|| format!("{major}.{minor}"))
            }
            CudaLibrary::Cublas => {
                let f: PropertyOut = std::mem::transmute::<*mut c_void, PropertyOut>(symbol);
                let mut parts = [0 as c_int; 3];
                for (i, p) in parts.iter_mut().enumerate() {
                    if f(i as c_int, p) != 0 {
                        return None;
                    }
                }
                Some(format!("{}.{}.{}", parts[0], parts[1], parts[2]))
            }
            CudaLibrary::CublasLt => {
                let f: SizeRet = std::mem::transmute::<*mut c_void, SizeRet>(symbol);
                let v = f();
                Some(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
            }
            CudaLibrary::Nccl => {
                let f: IntOut = std::mem::transmute::<*mut c_void, IntOut>(symbol);
                let mut v: c_int = 0;
                (f(&mut v) == 0).then(|| format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
            }
            CudaLibrary::NvrtcBuiltins => None,
        }
    }
}
