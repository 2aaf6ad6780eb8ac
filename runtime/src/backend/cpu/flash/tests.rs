//! The fused attention against the materialized one (the same math, another order of
//! operations), against a naive logsumexp, and against finite differences of its own forward.

use super::*;
use crate::backend::cpu::attention::{attention_backward, attention_forward};
use crate::rng::Rng;

/// max |a − b| / max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-30);
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    diff / scale
}

/// Forward output and dqkv of both implementations (dqkv starts from the same nonzero values:
/// both accumulate).
struct Both {
    out: [Vec<f32>; 2],
    dqkv: [Vec<f32>; 2],
    lse: Vec<f32>,
}

fn run_both(s: AttentionShape, seed: u64) -> Both {
    let mut rng = Rng::new(seed);
    let btc = s.out_len();
    let qkv = rng.normal_vec(s.qkv_len(), 1.5);
    let dout = rng.normal_vec(btc, 1.0);
    let base = rng.normal_vec(s.qkv_len(), 1.0);

    let (mut out_m, mut att) = (vec![0.0; btc], vec![0.0; s.scores_len()]);
    let (mut qkvr, mut vaccum) = (vec![0.0; s.qkvr_len()], vec![0.0; btc]);
    attention_forward(&mut out_m, &mut qkvr, &mut att, &mut vaccum, &qkv, s);
    let mut dqkv_m = base.clone();
    let (mut datt, mut dqkvr) = (vec![0.0; s.scores_len()], vec![0.0; s.qkvr_len()]);
    let mut dvaccum = vec![0.0; btc];
    attention_backward(
        &mut dqkv_m,
        &dout,
        &qkvr,
        &att,
        &mut dqkvr,
        &mut datt,
        &mut dvaccum,
        s,
    );

    let (mut out_f, mut lse) = (vec![f32::NAN; btc], vec![f32::NAN; s.rows_len()]);
    flash_forward(&mut out_f, &mut lse, &qkv, s);
    let mut dqkv_f = base;
    let mut delta = vec![f32::NAN; s.rows_len()];
    flash_backward(&mut dqkv_f, &mut delta, &dout, &qkv, &out_f, &lse, s);
    Both {
        out: [out_f, out_m],
        dqkv: [dqkv_f, dqkv_m],
        lse,
    }
}

