//! The fused attention's CUDA kernels (runtime/kernels/flash_attention.cu) run on the host under
//! runtime/kernels/emu/emu.h — a std::thread per CUDA thread, barriers for __syncthreads, warp
//! shuffles and mma.sync.m16n8k16 computed from their fragments — against a double-precision
//! reference, with no GPU: the scalar kernels in an fp32 build, the scalar and tensor-core kernels
//! (every padded head size) in a bf16 build. It checks the kernels' indexing, tiling, masking,
//! online softmax and fragment bookkeeping; not the PTX fragment layout itself (the emulator
//! assumes the documented one), timing, or anything the GPU compiler adds: `strata selftest --gpu`
//! checks the real thing on a GPU.
//!
//! Needs a C++20 compiler (`c++`, or $CXX); without one the test says so and passes.

use std::path::Path;
use std::process::Command;

fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let ok = Command::new(&cxx)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(cxx)
}

fn build_and_run(cxx: &str, floatx: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emu");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("flash_check_{floatx}"));
    let build = Command::new(cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-fno-strict-aliasing",
            "-pthread",
            "-w",
        ])
        .arg(format!("-DEMU_{floatx}"))
        .arg(dir.join("flash_check.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run the C++ compiler");
    assert!(
        build.status.success(),
        "{cxx} failed on flash_check.cpp ({floatx}):\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe)
        .arg("--quick")
        .output()
        .expect("run flash_check");
    let text = String::from_utf8_lossy(&run.stdout);
    println!("{text}{}", String::from_utf8_lossy(&run.stderr));
    assert!(
        run.status.success() && text.contains("all ok"),
        "the emulated flash kernels ({floatx}) disagree with the reference"
    );
}

#[test]
fn flash_kernels_match_the_reference_under_emulation() {
    let Some(cxx) = compiler() else {
        eprintln!("flash_emu: no C++ compiler (c++ or $CXX): the emulated kernel check is skipped");
        return;
    };
    build_and_run(&cxx, "FP32");
    build_and_run(&cxx, "BF16");
}
