//! `strata doctor`: one screen that says what strata found on this machine and what to fix.
//!
//! `collect` never fails and never panics: every probe turns its failure into text. It uses
//! the CUDA backend's loader (`crate::backend::cuda::loader`) for library discovery, so what
//! doctor reports is exactly what training will load. Exit status is the caller's job
//! (`DoctorReport::needs_fix`); a machine without a GPU is not a failure.

use std::fmt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::backend::cuda::loader::{self, CudaLibrary, LibraryStatus};

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// e.g. "sm_90".
    pub arch: String,
    pub total_bytes: usize,
    pub free_bytes: Option<usize>,
}

/// O_DIRECT and space on one configured NVMe/offload path.
#[derive(Debug, Clone)]
pub struct PathCheck {
    pub path: PathBuf,
    /// Ok(()) when the path is a directory in which a file can be written with O_DIRECT.
    pub o_direct: Result<(), String>,
    /// The free space of the path's file system, when it is a directory.
    pub free_bytes: Option<u64>,
}

/// Everything `strata doctor` found.
#[derive(Debug, Clone)]
pub struct DoctorReport {
    /// Ok(devices) when the driver answered (possibly zero devices); Err(why) otherwise.
    pub gpus: Result<Vec<GpuInfo>, String>,
    pub libraries: Vec<LibraryStatus>,
    /// Value of /proc/sys/kernel/io_uring_disabled (0 = enabled), when readable.
    pub io_uring_disabled: Option<u32>,
    /// Ok(()) when io_uring_setup succeeded in this process.
    pub io_uring: Result<(), String>,
    pub paths: Vec<PathCheck>,
    /// (soft, hard) RLIMIT_MEMLOCK in bytes; None = unlimited.
    pub memlock_bytes: (Option<u64>, Option<u64>),
    pub is_root: bool,
    pub mem_available_bytes: Option<u64>,
    pub mem_total_bytes: Option<u64>,
    /// Scratch directories of strata processes that are gone (swap files, launcher files), removed.
    pub swept: Vec<strata_collectives::scratch::Swept>,
    /// Things that must be fixed before strata can use what is configured.
    pub fixes: Vec<String>,
    /// Advice that does not block anything.
    pub notes: Vec<String>,
}

impl DoctorReport {
    /// True when something must be fixed (the CLI exits non-zero then).
    pub fn needs_fix(&self) -> bool {
        !self.fixes.is_empty()
    }

    pub fn has_gpu(&self) -> bool {
        self.gpus.as_ref().is_ok_and(|g| !g.is_empty())
    }
}

/// Probes the machine; `paths` are the configured offload/NVMe paths (files or directories).
pub fn collect(paths: &[PathBuf]) -> DoctorReport {
    let libraries = loader::load_all().to_vec();
    let gpus = probe_gpus();
    let io_uring_disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mut report = DoctorReport {
        gpus,
        libraries,
        io_uring_disabled,
        io_uring: probe_io_uring(),
        paths: paths.iter().map(|p| probe_path(p)).collect(),
        memlock_bytes: memlock(),
        // SAFETY: geteuid has no preconditions and cannot fail.
        is_root: unsafe { libc::geteuid() } == 0,
        mem_available_bytes: meminfo_kib(&meminfo, "MemAvailable:").map(|k| k * 1024),
        mem_total_bytes: meminfo_kib(&meminfo, "MemTotal:").map(|k| k * 1024),
        swept: strata_collectives::scratch::sweep_all(),
        fixes: Vec::new(),
        notes: Vec::new(),
    };
    diagnose(&mut report);
    report
}

fn probe_gpus() -> Result<Vec<GpuInfo>, String> {
    if !loader::driver_present() {
        return Err("no NVIDIA driver (libcuda.so.1 cannot be loaded)".into());
    }
    cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
    let mut gpus = Vec::new();
    for ordinal in 0..usize::try_from(count).unwrap_or(0) {
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| format!("GPU {ordinal}: cannot create a context: {e:?}"))?;
        let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
        gpus.push(GpuInfo {
            ordinal,
            name: ctx.name().unwrap_or_else(|_| "unknown".into()),
            arch: format!("sm_{major}{minor}"),
            total_bytes: ctx.total_mem().unwrap_or(0),
            free_bytes: ctx.mem_get_info().ok().map(|(free, _)| free),
        });
    }
    Ok(gpus)
}

