//! AdamW as `torch.optim.AdamW` on the host: bias-corrected moments, eps outside the square root,
//! decoupled decay. The CPU backend's `adamw`, the engine's host optimizer and the reference of the
//! CUDA kernel; the gradient norm's sum of squares beside it.

use super::fastmath::multiversion;
use crate::backend::AdamWHyper;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// One AdamW step over a contiguous slice of parameters (`h.weight_decay` applies to all of them).
pub fn adamw_update(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: &AdamWHyper,
) {
    adamw_update_any(
        params,
        grads,
        Moments::F32(m),
        Moments::F32(v),
        h,
        Cast::None,
    );
}

/// A step's constants: bias corrections and decoupled weight decay.
struct Factors {
    step_size: f32,
    bc2_sqrt: f32,
    decay: f32,
}

impl Factors {
    fn of(h: &AdamWHyper) -> Factors {
        let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
        let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
        Factors {
            step_size: (h.lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            decay: 1.0 - h.lr * h.weight_decay,
        }
    }
}

/// One element's update (torch.optim.AdamW's arithmetic), in f32.
#[inline(always)]
fn adamw_one(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, h: &AdamWHyper, f: &Factors) {
    let g = g * h.grad_scale;
    *m = h.beta1 * *m + (1.0 - h.beta1) * g;
    *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
    let denom = v.sqrt() / f.bc2_sqrt + h.eps;
    *p = *p * f.decay - f.step_size * *m / denom;
}

/// Adam's first or second moments in their storage type.
pub enum Moments<'a> {
    F32(&'a mut [f32]),
    /// bf16 storage (12 instead of 16 bytes of state per parameter); the update computes in f32
    /// and rounds the moments to nearest on store.
    Bf16(&'a mut [half::bf16]),
}

/// Where the updated parameters also go, rounded to the compute type (the device's weights).
pub enum Cast<'a> {
    None,
    Bf16(&'a mut [half::bf16]),
    F16(&'a mut [half::f16]),
}

/// One chunk's share of a [`Cast`].
enum CastChunk<'a> {
    None,
    Bf16(&'a mut [half::bf16]),
    F16(&'a mut [half::f16]),
}

impl<'a> Cast<'a> {
    /// The chunks of `CHUNK` elements of a cast of `n` elements (`n` None chunks for none).
    fn chunks(self, n: usize) -> Vec<CastChunk<'a>> {
        let count = n.div_ceil(CHUNK);
        match self {
            Cast::None => (0..count).map(|_| CastChunk::None).collect(),
            Cast::Bf16(s) => s.chunks_mut(CHUNK).map(CastChunk::Bf16).collect(),
            Cast::F16(s) => s.chunks_mut(CHUNK).map(CastChunk::F16).collect(),
        }
    }

    fn len(&self) -> Option<usize> {
        match self {
            Cast::None => None,
            Cast::Bf16(s) => Some(s.len()),
            Cast::F16(s) => Some(s.len()),
        }
    }
}

impl CastChunk<'_> {
    /// Rounds the chunk's updated parameters into it, while they are in cache.
    fn write(self, p: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            CastChunk::None => {}
            CastChunk::Bf16(out) => out.convert_from_f32_slice(p),
            CastChunk::F16(out) => out.convert_from_f32_slice(p),
        }
    }
}

/// One AdamW step with moments in either storage type (both the same type), writing the updated
/// parameters also to `cast` in the same pass over each chunk.
pub fn adamw_update_any(
    params: &mut [f32],
    grads: &[f32],
    m: Moments<'_>,
    v: Moments<'_>,
    h: &AdamWHyper,
    cast: Cast<'_>,
) {
    assert!(cast.len().is_none_or(|n| n == params.len()));
    let f = Factors::of(h);
    let casts = cast.chunks(params.len());
    match (m, v) {
        (Moments::F32(m), Moments::F32(v)) => {
            by_chunks(params, grads, m, v, casts, |p, g, m, v| {
                adamw_chunk(p, g, m, v, h, &f)
            })
        }
        (Moments::Bf16(m), Moments::Bf16(v)) => {
            by_chunks(params, grads, m, v, casts, |p, g, m, v| {
                adamw_chunk_bf16(p, g, m, v, h, &f)
            })
        }
        _ => panic!("adamw_update_any: m and v must share a storage type"),
    }
}

/// `update` over each chunk of `CHUNK` elements in parallel, then the chunk's cast.
fn by_chunks<M: Send>(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [M],
    v: &mut [M],
    casts: Vec<CastChunk<'_>>,
    update: impl Fn(&mut [f32], &[f32], &mut [M], &mut [M]) + Sync,
) {
    assert!(grads.len() == params.len() && m.len() == params.len() && v.len() == params.len());
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .zip(casts)
        .for_each(|(((p, g), (m, v)), out)| {
            update(p, g, m, v);
            out.write(p);
        });
}

/// One chunk with bf16-stored moments: the update reads the f32 moments; they are stored rounded
/// to nearest.
fn adamw_chunk_bf16(
    p: &mut [f32],
    g: &[f32],
    m: &mut [half::bf16],
    v: &mut [half::bf16],
    h: &AdamWHyper,
    f: &Factors,
) {
    for i in 0..p.len() {
        let (mut mi, mut vi) = (m[i].to_f32(), v[i].to_f32());
        adamw_one(&mut p[i], g[i], &mut mi, &mut vi, h, f);
        m[i] = half::bf16::from_f32(mi);
        v[i] = half::bf16::from_f32(vi);
    }
}

multiversion! {
    fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamWHyper, f: &Factors) {
        for i in 0..p.len() {
            adamw_one(&mut p[i], g[i], &mut m[i], &mut v[i], h, f);
        }
    }
}

/// Σ x² in f64, summed in chunk order (the same bits whatever the thread scheduling).
pub fn sum_of_squares(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>())
        .collect();
    partials.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_closed_form_of_first_two_steps() {
        // With constant gradient g, m̂ = g and v̂ = g² at every step, so each step moves by lr·g/(|g| + eps)
        // after decay.
        let h = AdamWHyper {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.5,
            step: 1,
            grad_scale: 1.0,
        };
        let (mut p, g) = (vec![1.0f32, -2.0], vec![0.5f32, -3.0]);
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        adamw_update(&mut p, &g, &mut m, &mut v, &h);
        let want: Vec<f32> = [1.0f32, -2.0]
            .iter()
            .zip(&g)
            .map(|(p, g)| p * 0.95 - 0.1 * g / (g.abs() + 1e-8))
            .collect();
        assert!(
            (p[0] - want[0]).abs() < 1e-6 && (p[1] - want[1]).abs() < 1e-6,
            "{p:?} vs {want:?}"
        );
        let before = p.clone();
        adamw_update(
            &mut p,
            &g,
            &mut m,
            &mut v,
            &AdamWHyper {
                step: 2,
                weight_decay: 0.0,
                ..h
            },
        );
        for i in 0..2 {
            let want = before[i] - 0.1 * g[i] / (g[i].abs() + 1e-8);
            assert!((p[i] - want).abs() < 1e-5, "{} vs {want}", p[i]);
        }
    }
}
