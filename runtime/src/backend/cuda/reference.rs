//! fp32 CPU reference of every kernel, transcribed from llm.c's train_gpt2.c (the functions
//! the CPU backend mirrors). Used by the GPU self-test on small random inputs; deliberately
//! plain loops, no threading, no cleverness.

// Index loops and long argument lists mirror the C source line by line.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use std::f32::consts::PI;

pub fn encoder_forward(
    out: &mut [f32],
    inp: &[i32],
    wte: &[f32],
    wpe: &[f32],
    b: usize,
    t: usize,
    c: usize,
) {
    for bt in 0..b * t {
        let tok = inp[bt] as usize;
        let pos = bt % t;
        for i in 0..c {
            out[bt * c + i] = wte[tok * c + i] + wpe[pos * c + i];
        }
    }
}

pub fn encoder_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    inp: &[i32],
    b: usize,
    t: usize,
    c: usize,
) {
    for bt in 0..b * t {
        let tok = inp[bt] as usize;
        let pos = bt % t;
        for i in 0..c {
            dwte[tok * c + i] += dout[bt * c + i];
            dwpe[pos * c + i] += dout[bt * c + i];
        }
    }
}

pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    n: usize,
    c: usize,
) {
    for r in 0..n {
        let x = &inp[r * c..(r + 1) * c];
        let m = x.iter().sum::<f32>() / c as f32;
        let v = x.iter().map(|&xi| (xi - m) * (xi - m)).sum::<f32>() / c as f32;
        let s = 1.0 / (v + 1e-5).sqrt();
        for i in 0..c {
            out[r * c + i] = (x[i] - m) * s * weight[i] + bias[i];
        }
        mean[r] = m;
        rstd[r] = s;
    }
}

pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    for r in 0..n {
        let (m, s) = (mean[r], rstd[r]);
        let row = r * c..(r + 1) * c;
        let (x, d) = (&inp[row.clone()], &dout[row.clone()]);
        let mut dnorm_mean = 0.0f32;
        let mut dnorm_norm_mean = 0.0f32;
        for i in 0..c {
            let norm = (x[i] - m) * s;
            let dnorm = weight[i] * d[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= c as f32;
        dnorm_norm_mean /= c as f32;
        for i in 0..c {
            let norm = (x[i] - m) * s;
            let dnorm = weight[i] * d[i];
            dbias[i] += d[i];
            dweight[i] += norm * d[i];
            dinp[r * c + i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
}

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    let k = (2.0 / PI).sqrt();
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = 0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh());
    }
}

/// dinp += gelu'(inp) · dout.
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    let k = (2.0 / PI).sqrt();
    for i in 0..inp.len() {
        let x = inp[i];
        let arg = k * (x + 0.044715 * x * x * x);
        let sech = 1.0 / arg.cosh();
        let grad =
            0.5 * (1.0 + arg.tanh()) + x * 0.5 * sech * sech * k * (1.0 + 3.0 * 0.044715 * x * x);
        dinp[i] += grad * dout[i];
    }
}

/// out (N,OC) = inp (N,C) · weight (OC,C)ᵀ + bias.
pub fn matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    for r in 0..n {
        for o in 0..oc {
            let mut acc = bias.map_or(0.0, |b| b[o]);
            for i in 0..c {
                acc += inp[r * c + i] * weight[o * c + i];
            }
            out[r * oc + o] = acc;
        }
    }
}

/// dinp += dout · weight; dweight += doutᵀ · inp; dbias += Σ rows.
pub fn matmul_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    n: usize,
    c: usize,
    oc: usize,
) {
    for r in 0..n {
        for o in 0..oc {
            let d = dout[r * oc + o];
            for i in 0..c {
                dinp[r * c + i] += weight[o * c + i] * d;
                dweight[o * c + i] += inp[r * c + i] * d;
            }
        }
    }
    if let Some(dbias) = dbias {
        for r in 0..n {
            for o in 0..oc {
                dbias[o] += dout[r * oc + o];
            }
        }
    }
}

