//! Decoding with a key/value cache on the CPU, the reference of the CUDA kernels in
//! `kernels/decode.cu`: the new tokens' keys and values written into the cache, and attention of
//! the new tokens' queries against every cached position up to their own.
//!
//! The cache of one layer is k_cache and v_cache (B, NKV, CAP, HS): for each sequence and
//! key/value head, CAP rows of HS elements, row p the key (value) of position p.

use super::attention::softmax_in_place;
use super::fastmath;
use crate::backend::AttentionShape;
use rayon::prelude::*;

/// Rows `pos..pos+T` of each (b, kv head) of the caches ← the key and value heads of the T new
/// tokens of qkv (B, T, (NH+2·NKV)·HS).
pub fn kv_cache_write(
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    qkv: &[f32],
    s: AttentionShape,
    pos: usize,
    capacity: usize,
) {
    let (t, hs, width) = (s.t, s.hs, s.qkv_width());
    let head = capacity * hs;
    assert!(qkv.len() == s.qkv_len() && pos + t <= capacity);
    assert!(k_cache.len() == s.b * s.nkv * head && v_cache.len() == k_cache.len());
    for (part, cache) in [(1, k_cache), (2, v_cache)] {
        cache
            .par_chunks_mut(head)
            .enumerate()
            .for_each(|(bh, rows)| {
                let (b, h) = (bh / s.nkv, bh % s.nkv);
                let at = (s.nh + (part - 1) * s.nkv + h) * hs;
                for ti in 0..t {
                    let src = (b * t + ti) * width + at;
                    rows[(pos + ti) * hs..][..hs].copy_from_slice(&qkv[src..src + hs]);
                }
            });
    }
}

/// out (B, T, NH·HS): for new token i (position pos + i) and query head h,
/// softmax(q·kⱼᵀ/√HS)·vⱼ over the cache rows j ≤ pos + i of key/value head h / (NH/NKV).
pub fn cached_attention(
    out: &mut [f32],
    qkv: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    s: AttentionShape,
    pos: usize,
    capacity: usize,
) {
    let (t, hs, width) = (s.t, s.hs, s.qkv_width());
    let head = capacity * hs;
    assert!(qkv.len() == s.qkv_len() && out.len() == s.out_len() && pos + t <= capacity);
    assert!(k_cache.len() == s.b * s.nkv * head && v_cache.len() == k_cache.len());
    let scale = 1.0 / (hs as f32).sqrt();
    out.par_chunks_mut(hs)
        .enumerate()
        .for_each_init(Vec::new, |scores, (row, y)| {
            // row = (b·T + i)·NH + h
            let (bt, h) = (row / s.nh, row % s.nh);
            let (b, i) = (bt / t, bt % t);
            let q = &qkv[bt * width + h * hs..][..hs];
            let at = (b * s.nkv + h / s.group()) * head;
            let visible = pos + i + 1;
            let (keys, values) = (
                &k_cache[at..][..visible * hs],
                &v_cache[at..][..visible * hs],
            );
            scores.clear();
            scores.extend(keys.chunks_exact(hs).map(|k| fastmath::dot(q, k) * scale));
            softmax_in_place(scores);
            y.fill(0.0);
            for (&p, v) in scores.iter().zip(values.chunks_exact(hs)) {
                for (y, &v) in y.iter_mut().zip(v) {
                    *y += p * v;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::attention_forward;
    use crate::rng::Rng;

    fn shape(b: usize, t: usize) -> AttentionShape {
        AttentionShape {
            b,
            t,
            nh: 4,
            nkv: 2,
            hs: 8,
        }
    }

    /// The training attention's output for all of `qkv`.
    fn full_attention(qkv: &[f32], s: AttentionShape) -> Vec<f32> {
        let mut out = vec![0.0; s.out_len()];
        let (mut qkvr, mut att, mut vaccum) = (
            vec![0.0; s.qkvr_len()],
            vec![0.0; s.scores_len()],
            vec![0.0; s.out_len()],
        );
        attention_forward(&mut out, &mut qkvr, &mut att, &mut vaccum, qkv, s);
        out
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "element {i}: {x} vs {y}");
        }
    }

    /// T new tokens into an empty cache attend as the training attention does.
    #[test]
    fn an_empty_cache_and_t_new_tokens_equal_the_training_attention() {
        let (b, t, cap) = (2, 7, 11);
        let s = shape(b, t);
        let qkv = Rng::new(1).normal_vec(s.qkv_len(), 1.0);
        let len = b * s.nkv * cap * s.hs;
        let (mut k, mut v) = (vec![0.0; len], vec![0.0; len]);
        kv_cache_write(&mut k, &mut v, &qkv, s, 0, cap);
        let mut out = vec![0.0; s.out_len()];
        cached_attention(&mut out, &qkv, &k, &v, s, 0, cap);
        assert_close(&out, &full_attention(&qkv, s), 1e-5);
    }

    /// One token at a time through the cache gives each position's row of the full attention.
    #[test]
    fn tokens_one_at_a_time_equal_the_rows_of_the_training_attention() {
        let (b, t, cap) = (2, 6, 6);
        let s = shape(b, t);
        let qkv = Rng::new(2).normal_vec(s.qkv_len(), 1.0);
        let full = full_attention(&qkv, s);
        let len = b * s.nkv * cap * s.hs;
        let (mut k, mut v) = (vec![f32::NAN; len], vec![f32::NAN; len]);
        let one = shape(b, 1);
        let (w, qw) = (s.qkv_width(), s.q_width());
        for pos in 0..t {
            let step: Vec<f32> = (0..b)
                .flat_map(|bi| qkv[(bi * t + pos) * w..][..w].to_vec())
                .collect();
            kv_cache_write(&mut k, &mut v, &step, one, pos, cap);
            let mut out = vec![0.0; one.out_len()];
            cached_attention(&mut out, &step, &k, &v, one, pos, cap);
            for bi in 0..b {
                let want = &full[(bi * t + pos) * qw..][..qw];
                assert_close(&out[bi * qw..][..qw], want, 1e-5);
            }
        }
    }

    /// Closed form: one cached key with the query's own key equal in score averages the values.
    #[test]
    fn equal_scores_average_the_values() {
        let s = AttentionShape {
            b: 1,
            t: 1,
            nh: 1,
            nkv: 1,
            hs: 2,
        };
        // Cached position 0: key (1, 0), value (2, 4). New token: q = (0, 1), k = (1, 0), v = (6, 8).
        let (mut k, mut v) = (vec![1.0, 0.0, 0.0, 0.0], vec![2.0, 4.0, 0.0, 0.0]);
        let qkv = [0.0, 1.0, 1.0, 0.0, 6.0, 8.0];
        kv_cache_write(&mut k, &mut v, &qkv, s, 1, 2);
        assert_eq!(
            (k.as_slice(), v.as_slice()),
            (&[1.0, 0.0, 1.0, 0.0][..], &[2.0, 4.0, 6.0, 8.0][..])
        );
        let mut out = [0.0; 2];
        cached_attention(&mut out, &qkv, &k, &v, s, 1, 2);
        assert_close(&out, &[4.0, 6.0], 1e-6);
    }
}
