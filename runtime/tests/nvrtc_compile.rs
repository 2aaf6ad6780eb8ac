//! Compiles every kernel source in runtime/kernels through NVRTC for sm_90, for each precision
//! (bf16, fp16, fp32), through the same code path the CUDA backend uses at run time. Needs
//! libnvrtc and the CUDA headers, not a GPU: `scripts/install-nvrtc.sh` installs both from pip
//! into .venv-nvrtc, which this test finds by itself.
//!
//! The compile test is `#[ignore]`d, so a plain `cargo test` on a machine without NVRTC reports it as
//! ignored rather than passed; `.ci/run` installs NVRTC and runs it with `--include-ignored`, where a
//! missing NVRTC is a failure. The other tests here read the sources only and always run.

use std::path::{Path, PathBuf};

use strata::backend::cuda::loader::{self, CudaLibrary};
use strata::backend::cuda::nvrtc::{compile_file, KERNEL_FILES};
use strata::backend::cuda::Precision;

const ARCH: &str = "sm_90";

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// Points STRATA_CUDA_INCLUDE at the repo's .venv-nvrtc when nothing else is configured, so
/// `cargo test` works right after scripts/install-nvrtc.sh without exporting anything.
fn use_repo_venv_if_present() {
    if std::env::var_os("STRATA_CUDA_INCLUDE").is_some() {
        return;
    }
    let venv_lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-nvrtc/lib");
    let Ok(entries) = std::fs::read_dir(&venv_lib) else {
        return;
    };
    for entry in entries.flatten() {
        let include = entry.path().join("site-packages/nvidia/cu13/include");
        if include.join("cuda_bf16.h").is_file() {
            // Set before the loader first runs; tests in this file only read it.
            std::env::set_var("STRATA_CUDA_INCLUDE", &include);
            return;
        }
    }
}

/// Panics, saying how to install it, when NVRTC cannot be loaded.
fn require_nvrtc() {
    use_repo_venv_if_present();
    match loader::require(CudaLibrary::Nvrtc) {
        Ok(path) if loader::cudarc_can_load(CudaLibrary::Nvrtc) => {
            eprintln!("nvrtc_compile: using {}", path.display());
        }
        Ok(path) => panic!(
            "libnvrtc at {} is not loadable by name: put its directory on LD_LIBRARY_PATH \
             (eval \"$(scripts/install-nvrtc.sh --env)\")",
            path.display()
        ),
        Err(e) => panic!(
            "NVRTC is needed for this test: {e}\n  run `eval \"$(scripts/install-nvrtc.sh --env)\"` \
             (pip wheels, no GPU needed), then run it again"
        ),
    }
}

#[test]
fn every_kernel_file_is_embedded() {
    let mut on_disk: Vec<String> = std::fs::read_dir(kernels_dir())
        .expect("runtime/kernels exists")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = KERNEL_FILES.iter().map(|(n, _, _)| n.to_string()).collect();
    embedded.sort();
    assert_eq!(
        on_disk, embedded,
        "every runtime/kernels/*.cu must be listed in backend/cuda/nvrtc.rs KERNEL_FILES"
    );
}

#[test]
#[ignore = "needs NVRTC: eval \"$(scripts/install-nvrtc.sh --env)\", then cargo test -p strata --test nvrtc_compile -- --include-ignored (.ci/run does)"]
fn every_kernel_compiles_for_sm90_in_every_precision() {
    require_nvrtc();
    let mut failures = Vec::new();
    for precision in Precision::ALL {
        for (file, _, entries) in KERNEL_FILES {
            let started = std::time::Instant::now();
            match compile_file(file, precision, ARCH) {
                Ok(ptx) => {
                    let text = ptx.to_src();
                    let missing: Vec<&str> = entries
                        .iter()
                        .copied()
                        .filter(|e| !text.contains(&format!(".entry {e}(")))
                        .collect();
                    if missing.is_empty() {
                        eprintln!(
                            "nvrtc_compile: ok   {file:<16} {:<5} {ARCH} {:>5} ms, {} kernels",
                            precision.name(),
                            started.elapsed().as_millis(),
                            entries.len()
                        );
                    } else {
                        failures.push(format!(
                            "{file} ({}): no entry {missing:?}",
                            precision.name()
                        ));
                    }
                }
                Err(e) => failures.push(format!("{e}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "NVRTC failures:\n{}",
        failures.join("\n")
    );
}

/// Every kernel name the Rust launchers pass (a literal, or the `let op = "…"` of a launcher that
/// launches `op`) is an entry point of some .cu file: a mismatch is otherwise only found on a
/// GPU, when the launch fails with MissingKernel.
#[test]
fn every_launched_kernel_name_is_an_entry_point() {
    let entries: Vec<&str> = KERNEL_FILES
        .iter()
        .flat_map(|(_, _, e)| e.iter().copied())
        .collect();
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/cuda");
    let launchers = [
        "launch(",
        "launch_ptrs_ints(",
        "launch_elementwise(",
        "launch_rows(",
        "launch_attention(",
        "launch_shared(",
    ];
    let mut checked = 0;
    let mut unknown = Vec::new();
    for file in ["kernels.rs", "layers.rs", "attention.rs", "flash.rs"] {
        let text = std::fs::read_to_string(src_dir.join(file)).expect("readable source");
        // Each launcher's `op` is local to its function.
        for chunk in text.split("fn ") {
            let op = chunk
                .split("let op = \"")
                .nth(1)
                .and_then(|rest| rest.split('"').next());
            let mut names: Vec<&str> = Vec::new();
            for launcher in launchers {
                for call in chunk.split(launcher).skip(1) {
                    let arg = call.trim_start().trim_start_matches('(');
                    if let Some(lit) = arg.strip_prefix('"') {
                        names.extend(lit.split('"').next());
                        // (name, name_vec) pairs of launch_attention.
                        if let Some(second) = lit.split("\", \"").nth(1) {
                            names.extend(second.split('"').next());
                        }
                    } else if let Some(rest) = arg.strip_prefix("op,") {
                        names.extend(op);
                        // launch_elementwise(op, "name_vec", …)
                        if let Some(lit) = rest.trim_start().strip_prefix('"') {
                            names.extend(lit.split('"').next());
                        }
                    }
                }
            }
            for name in names {
                checked += 1;
                if !entries.contains(&name) {
                    unknown.push(format!("{file}: {name}"));
                }
            }
        }
    }
    assert!(
        checked > 20,
        "found only {checked} launched names: the scan is broken"
    );
    assert!(
        unknown.is_empty(),
        "launched but not an entry point: {unknown:?}"
    );
}