/// out (B,T,C) and att (B,NH,T,T) from qkv (B,T,3C); llm.c attention_forward.
pub fn attention_forward(
    out: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    for bi in 0..b {
        for ti in 0..t {
            for h in 0..nh {
                let q = &qkv[(bi * t + ti) * 3 * c + h * hs..][..hs];
                let row = &mut att[((bi * nh + h) * t + ti) * t..][..t];
                let mut maxval = f32::NEG_INFINITY;
                for t2 in 0..=ti {
                    let k = &qkv[(bi * t + t2) * 3 * c + c + h * hs..][..hs];
                    let v: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                    row[t2] = v;
                    maxval = maxval.max(v);
                }
                let mut sum = 0.0;
                for v in row.iter_mut().take(ti + 1) {
                    *v = (*v - maxval).exp();
                    sum += *v;
                }
                for (t2, v) in row.iter_mut().enumerate() {
                    *v = if t2 <= ti { *v / sum } else { 0.0 };
                }
                let o = &mut out[(bi * t + ti) * c + h * hs..][..hs];
                o.iter_mut().for_each(|x| *x = 0.0);
                for t2 in 0..=ti {
                    let v = &qkv[(bi * t + t2) * 3 * c + 2 * c + h * hs..][..hs];
                    for i in 0..hs {
                        o[i] += row[t2] * v[i];
                    }
                }
            }
        }
    }
}

/// dqkv (B,T,3C) += gradient from dout (B,T,C), qkv and att; llm.c attention_backward.
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let mut datt = vec![0.0f32; t];
    let mut dpreatt = vec![0.0f32; t];
    for bi in 0..b {
        for ti in 0..t {
            for h in 0..nh {
                let a = &att[((bi * nh + h) * t + ti) * t..][..t];
                let d = &dout[(bi * t + ti) * c + h * hs..][..hs];
                for t2 in 0..=ti {
                    let vo = (bi * t + t2) * 3 * c + 2 * c + h * hs;
                    datt[t2] = (0..hs).map(|i| qkv[vo + i] * d[i]).sum();
                    for i in 0..hs {
                        dqkv[vo + i] += a[t2] * d[i];
                    }
                }
                let dot: f32 = (0..=ti).map(|t2| a[t2] * datt[t2]).sum();
                for t2 in 0..=ti {
                    dpreatt[t2] = a[t2] * (datt[t2] - dot);
                }
                let qo = (bi * t + ti) * 3 * c + h * hs;
                for t2 in 0..=ti {
                    let ko = (bi * t + t2) * 3 * c + c + h * hs;
                    for i in 0..hs {
                        dqkv[qo + i] += qkv[ko + i] * dpreatt[t2] * scale;
                        dqkv[ko + i] += qkv[qo + i] * dpreatt[t2] * scale;
                    }
                }
            }
        }
    }
}

/// losses (R) and dlogits (R,Vp) written (0 in the padding) from logits (R,Vp).
pub fn crossentropy_forward_backward(
    dlogits: &mut [f32],
    losses: &mut [f32],
    logits: &[f32],
    targets: &[i32],
    r: usize,
    v: usize,
    vp: usize,
    dloss: f32,
) {
    for row in 0..r {
        let x = &logits[row * vp..][..v];
        let maxval = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = x.iter().map(|&xi| (xi - maxval).exp()).sum();
        let target = targets[row] as usize;
        losses[row] = -((x[target] - maxval).exp() / sum).ln();
        for i in 0..vp {
            dlogits[row * vp + i] = if i < v {
                let p = (x[i] - maxval).exp() / sum;
                (p - if i == target { 1.0 } else { 0.0 }) * dloss
            } else {
                0.0
            };
        }
    }
}

/// One AdamW step; llm.c gpt2_update.
pub fn adamw(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step: i32,
    grad_scale: f32,
) {
    for i in 0..params.len() {
        let g = grads[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.0 - beta1) * g;
        v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
        let m_hat = m[i] / (1.0 - beta1.powi(step));
        let v_hat = v[i] / (1.0 - beta2.powi(step));
        params[i] -= lr * (m_hat / (v_hat.sqrt() + eps) + weight_decay * params[i]);
    }
}

#[cfg(test)]
mod tests {
    //! Gradient checks of the reference backward functions by central differences in f64-ish
    //! precision (small sizes, loss = Σ out·w for a fixed random w).
    use super::*;

