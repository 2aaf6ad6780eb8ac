//! Helpers of the parity tests against PyTorch fixtures (`tests/fixtures`): each test file that
//! uses them declares `mod common;`.

use std::path::PathBuf;
use strata::Engine;

/// A file under `runtime/tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// max |a − b| / max |b|: the error relative to the tensor's scale.
pub fn rel_diff(name: &str, got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let scale = want
        .iter()
        .map(|b| (*b as f64).abs())
        .fold(0.0, f64::max)
        .max(1e-30);
    let rel = max_diff / scale;
    println!("{name:<42} maxdiff {max_diff:.3e}  rel {rel:.3e}");
    rel
}

/// A tensor of per-unit flat buffers (`Engine::params` / `Engine::grads`) in the reference's
/// (Hugging Face) layout: padding rows dropped, Conv1D weights transposed.
pub fn hf_layout(engine: &Engine, units: &[Vec<f32>], name: &str) -> Vec<f32> {
    for (unit, data) in engine.units().iter().zip(units) {
        for (spec, range) in unit.tensors.iter().zip(unit.ranges()) {
            if spec.name == name {
                let data = &data[range.start..range.start + spec.numel()];
                if !spec.stored_transposed {
                    return data.to_vec();
                }
                let (rows, cols) = (spec.shape[0], spec.shape[1]);
                let mut t = vec![0.0; data.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        t[c * rows + r] = data[r * cols + c];
                    }
                }
                return t;
            }
        }
    }
    panic!("no tensor {name} in the engine")
}
