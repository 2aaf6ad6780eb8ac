//! GELU (tanh form, as GPT-2) and residual additions.

use super::fastmath::{self, multiversion};
use rayon::prelude::*;

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2/π)
const CHUNK: usize = 1 << 14;

/// out = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            o.copy_from_slice(x);
            gelu_chunk(o)
        });
}

/// x = gelu(x).
pub fn gelu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(gelu_chunk);
}

multiversion! {
    fn gelu_chunk(xs: &mut [f32]) {
        for v in xs.iter_mut() {
            let x = *v;
            let cube = 0.044715 * x * x * x;
            *v = 0.5 * x * (1.0 + fastmath::tanh(GELU_SCALE * (x + cube)));
        }
    }
}

/// dinp = gelu'(x) · dout (`+=` with `accumulate`).
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32], accumulate: bool) {
    assert!(dinp.len() == inp.len() && dout.len() == inp.len());
    dinp.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK).zip(dout.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| {
            if !accumulate {
                dx.fill(0.0);
            }
            gelu_backward_chunk(dx, x, dy)
        });
}

multiversion! {
    fn gelu_backward_chunk(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        for ((dx, &x), &dy) in dinp.iter_mut().zip(inp).zip(dout) {
            let cube = 0.044715 * x * x * x;
            let tanh = fastmath::tanh(GELU_SCALE * (x + cube));
            let sech2 = 1.0 - tanh * tanh;
            let local = 0.5 * (1.0 + tanh) + x * 0.5 * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x);
            *dx += local * dy;
        }
    }
}

/// out = a + b.
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(out.len() == a.len() && a.len() == b.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            o.iter_mut()
                .zip(a.iter().zip(b))
                .for_each(|(o, (a, b))| *o = a + b)
        });
}

/// acc += x.
pub fn add_into(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len());
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, x)| *a += x));
}

/// out (N, I) = silu(gate) ⊙ up for rows [gate (I) | up (I)] of inp (N, 2I).
pub fn swiglu_forward(out: &mut [f32], inp: &[f32], i: usize) {
    assert!(i > 0 && inp.len() == 2 * out.len() && out.len() % i == 0);
    out.par_chunks_mut(i)
        .zip(inp.par_chunks(2 * i))
        .for_each(|(o, row)| {
            let (gate, up) = row.split_at(i);
            swiglu_row(o, gate, up)
        });
}

multiversion! {
    fn swiglu_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + fastmath::exp(-g)) * u;
        }
    }
}

/// dinp (N, 2I) = [dgate | dup] of dout (N, I) at inp (N, 2I): dup = dout ⊙ silu(gate),
/// dgate = dout ⊙ up ⊙ σ(gate)·(1 + gate·(1 − σ(gate))).
pub fn swiglu_backward(dinp: &mut [f32], dout: &[f32], inp: &[f32], i: usize) {
    assert!(i > 0 && inp.len() == 2 * dout.len() && dinp.len() == inp.len() && dout.len() % i == 0);
    dinp.par_chunks_mut(2 * i)
        .zip(inp.par_chunks(2 * i).zip(dout.par_chunks(i)))
        .for_each(|(d, (row, dy))| {
            let (dgate, dup) = d.split_at_mut(i);
            let (gate, up) = row.split_at(i);
            swiglu_backward_row(dgate, dup, dy, gate, up)
        });
}

multiversion! {
    fn swiglu_backward_row(dgate: &mut [f32], dup: &mut [f32], dy: &[f32], gate: &[f32], up: &[f32]) {
        for k in 0..dy.len() {
            let g = gate[k];
            let sig = 1.0 / (1.0 + fastmath::exp(-g));
            dup[k] = dy[k] * g * sig;
            dgate[k] = dy[k] * up[k] * sig * (1.0 + g * (1.0 - sig));
        }
    }
}
