//! Every layer's backward checked against central finite differences of its forward.
//! The scalar is L = Σ probe ⊙ forward(x) for a random probe, so ∂L/∂out = probe.

use super::*;
use crate::backend::AttentionShape;
use crate::rng::Rng;

/// Compares `analytic` with central differences of `loss` at `x`, in f64 for the difference quotient.
fn assert_close_to_fd(name: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64) {
    let eps = 1e-2f32;
    let mut worst = 0.0f64;
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + eps;
        let up = loss(&xp);
        xp[i] = x[i] - eps;
        let down = loss(&xp);
        xp[i] = x[i];
        let fd = (up - down) / (2.0 * eps as f64);
        let err = (fd - analytic[i] as f64).abs() / (1.0 + fd.abs());
        worst = worst.max(err);
    }
    println!("{name}: max rel diff vs finite differences {worst:.2e}");
    assert!(
        worst < 2e-2,
        "{name}: backward disagrees with finite differences ({worst:.3e})"
    );
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let (n, c) = (3, 8);
    let mut rng = Rng::new(1);
    let x = rng.normal_vec(n * c, 1.0);
    let w = rng.normal_vec(c, 1.0);
    let b = rng.normal_vec(c, 1.0);
    let probe = rng.normal_vec(n * c, 1.0);
    let fwd = |x: &[f32], w: &[f32], b: &[f32]| {
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, x, w, b, c);
        (out, mean, rstd)
    };
    let (_, mean, rstd) = fwd(&x, &w, &b);
    let (mut dx, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
    layernorm_backward(&mut dx, &mut dw, &mut db, &probe, &x, &w, &mean, &rstd, c);
    assert_close_to_fd("layernorm dx", &x, &dx, |x| dot(&fwd(x, &w, &b).0, &probe));
    assert_close_to_fd("layernorm dw", &w, &dw, |w| dot(&fwd(&x, w, &b).0, &probe));
    assert_close_to_fd("layernorm db", &b, &db, |b| dot(&fwd(&x, &w, b).0, &probe));
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let mut rng = Rng::new(2);
    let x = rng.normal_vec(64, 2.0);
    let probe = rng.normal_vec(64, 1.0);
    let fwd = |x: &[f32]| {
        let mut out = vec![0.0; x.len()];
        gelu_forward(&mut out, x);
        out
    };
    let mut dx = vec![0.0; 64];
    gelu_backward(&mut dx, &x, &probe, true);
    assert_close_to_fd("gelu", &x, &dx, |x| dot(&fwd(x), &probe));
}

#[test]
fn attention_backward_matches_finite_differences() {
    // T = 150 spans two row blocks of 128, so the block boundary is exercised; two query heads
    // share each of the two key/value heads.
    let s = AttentionShape {
        b: 2,
        t: 150,
        nh: 4,
        nkv: 2,
        hs: 4,
    };
    let mut rng = Rng::new(3);
    let qkv = rng.normal_vec(s.qkv_len(), 1.0);
    let probe = rng.normal_vec(s.out_len(), 1.0);
    let btc = s.out_len();
    let fwd = |qkv: &[f32]| {
        let (mut out, mut att) = (vec![0.0; btc], vec![0.0; s.scores_len()]);
        let (mut qkvr, mut vaccum) = (vec![0.0; s.qkvr_len()], vec![0.0; btc]);
        attention_forward(&mut out, &mut qkvr, &mut att, &mut vaccum, qkv, s);
        (out, qkvr, att)
    };
    let (out, qkvr, att) = fwd(&qkv);
    // Causality: the output at t = 0 of head 0 equals v of its key/value head at t = 0.
    for d in 0..s.hs {
        assert!((out[d] - qkv[(s.nh + s.nkv) * s.hs + d]).abs() < 1e-6);
    }
    // The backward accumulates: start from a known gradient and subtract it afterwards.
    let base: Vec<f32> = (0..qkv.len()).map(|i| (i % 7) as f32).collect();
    let mut dqkv = base.clone();
    let (mut datt, mut dqkvr) = (vec![f32::NAN; s.scores_len()], vec![f32::NAN; s.qkvr_len()]);
    let mut dvaccum = vec![f32::NAN; btc];
    attention_backward(
        &mut dqkv,
        &probe,
        &qkvr,
        &att,
        &mut dqkvr,
        &mut datt,
        &mut dvaccum,
        s,
    );
    dqkv.iter_mut().zip(&base).for_each(|(d, b)| *d -= b);
    // Finite differences on a subset of elements (every 37th) keep the test fast.
    let picks: Vec<usize> = (0..qkv.len()).step_by(37).collect();
    let eps = 1e-2f32;
    let mut worst = 0.0f64;
    let mut x = qkv.clone();
    for &i in &picks {
        x[i] = qkv[i] + eps;
        let up = dot(&fwd(&x).0, &probe);
        x[i] = qkv[i] - eps;
        let down = dot(&fwd(&x).0, &probe);
        x[i] = qkv[i];
        let fd = (up - down) / (2.0 * eps as f64);
        worst = worst.max((fd - dqkv[i] as f64).abs() / (1.0 + fd.abs()));
    }
    println!(
        "attention dqkv: max rel diff vs finite differences {worst:.2e} over {} elements",
        picks.len()
    );
    assert!(
        worst < 2e-2,
        "attention backward disagrees with finite differences ({worst:.3e})"
    );
}

