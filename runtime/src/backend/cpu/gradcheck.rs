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
    // T = 150 spans two row blocks of 128, so the block boundary is exercised.
    let s = AttentionShape {
        b: 2,
        t: 150,
        c: 8,
        nh: 2,
    };
    let mut rng = Rng::new(3);
    let qkv = rng.normal_vec(s.b * s.t * 3 * s.c, 1.0);
    let probe = rng.normal_vec(s.b * s.t * s.c, 1.0);
    let btc = s.b * s.t * s.c;
    let fwd = |qkv: &[f32]| {
        let (mut out, mut att) = (vec![0.0; btc], vec![0.0; s.scores_len()]);
        let (mut qkvr, mut vaccum) = (vec![0.0; s.qkvr_len()], vec![0.0; btc]);
        attention_forward(&mut out, &mut qkvr, &mut att, &mut vaccum, qkv, s);
        (out, qkvr, att)
    };
    let (out, qkvr, att) = fwd(&qkv);
    // Causality: the output at t = 0 of head 0 equals v at t = 0.
    for d in 0..s.c / s.nh {
        assert!((out[d] - qkv[2 * s.c + d]).abs() < 1e-6);
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
        encoder_forward(&mut out, &tokens, wte, wpe, t, c);
        out
    };
    let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t * c]);
    encoder_backward(&mut dwte, &mut dwpe, &probe, &tokens, t, c);
    assert_close_to_fd("encoder dwte", &wte, &dwte, |w| dot(&fwd(w, &wpe), &probe));
    assert_close_to_fd("encoder dwpe", &wpe, &dwpe, |w| dot(&fwd(&wte, w), &probe));
}

#[test]
fn crossentropy_backward_matches_finite_differences_and_closed_form() {
    let (n, v) = (5, 7);
    let targets = [0u32, 6, 3, 3, 1];
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
    let targets = [5u32, 0, 2];
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
