//! Rotary position embeddings (Su et al. 2021) on the query and key heads of a packed qkv, in
//! transformers' "rotate half" convention.

use crate::backend::AttentionShape;
use rayon::prelude::*;

/// Rotates the NH query and NKV key heads of every token of qkv (B,T,(NH+2·NKV)·HS) in place by
/// the angles of its position t (cos, sin (≥T, HS/2)); by minus them with `inverse`.
pub fn rotary(qkv: &mut [f32], cos: &[f32], sin: &[f32], s: AttentionShape, inverse: bool) {
    let (hs, half) = (s.hs, s.hs / 2);
    let width = s.qkv_width();
    assert!(hs % 2 == 0 && qkv.len() == s.qkv_len());
    assert!(cos.len() >= s.t * half && sin.len() >= s.t * half);
    let rotated = (s.nh + s.nkv) * hs;
    qkv.par_chunks_mut(width)
        .enumerate()
        .for_each(|(bt, token)| {
            let pos = bt % s.t;
            let (cos, sin) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
            for head in token[..rotated].chunks_exact_mut(hs) {
                let (x1, x2) = head.split_at_mut(half);
                rotate(x1, x2, cos, sin, inverse);
            }
        });
}

/// (x1, x2) ← (x1·cos − x2·sin, x2·cos + x1·sin), sin negated when `inverse`. Written as
/// transformers computes q·cos + rotate_half(q)·sin: two products, then one sum.
fn rotate(x1: &mut [f32], x2: &mut [f32], cos: &[f32], sin: &[f32], inverse: bool) {
    let sign = if inverse { -1.0 } else { 1.0 };
    for i in 0..x1.len() {
        let (a, b) = (x1[i], x2[i]);
        let s = sign * sin[i];
        x1[i] = a * cos[i] + (-b) * s;
        x2[i] = b * cos[i] + a * s;
    }
}