    fn rand(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + 1.0) * 12.9898 + seed as f32 * 78.233).sin() * 0.9)
            .collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    }

    /// Numerical d(Σ f(x)·w)/dx_i for every i.
    fn numeric_grad(x: &[f32], w: &[f32], f: impl Fn(&[f32]) -> Vec<f32>) -> Vec<f32> {
        let eps = 1e-2f32;
        (0..x.len())
            .map(|i| {
                let mut xp = x.to_vec();
                let mut xm = x.to_vec();
                xp[i] += eps;
                xm[i] -= eps;
                ((dot(&f(&xp), w) - dot(&f(&xm), w)) / (2.0 * f64::from(eps))) as f32
            })
            .collect()
    }

    fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() / scale < tol,
                "{name}[{i}]: analytic {g} vs numeric {w}"
            );
        }
    }

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let (n, c) = (3, 8);
        let (inp, weight, bias, w) = (rand(n * c, 1), rand(c, 2), rand(c, 3), rand(n * c, 4));
        let fwd = |x: &[f32]| {
            let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            layernorm_forward(&mut out, &mut mean, &mut rstd, x, &weight, &bias, n, c);
            out
        };
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, c);
        let (mut dinp, mut dweight, mut dbias) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        layernorm_backward(
            &mut dinp,
            &mut dweight,
            &mut dbias,
            &w,
            &inp,
            &weight,
            &mean,
            &rstd,
            n,
            c,
        );
        assert_close("dinp", &dinp, &numeric_grad(&inp, &w, fwd), 2e-2);
        let fwd_w = |wt: &[f32]| {
            let (mut o, mut m, mut r) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            layernorm_forward(&mut o, &mut m, &mut r, &inp, wt, &bias, n, c);
            o
        };
        assert_close("dweight", &dweight, &numeric_grad(&weight, &w, fwd_w), 2e-2);
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let (b, t, c, nh) = (1, 4, 8, 2);
        let (qkv, w) = (rand(b * t * 3 * c, 5), rand(b * t * c, 6));
        let fwd = |x: &[f32]| {
            let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
            attention_forward(&mut out, &mut att, x, b, t, c, nh);
            out
        };
        let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        attention_forward(&mut out, &mut att, &qkv, b, t, c, nh);
        let mut dqkv = vec![0.0; b * t * 3 * c];
        attention_backward(&mut dqkv, &w, &qkv, &att, b, t, c, nh);
        assert_close("dqkv", &dqkv, &numeric_grad(&qkv, &w, fwd), 2e-2);
    }

    #[test]
    fn crossentropy_and_gelu_gradients_match_finite_differences() {
        let (r, v, vp) = (2, 5, 8);
        let logits = rand(r * vp, 7);
        let targets = [3, 0];
        let loss = |x: &[f32]| {
            let (mut d, mut l) = (vec![0.0; r * vp], vec![0.0; r]);
            crossentropy_forward_backward(&mut d, &mut l, x, &targets, r, v, vp, 1.0);
            vec![l.iter().sum::<f32>()]
        };
        let (mut dlogits, mut losses) = (vec![0.0; r * vp], vec![0.0; r]);
        crossentropy_forward_backward(&mut dlogits, &mut losses, &logits, &targets, r, v, vp, 1.0);
        assert_close(
            "dlogits",
            &dlogits,
            &numeric_grad(&logits, &[1.0], loss),
            2e-2,
        );
        assert!(
            dlogits[v..vp].iter().all(|&d| d == 0.0),
            "padding gradient must be 0"
        );

        let x = rand(16, 8);
        let w = rand(16, 9);
        let mut dinp = vec![0.0; 16];
        gelu_backward(&mut dinp, &x, &w);
        let fwd = |x: &[f32]| {
            let mut o = vec![0.0; x.len()];
            gelu_forward(&mut o, x);
            o
        };
        assert_close("gelu", &dinp, &numeric_grad(&x, &w, fwd), 2e-2);
    }

    #[test]
    fn matmul_backward_matches_finite_differences() {
        let (n, c, oc) = (3, 4, 5);
        let (inp, weight, w) = (rand(n * c, 10), rand(oc * c, 11), rand(n * oc, 12));
        let fwd = |x: &[f32]| {
            let mut o = vec![0.0; n * oc];
            matmul_forward(&mut o, x, &weight, None, n, c, oc);
            o
        };
        let (mut dinp, mut dweight, mut dbias) =
            (vec![0.0; n * c], vec![0.0; oc * c], vec![0.0; oc]);
        matmul_backward(
            &mut dinp,
            &mut dweight,
            Some(&mut dbias),
            &w,
            &inp,
            &weight,
            n,
            c,
            oc,
        );
        assert_close("dinp", &dinp, &numeric_grad(&inp, &w, fwd), 2e-2);
        let fwd_w = |wt: &[f32]| {
            let mut o = vec![0.0; n * oc];
            matmul_forward(&mut o, &inp, wt, None, n, c, oc);
            o
        };
        assert_close("dweight", &dweight, &numeric_grad(&weight, &w, fwd_w), 2e-2);
    }
}