#[test]
fn fused_matches_materialized_forward_and_backward() {
    // (B, T, C, NH): T = 1, T below, at and past one tile and not a multiple of it, several
    // tiles with a ragged last one; head sizes 1, 4, 8, 16, 32, 64, 128.
    const {
        assert!(
            TILE == 128,
            "the shapes below are chosen around tiles of 128"
        )
    };
    let shapes = [
        (1, 1, 8, 2),
        (2, 3, 4, 4),
        (1, 127, 16, 2),
        (2, 128, 24, 3),
        (1, 129, 32, 1),
        (2, 130, 48, 6),
        (1, 300, 64, 1),
        (1, 385, 128, 1),
        (3, 257, 96, 3),
    ];
    // Grouped-query shapes (B, T, NH, NKV, HS): 2, 4 and 8 query heads per key/value head.
    let gqa = [(2, 130, 4, 2, 16), (1, 257, 8, 2, 32), (2, 60, 8, 1, 8)];
    let shapes = shapes
        .into_iter()
        .map(|(b, t, c, nh)| AttentionShape::multi_head(b, t, c, nh))
        .chain(gqa.map(|(b, t, nh, nkv, hs)| AttentionShape { b, t, nh, nkv, hs }));
    for (i, s) in shapes.enumerate() {
        let both = run_both(s, 10 + i as u64);
        let out = rel_diff(&both.out[0], &both.out[1]);
        let dqkv = rel_diff(&both.dqkv[0], &both.dqkv[1]);
        println!("{s:?}: out {out:.2e}  dqkv {dqkv:.2e}");
        assert!(out < 1e-5, "{s:?}: forward differs by {out:.3e}");
        assert!(dqkv < 1e-5, "{s:?}: backward differs by {dqkv:.3e}");
        assert!(both.lse.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn logsumexp_is_that_of_the_visible_scaled_scores() {
    // Six query heads over two key/value heads of 4.
    let s = AttentionShape {
        b: 2,
        t: 70,
        nh: 6,
        nkv: 2,
        hs: 4,
    };
    let mut rng = Rng::new(5);
    let qkv = rng.normal_vec(s.qkv_len(), 2.0);
    let (mut out, mut lse) = (vec![0.0; s.out_len()], vec![0.0; s.rows_len()]);
    flash_forward(&mut out, &mut lse, &qkv, s);
    let (hs, width) = (s.hs, s.qkv_width());
    let scale = 1.0 / (hs as f64).sqrt();
    let mut worst = 0.0f64;
    for b in 0..s.b {
        for h in 0..s.nh {
            let kvh = h / (s.nh / s.nkv);
            for i in 0..s.t {
                let q = (b * s.t + i) * width + h * hs;
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = (b * s.t + j) * width + (s.nh + kvh) * hs;
                        (0..hs)
                            .map(|d| qkv[q + d] as f64 * qkv[k + d] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let want = max + scores.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                let got = lse[(b * s.nh + h) * s.t + i] as f64;
                worst = worst.max((got - want).abs() / (1.0 + want.abs()));
            }
        }
    }
    assert!(worst < 1e-6, "lse differs by {worst:.3e}");
}

#[test]
fn fused_backward_matches_finite_differences() {
    // T = 140 spans two tiles of 128, so the tile boundary is exercised.
    // Two query heads per key/value head.
    const { assert!(140 > TILE && 140 < 2 * TILE) };
    let s = AttentionShape {
        b: 2,
        t: 140,
        nh: 4,
        nkv: 2,
        hs: 4,
    };
    let mut rng = Rng::new(3);
    let btc = s.out_len();
    let qkv = rng.normal_vec(s.qkv_len(), 1.0);
    let probe = rng.normal_vec(btc, 1.0);
    let fwd = |qkv: &[f32]| {
        let (mut out, mut lse) = (vec![0.0; btc], vec![0.0; s.rows_len()]);
        flash_forward(&mut out, &mut lse, qkv, s);
        (out, lse)
    };
    let loss = |qkv: &[f32]| -> f64 {
        fwd(qkv)
            .0
            .iter()
            .zip(&probe)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    let (out, lse) = fwd(&qkv);
    let mut dqkv = vec![0.0; s.qkv_len()];
    let mut delta = vec![0.0; s.rows_len()];
    flash_backward(&mut dqkv, &mut delta, &probe, &qkv, &out, &lse, s);
    let eps = 1e-2f32;
    let mut worst = 0.0f64;
    let mut x = qkv.clone();
    for i in (0..qkv.len()).step_by(29) {
        x[i] = qkv[i] + eps;
        let up = loss(&x);
        x[i] = qkv[i] - eps;
        let down = loss(&x);
        x[i] = qkv[i];
        let fd = (up - down) / (2.0 * eps as f64);
        worst = worst.max((fd - dqkv[i] as f64).abs() / (1.0 + fd.abs()));
    }
    println!("fused attention dqkv: max rel diff vs finite differences {worst:.2e}");
    assert!(
        worst < 2e-2,
        "fused backward vs finite differences: {worst:.3e}"
    );
}

/// Grouped-query attention equals multi-head attention over K and V repeated for every query
/// head of their group (transformers' `repeat_kv`), and its K/V gradients are the sums over the
/// group of the repeated heads' gradients: both implementations against that construction.
#[test]
fn grouped_query_attention_is_multi_head_attention_over_repeated_keys_and_values() {
    let s = AttentionShape {
        b: 2,
        t: 150,
        nh: 6,
        nkv: 2,
        hs: 8,
    };
    let (g, hs) = (s.nh / s.nkv, s.hs);
    let mha = AttentionShape { nkv: s.nh, ..s };
    let mut rng = Rng::new(21);
    let qkv = rng.normal_vec(s.qkv_len(), 1.0);
    let dout = rng.normal_vec(s.out_len(), 1.0);
    // The repeated layout: each query head h gets key/value head h / g.
    let repeated: Vec<f32> = qkv
        .chunks_exact(s.qkv_width())
        .flat_map(|token| {
            let mut row = token[..s.nh * hs].to_vec();
            for part in 0..2 {
                for h in 0..s.nh {
                    let at = (s.nh + part * s.nkv + h / g) * hs;
                    row.extend_from_slice(&token[at..at + hs]);
                }
            }
            row
        })
        .collect();
    let run = |s: AttentionShape, qkv: &[f32], fused: bool| -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0.0; s.out_len()];
        let mut dqkv = vec![0.0; s.qkv_len()];
        if fused {
            let (mut lse, mut delta) = (vec![0.0; s.rows_len()], vec![0.0; s.rows_len()]);
            flash_forward(&mut out, &mut lse, qkv, s);
            flash_backward(&mut dqkv, &mut delta, &dout, qkv, &out, &lse, s);
        } else {
            let (mut att, mut datt) = (vec![0.0; s.scores_len()], vec![0.0; s.scores_len()]);
            let (mut qkvr, mut dqkvr) = (vec![0.0; s.qkvr_len()], vec![0.0; s.qkvr_len()]);
            let (mut vaccum, mut dvaccum) = (vec![0.0; s.out_len()], vec![0.0; s.out_len()]);
            attention_forward(&mut out, &mut qkvr, &mut att, &mut vaccum, qkv, s);
            attention_backward(
                &mut dqkv,
                &dout,
                &qkvr,
                &att,
                &mut dqkvr,
                &mut datt,
                &mut dvaccum,
                s,
            );
        }
        (out, dqkv)
    };
    let (want_out, want_drep) = run(mha, &repeated, false);
    // Fold the repeated heads' gradients back onto their key/value head.
    let want_dqkv: Vec<f32> = want_drep
        .chunks_exact(mha.qkv_width())
        .flat_map(|token| {
            let mut row = token[..s.nh * hs].to_vec();
            for part in 0..2 {
                for kvh in 0..s.nkv {
                    let mut sum = vec![0.0f32; hs];
                    for h in kvh * g..(kvh + 1) * g {
                        let at = (s.nh + part * s.nh + h) * hs;
                        sum.iter_mut()
                            .zip(&token[at..at + hs])
                            .for_each(|(a, b)| *a += b);
                    }
                    row.extend(sum);
                }
            }
            row
        })
        .collect();
    for fused in [false, true] {
        let (out, dqkv) = run(s, &qkv, fused);
        let (o, d) = (rel_diff(&out, &want_out), rel_diff(&dqkv, &want_dqkv));
        println!("fused={fused}: out {o:.2e} dqkv {d:.2e}");
        assert!(
            o < 1e-5 && d < 1e-5,
            "fused={fused}: out {o:.3e} dqkv {d:.3e}"
        );
    }
}