#[test]
fn encoder_backward_matches_finite_differences() {
    let (t, c, v) = (4, 6, 5);
    let tokens = [1u32, 3, 3, 0, 4, 1, 2, 2];
    let mut rng = Rng::new(4);
    let wte = rng.normal_vec(v * c, 1.0);
    let wpe = rng.normal_vec(t * c, 1.0);
    let probe = rng.normal_vec(tokens.len() * c, 1.0);
    let fwd = |wte: &[f32], wpe: &[f32]| {
        let mut out = vec![0.0; tokens.len() * c];
        encoder_forward(&mut out, &tokens, wte, Some(wpe), t, c);
        out
    };
    let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t * c]);
    encoder_backward(&mut dwte, Some(&mut dwpe), &probe, &tokens, t, c);
    assert_close_to_fd("encoder dwte", &wte, &dwte, |w| dot(&fwd(w, &wpe), &probe));
    assert_close_to_fd("encoder dwpe", &wpe, &dwpe, |w| dot(&fwd(&wte, w), &probe));
}

#[test]
fn crossentropy_backward_matches_finite_differences_and_closed_form() {
    let (n, v) = (5, 7);
    let targets = [0i32, 6, 3, 3, 1];
    let mut rng = Rng::new(5);
    let logits = rng.normal_vec(n * v, 2.0);
    let mean_loss = |x: &[f32]| {
        let mut l = x.to_vec();
        let mut losses = vec![0.0; n];
        softmax_crossentropy(&mut l, &targets, &mut losses, None, v, v);
        assert_eq!(l, x, "without dloss the logits stay as they are");
        losses.iter().map(|&x| x as f64).sum::<f64>() / n as f64
    };
    let mut grad = logits.clone();
    let mut losses = vec![0.0; n];
    softmax_crossentropy(&mut grad, &targets, &mut losses, Some(1.0 / n as f32), v, v);
    // Closed form for row 0: log Σ exp − x[target].
    let row = &logits[..v];
    let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
    assert!((losses[0] as f64 - (lse - row[0] as f64)).abs() < 1e-5);
    assert_close_to_fd("crossentropy dlogits", &logits, &grad, mean_loss);
}