fn probe_io_uring() -> Result<(), String> {
    // struct io_uring_params is 120 bytes; zeroed means "defaults".
    let mut params = [0u32; 30];
    // SAFETY: io_uring_setup(entries, params) reads/writes exactly the 120-byte params struct,
    // which `params` provides; the returned fd (if any) is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: fd is a file descriptor this function just opened and owns.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// An offload path is a directory that exists (strata does not make it, so that a missing mount is
/// not filled instead): O_DIRECT is tried by writing a file there, and its free space read.
fn probe_path(path: &Path) -> PathCheck {
    let (o_direct, free_bytes) = match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let probe = path.join(format!(".strata-doctor-{}", std::process::id()));
            let result = write_o_direct(&probe);
            let _ = std::fs::remove_file(&probe);
            (result, crate::outputs::free_bytes(path).ok())
        }
        Ok(meta) => (
            Err(format!(
                "is {}; an offload path must be a directory",
                crate::inputs::kind_of(meta.file_type())
            )),
            None,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
            Err("does not exist (strata does not create it: make the directory, or mount the drive)".into()),
            None,
        ),
        Err(e) => (Err(format!("cannot read its metadata: {e}")), None),
    };
    PathCheck {
        path: path.to_path_buf(),
        o_direct,
        free_bytes,
    }
}

/// Creates `file` with O_DIRECT and writes one aligned 4 KiB block.
fn write_o_direct(file: &Path) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .map_err(|e| format!("open with O_DIRECT: {e}"))?;
    #[repr(C, align(4096))]
    struct Block([u8; 4096]);
    let block = Block([0u8; 4096]);
    f.write_all(&block.0)
        .map_err(|e| format!("4 KiB O_DIRECT write: {e}"))
}

fn memlock() -> (Option<u64>, Option<u64>) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a valid out-pointer for one rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } != 0 {
        return (Some(0), Some(0));
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t differs between targets
    let lim = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v as u64);
    (lim(rl.rlim_cur), lim(rl.rlim_max))
}

fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn lib(report: &DoctorReport, library: CudaLibrary) -> Option<&LibraryStatus> {
    report.libraries.iter().find(|l| l.library == library)
}

fn diagnose(r: &mut DoctorReport) {
    let has_gpu = r.has_gpu();
    if has_gpu {
        for library in [
            CudaLibrary::Nvrtc,
            CudaLibrary::Cublas,
            CudaLibrary::CublasLt,
        ] {
            if lib(r, library).is_none_or(|s| s.path.is_none()) {
                r.fixes.push(format!(
                    "{} not found: install the CUDA 13 toolkit libraries and set CUDA_HOME, or add \
                     their directory (e.g. /usr/local/cuda/targets/x86_64-linux/lib) to LD_LIBRARY_PATH",
                    library.name()
                ));
            }
        }
        if !loader::cudarc_can_load(CudaLibrary::Nccl) {
            r.notes.push(format!(
                "NCCL is not loadable by cudarc (needed for multi-GPU and selftest --gpu): {}",
                loader::nccl_hint()
            ));
        }
        if loader::include_search_dirs().is_empty() {
            r.notes.push("CUDA headers (cuda_bf16.h) not found for NVRTC: set CUDA_HOME or STRATA_CUDA_INCLUDE".into());
        }
    } else if let Ok(gpus) = &r.gpus {
        if gpus.is_empty() {
            r.notes
                .push("the driver reports no GPU; strata will use the CPU backend".into());
        }
    }
    match (&r.io_uring, r.io_uring_disabled) {
        (Ok(()), _) => {}
        (Err(e), Some(d)) if d != 0 => r.notes.push(format!(
            "io_uring unavailable ({e}; kernel.io_uring_disabled = {d}): NVMe offload falls back to a \
             thread pool; `sysctl kernel.io_uring_disabled=0` enables it"
        )),
        (Err(e), _) => r.notes.push(format!(
            "io_uring unavailable ({e}): NVMe offload falls back to a thread pool (seccomp/container?)"
        )),
    }
    for p in &r.paths {
        if let Err(e) = &p.o_direct {
            r.fixes
                .push(format!("offload path {}: {e}", p.path.display()));
        }
    }
    if !r.is_root {
        if let Some(soft) = r.memlock_bytes.0 {
            if soft < (1 << 30) {
                r.notes.push(format!(
                    "RLIMIT_MEMLOCK is {}: io_uring registered buffers count against it; raise it \
                     (`ulimit -l unlimited`, or memlock in /etc/security/limits.conf)",
                    bytes(soft)
                ));
            }
        }
    }
}

fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "strata doctor")?;
        match &self.gpus {
            Err(why) => writeln!(
                f,
                "  {:<18} none: {why}; strata runs on the CPU backend",
                "GPU"
            )?,
            Ok(gpus) if gpus.is_empty() => {
                writeln!(f, "  {:<18} none: the driver reports no device", "GPU")?
            }
            Ok(gpus) => {
                for g in gpus {
                    let free = g
                        .free_bytes
                        .map(|b| format!(", {} free", bytes(b as u64)))
                        .unwrap_or_default();
                    writeln!(
                        f,
                        "  {:<18} {}, {}, {} total{free}",
                        format!("GPU {}", g.ordinal),
                        g.name,
                        g.arch,
                        bytes(g.total_bytes as u64)
                    )?;
                }
            }
        }
        for s in &self.libraries {
            let label = if s.library == CudaLibrary::Driver {
                "driver".to_string()
            } else {
                s.library.name().to_string()
            };
            match &s.path {
                Some(path) => {
                    let how = if s.preloaded {
                        "  (not on the loader path: pre-loaded by strata)"
                    } else {
                        ""
                    };
                    writeln!(
                        f,
                        "  {label:<18} {:<8} {}{how}",
                        s.version.as_deref().unwrap_or("-"),
                        path.display()
                    )?
                }
                None => writeln!(
                    f,
                    "  {label:<18} not found ({})",
                    s.error.as_deref().unwrap_or("not probed")
                )?,
            }
        }
        let searched: Vec<String> = loader::library_search_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        if !searched.is_empty() {
            writeln!(f, "  {:<18} {}", "lib dirs", searched.join(":"))?;
        }
        let disabled = self
            .io_uring_disabled
            .map(|d| format!(" (kernel.io_uring_disabled = {d})"))
            .unwrap_or_default();
        match &self.io_uring {
            Ok(()) => writeln!(f, "  {:<18} ok{disabled}", "io_uring")?,
            Err(e) => writeln!(f, "  {:<18} unavailable: {e}{disabled}", "io_uring")?,
        }
        if self.paths.is_empty() {
            writeln!(f, "  {:<18} no offload paths configured", "O_DIRECT")?;
        }
        for p in &self.paths {
            let free = p
                .free_bytes
                .map(|b| format!(", {} free", bytes(b)))
                .unwrap_or_default();
            match &p.o_direct {
                Ok(()) => writeln!(f, "  {:<18} {}: ok{free}", "O_DIRECT", p.path.display())?,
                Err(e) => writeln!(
                    f,
                    "  {:<18} {}: FAILED: {e}{free}",
                    "O_DIRECT",
                    p.path.display()
                )?,
            }
        }
        match self.swept.len() {
            0 => writeln!(
                f,
                "  {:<18} none left by ended processes",
                "$TMPDIR scratch"
            )?,
            n => writeln!(
                f,
                "  {:<18} removed {n} director{} left by ended strata processes ({}): {}",
                "$TMPDIR scratch",
                if n == 1 { "y" } else { "ies" },
                bytes(self.swept.iter().map(|s| s.bytes).sum()),
                self.swept
                    .iter()
                    .map(|s| s.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )?,
        }
        let lim = |v: Option<u64>| v.map(bytes).unwrap_or_else(|| "unlimited".into());
        let root = if self.is_root {
            " (root: not enforced)"
        } else {
            ""
        };
        writeln!(
            f,
            "  {:<18} {} soft / {} hard{root}",
            "memlock",
            lim(self.memlock_bytes.0),
            lim(self.memlock_bytes.1)
        )?;
        match (self.mem_available_bytes, self.mem_total_bytes) {
            (Some(a), Some(t)) => writeln!(
                f,
                "  {:<18} {} available of {}",
                "memory",
                bytes(a),
                bytes(t)
            )?,
            _ => writeln!(f, "  {:<18} unknown (/proc/meminfo unreadable)", "memory")?,
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        for fix in &self.fixes {
            writeln!(f, "FIX:  {fix}")?;
        }
        if self.needs_fix() {
            write!(f, "status: {} thing(s) to fix", self.fixes.len())
        } else if self.has_gpu() {
            write!(f, "status: ok")
        } else {
            write!(f, "status: ok (no GPU: CPU backend)")
        }
    }
}
