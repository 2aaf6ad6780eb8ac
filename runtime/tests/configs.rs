//! Every shipped config in `configs/` loads and plans (the GPU-only ones cannot be trained here, so a typo
//! or a setting the engine refuses in one would otherwise surface on a lent GPU machine), and the two
//! CPU-offload configs of `bench/gpu_check.sh` plan as their comments say on an 80 GB GPU with 120 GiB of
//! host memory: parameters and optimizer states on pinned host memory at ZeRO stage 3, fitting both.

use std::path::{Path, PathBuf};
use std::process::Command;
use strata::backend::Backend;
use strata::config::{Config, DeviceKind};
use strata::engine::placement::Capacities;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_config_in_the_configs_folder_loads() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("configs"))
        .expect("configs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    for f in &files {
        let c = Config::load(Some(f), &[]).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        // The engine's own checks before it allocates (head sizes the GPU's attention takes, the
        // gathered-parameter budget, the placements): on the backend the config names, or the GPU
        // for "auto", since these configs are for GPU machines.
        let backend = match c.train.device {
            DeviceKind::Cpu => Backend::Cpu,
            DeviceKind::Cuda | DeviceKind::Auto => Backend::Cuda,
        };
        let plans = strata::engine::plan_placements(&c, 1, backend, &Capacities::default())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(!plans.is_empty(), "{}: no placement", f.display());
    }
}

#[test]
fn the_offload_configs_put_parameters_and_optimizer_on_pinned_host_memory_and_fit_an_80_gb_gpu() {
    for (file, params) in [
        ("configs/gpt-1.3b-offload-cpu.toml", "1313722368 parameters"),
        ("configs/gpt-6.7b-offload-cpu.toml", "6654402560 parameters"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .current_dir(root())
            .args([
                "plan",
                file,
                "--device-memory",
                "79GiB",
                "--host-memory",
                "120GiB",
            ])
            .output()
            .expect("run strata plan");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{file}:\n{text}");
        for want in [
            params,
            "cuda backend",
            "placement for ZeRO stage 3 at world size 1: parameters on cpu, optimizer states on cpu",
            "(pinned)",
            "fits this machine",
        ] {
            assert!(text.contains(want), "{file}: no {want:?} in\n{text}");
        }
    }
}