#[test]
fn crossentropy_ignores_vocabulary_padding() {
    // Rows of Vp = 9 with V = 6 real columns: the padding holds garbage that must not count,
    // and comes back as zero gradient.
    let (n, v, vp) = (3, 6, 9);
    let targets = [5i32, 0, 2];
    let mut rng = Rng::new(6);
    let real = rng.normal_vec(n * v, 2.0);
    let mut padded = vec![1e4f32; n * vp];
    for (dst, src) in padded.chunks_exact_mut(vp).zip(real.chunks_exact(v)) {
        dst[..v].copy_from_slice(src);
    }
    let (mut want, mut want_losses) = (real.clone(), vec![0.0; n]);
    softmax_crossentropy(&mut want, &targets, &mut want_losses, Some(0.5), v, v);
    let mut losses = vec![0.0; n];
    softmax_crossentropy(&mut padded, &targets, &mut losses, Some(0.5), v, vp);
    assert_eq!(losses, want_losses);
    for (row, want) in padded.chunks_exact(vp).zip(want.chunks_exact(v)) {
        assert_eq!(&row[..v], want);
        assert!(row[v..].iter().all(|&x| x == 0.0));
    }
}

#[test]
fn encoder_without_positions_is_the_token_rows_and_scatters_back() {
    let (t, c, v) = (3, 4, 5);
    let tokens = [4u32, 0, 4, 2, 1, 1];
    let mut rng = Rng::new(7);
    let wte = rng.normal_vec(v * c, 1.0);
    let probe = rng.normal_vec(tokens.len() * c, 1.0);
    let fwd = |wte: &[f32]| {
        let mut out = vec![0.0; tokens.len() * c];
        encoder_forward(&mut out, &tokens, wte, None, t, c);
        out
    };
    let out = fwd(&wte);
    for (row, &tok) in out.chunks_exact(c).zip(&tokens) {
        assert_eq!(row, &wte[tok as usize * c..(tok as usize + 1) * c]);
    }
    let mut dwte = vec![0.0; v * c];
    encoder_backward(&mut dwte, None, &probe, &tokens, t, c);
    assert_close_to_fd("encoder dwte (no wpe)", &wte, &dwte, |w| {
        dot(&fwd(w), &probe)
    });
}

/// Dense rows, and strided rows of a packed tensor (per-head norms): the gaps stay untouched.
#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let eps = 1e-6;
    for rows in [
        crate::backend::Rows::dense(3, 8),
        crate::backend::Rows {
            n: 6,
            c: 4,
            group: 2,
            stride: 11,
        },
    ] {
        let extent = rows.extent();
        let mut rng = Rng::new(8);
        let x = rng.normal_vec(extent, 1.0);
        let w = rng.normal_vec(rows.c, 1.0);
        let probe = rng.normal_vec(extent, 1.0);
        let fwd = |x: &[f32], w: &[f32]| {
            let (mut out, mut rstd) = (vec![0.0; extent], vec![0.0; rows.n]);
            rmsnorm_forward(&mut out, &mut rstd, x, w, rows, eps);
            (out, rstd)
        };
        let (out, rstd) = fwd(&x, &w);
        // Closed form of the first row: w ⊙ x / √(mean(x²) + eps).
        let ms = x[..rows.c].iter().map(|v| v * v).sum::<f32>() / rows.c as f32;
        for i in 0..rows.c {
            assert!((out[i] - w[i] * x[i] / (ms + eps).sqrt()).abs() < 1e-5);
        }
        // The backward accumulates into dinp (or overwrites it); the gaps between rows stay.
        let base: Vec<f32> = (0..extent).map(|i| (i % 5) as f32).collect();
        for accumulate in [true, false] {
            let (mut dx, mut dw) = (base.clone(), vec![0.0; rows.c]);
            rmsnorm_backward(&mut dx, accumulate, &mut dw, &probe, &x, &w, &rstd, rows);
            let mut in_rows = vec![false; extent];
            for r in 0..rows.n {
                in_rows[rows.offset(r)..rows.offset(r) + rows.c].fill(true);
            }
            for i in 0..extent {
                if !in_rows[i] {
                    assert_eq!(dx[i], base[i], "element {i} between rows was written");
                } else if accumulate {
                    dx[i] -= base[i];
                }
            }
            // Elements between rows do not change the loss: their FD is 0, as set here.
            let analytic: Vec<f32> = (0..extent)
                .map(|i| if in_rows[i] { dx[i] } else { 0.0 })
                .collect();
            assert_close_to_fd("rmsnorm dx", &x, &analytic, |x| dot(&fwd(x, &w).0, &probe));
            assert_close_to_fd("rmsnorm dw", &w, &dw, |w| dot(&fwd(&x, w).0, &probe));
        }
    }
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let (n, i) = (3, 5);
    let mut rng = Rng::new(9);
    let x = rng.normal_vec(n * 2 * i, 2.0);
    let probe = rng.normal_vec(n * i, 1.0);
    let fwd = |x: &[f32]| {
        let mut out = vec![0.0; n * i];
        swiglu_forward(&mut out, x, i);
        out
    };
    // Closed form: silu(g)·u.
    let out = fwd(&x);
    let (g, u) = (x[0] as f64, x[i] as f64);
    assert!((out[0] as f64 - g / (1.0 + (-g).exp()) * u).abs() < 1e-5);
    let mut dx = vec![f32::NAN; n * 2 * i];
    swiglu_backward(&mut dx, &probe, &x, i);
    assert_close_to_fd("swiglu dinp", &x, &dx, |x| dot(&fwd(x), &probe));
}

/// The rotation preserves each pair's norm, its inverse undoes it, and (orthogonal) its
/// gradient is the inverse rotation of the output's gradient.
#[test]
fn rotary_is_a_rotation_and_its_backward_the_inverse() {
    let s = AttentionShape {
        b: 2,
        t: 5,
        nh: 4,
        nkv: 2,
        hs: 6,
    };
    let half = s.hs / 2;
    let mut rng = Rng::new(10);
    let angles = rng.normal_vec(s.t * half, 2.0);
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let x = rng.normal_vec(s.qkv_len(), 1.0);
    let probe = rng.normal_vec(s.qkv_len(), 1.0);
    let fwd = |x: &[f32]| {
        let mut y = x.to_vec();
        rotary(&mut y, &cos, &sin, s, false);
        y
    };
    let y = fwd(&x);
    // Value heads untouched; every (i, i + HS/2) pair keeps its length.
    let width = s.qkv_width();
    for (xt, yt) in x.chunks_exact(width).zip(y.chunks_exact(width)) {
        let v0 = (s.nh + s.nkv) * s.hs;
        assert_eq!(&xt[v0..], &yt[v0..]);
        for head in 0..s.nh + s.nkv {
            for i in 0..half {
                let (a, b) = (head * s.hs + i, head * s.hs + i + half);
                let before = xt[a].hypot(xt[b]);
                assert!((before - yt[a].hypot(yt[b])).abs() < 1e-5);
            }
        }
    }
    let mut back = y.clone();
    rotary(&mut back, &cos, &sin, s, true);
    assert!(back.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5));
    let mut grad = probe.clone();
    rotary(&mut grad, &cos, &sin, s, true);
    assert_close_to_fd("rotary", &x, &grad, |x| dot(&fwd(x), &probe));
}

/// PyTorch's ignore_index: a negative target's row has loss 0 and gradient 0, the other rows
/// are as without it.
#[test]
fn crossentropy_ignores_negative_targets() {
    let (n, v) = (4, 6);
    let mut rng = Rng::new(11);
    let logits = rng.normal_vec(n * v, 2.0);
    let (mut all, mut all_losses) = (logits.clone(), vec![0.0; n]);
    softmax_crossentropy(&mut all, &[1, 2, 3, 4], &mut all_losses, Some(0.25), v, v);
    let (mut some, mut losses) = (logits.clone(), vec![f32::NAN; n]);
    softmax_crossentropy(&mut some, &[1, -100, 3, -1], &mut losses, Some(0.25), v, v);
    assert_eq!([losses[0], losses[2]], [all_losses[0], all_losses[2]]);
    assert_eq!([losses[1], losses[3]], [0.0, 0.0]);
    assert_eq!(&some[..v], &all[..v]);
    assert!(some[v..2 * v]
        .iter()
        .chain(&some[3 * v..])
        .all(|&g| g == 0.0));
    let mut eval = logits.clone();
    softmax_crossentropy(&mut eval, &[1, -100, 3, -1], &mut losses, None, v, v);
    assert_eq!(eval, logits);
    assert_eq!(losses[1], 0.0);
}
