//! The CPU backend's layer operations: each checked descriptor ([`crate::backend::ops`]) becomes
//! one job on the compute queue that runs its fp32 kernel over views of the operands.
//!
//! Every job holds clones of its buffers (which keep the arena's memory alive) and makes its
//! views inside the job, when the queue has ordered it after every writer of its inputs.
//! SAFETY of the views (one argument for every arm): `Op::check` found each operand to be live
//! host memory of the declared type and size and every output disjoint from the other operands,
//! and the queues order this job against every other user of these bytes.

use super::device::{view, view_mut, CpuDevice};
use super::{attention, crossentropy, decode, elementwise, encoder, flash, layernorm, matmul};
use super::{rmsnorm, rotary};
use crate::backend::{AttentionActs, AttentionScratch, Buf, Checked, GradMode, Op, Result};

/// Clones of the operands, for the job to own.
fn owned<const N: usize>(bufs: [&Buf; N]) -> [Buf; N] {
    bufs.map(Buf::clone)
}

impl CpuDevice {
    pub(super) fn launch_op(&self, op: Checked<'_>) -> Result<()> {
        let name = op.op().name();
        match *op.op() {
            Op::EncoderForward(d) => {
                let [out, tokens, wte] = owned([d.out, d.tokens, d.wte]);
                let wpe = d.wpe.cloned();
                let (t, c) = (d.t, d.c);
                self.compute(name, move || {
                    // SAFETY: see the module's documentation.
                    let wpe = wpe.as_ref().map(|w| unsafe { view(w) });
                    let (o, tok, e) = unsafe { (view_mut(&out), view(&tokens), view(&wte)) };
                    encoder::encoder_forward(o, tok, e, wpe, t, c);
                })
            }
            Op::EncoderBackward(d) => {
                let [dwte, dout, tokens] = owned([d.dwte, d.dout, d.tokens]);
                let dwpe = d.dwpe.cloned();
                let (t, c) = (d.t, d.c);
                self.compute(name, move || {
                    // SAFETY: see the module's documentation.
                    let dwpe = dwpe.as_ref().map(|w| unsafe { view_mut(w) });
                    let (de, dy, tok) = unsafe { (view_mut(&dwte), view(&dout), view(&tokens)) };
                    encoder::encoder_backward(de, dwpe, dy, tok, t, c);
                })
            }
            Op::LayerNormForward(d) => {
                let bufs = owned([d.out, d.mean, d.rstd, d.inp, d.weight, d.bias]);
                let c = d.c;
                self.compute(name, move || {
                    let [out, mean, rstd, inp, weight, bias] = &bufs;
                    // SAFETY: see the module's documentation.
                    unsafe {
                        layernorm::layernorm_forward(
                            view_mut(out),
                            view_mut(mean),
                            view_mut(rstd),
                            view(inp),
                            view(weight),
                            view(bias),
                            c,
                        )
                    };
                })
            }
            Op::LayerNormBackward(d) => {
                let bufs = owned([
                    d.dinp, d.dweight, d.dbias, d.dout, d.inp, d.weight, d.mean, d.rstd,
                ]);
                let c = d.c;
                self.compute(name, move || {
                    let [dinp, dweight, dbias, dout, inp, weight, mean, rstd] = &bufs;
                    // SAFETY: see the module's documentation.
                    unsafe {
                        layernorm::layernorm_backward(
                            view_mut(dinp),
                            view_mut(dweight),
                            view_mut(dbias),
                            view(dout),
                            view(inp),
                            view(weight),
                            view(mean),
                            view(rstd),
                            c,
                        )
                    };
                })
            }
            Op::RmsNormForward(d) => {
                let bufs = owned([d.out, d.rstd, d.inp, d.weight]);
                let (rows, eps) = (d.rows, d.eps);
                self.compute(name, move || {
                    let [out, rstd, inp, weight] = &bufs;
                    // SAFETY: see the module's documentation.
                    unsafe {
                        rmsnorm::rmsnorm_forward(
                            view_mut(out),
                            view_mut(rstd),
                            view(inp),
                            view(weight),
                            rows,
                            eps,
                        )
                    };
                })
            }
            Op::RmsNormBackward(d) => {
                let bufs = owned([d.dinp, d.dweight, d.dout, d.inp, d.weight, d.rstd]);
                let (rows, accumulate) = (d.rows, d.dinp_mode == GradMode::Accumulate);
                self.compute(name, move || {
                    let [dinp, dweight, dout, inp, weight, rstd] = &bufs;
                    // SAFETY: see the module's documentation.
                    unsafe {
                        rmsnorm::rmsnorm_backward(
                            view_mut(dinp),
                            accumulate,
                            view_mut(dweight),
                            view(dout),
                            view(inp),
                            view(weight),
                            view(rstd),
                            rows,
                        )
                    };
                })
            }
            Op::MatmulForward(d) => {
                let [out, inp, weight] = owned([d.out, d.inp, d.weight]);
                let bias = d.bias.cloned();
                let (n, c, oc) = (d.n, d.c, d.oc);
                self.compute(name, move || {
                    // SAFETY: see the module's documentation.
                    let bias = bias.as_ref().map(|b| unsafe { view(b) });
                    unsafe {
                        matmul::matmul_forward(
                            view_mut(&out),
                            view(&inp),
                            view(&weight),
                            bias,
                            n,
                            c,
                            oc,
                        )
                    };
                })
            }
            Op::MatmulBackward(d) => {
                let bufs = owned([d.dinp, d.dweight, d.dout, d.inp, d.weight]);
                let dbias = d.dbias.cloned();
                let accumulate = d.dinp_mode == GradMode::Accumulate;
                let (n, c, oc) = (d.n, d.c, d.oc);
                self.compute(name, move || {
                    let [dinp, dweight, dout, inp, weight] = &bufs;
                    // SAFETY: see the module's documentation.
                    unsafe {
                        matmul::matmul_backward(
                            Some(view_mut(dinp)),
                            accumulate,
                            view_mut(dweight),
                            dbias.as_ref().map(|b| view_mut(b)),
                            view(dout),
                            view(inp),
                            view(weight),
                            n,
                            c,
                            oc,
                        )
                    };
                })
            }
            Op::AttentionForward(d) => {
                let s = d.shape;
                match d.acts {
                    AttentionActs::Materialized { qkvr, att, vaccum } => {
                        let bufs = owned([d.out, d.qkv, qkvr, att, vaccum]);
                        self.compute(name, move || {
                            let [out, qkv, qkvr, att, vaccum] = &bufs;
                            // SAFETY: see the module's documentation.
                            unsafe {
                                attention::attention_forward(
                                    view_mut(out),
                                    view_mut(qkvr),
                                    view_mut(att),
                                    view_mut(vaccum),
                                    view(qkv),
                                    s,
                                )
                            };
                        })
                    }
                    AttentionActs::Fused { lse } => {
                        let bufs = owned([d.out, d.qkv, lse]);
                        self.compute(name, move || {
                            let [out, qkv, lse] = &bufs;
                            // SAFETY: see the module's documentation.
                            unsafe {
                                flash::flash_forward(view_mut(out), view_mut(lse), view(qkv), s)
                            };
                        })
                    }
                }
            }
            Op::AttentionBackward(d) => {
                let s = d.shape;
                match (d.acts, d.scratch) {
                    (
                        AttentionActs::Materialized { qkvr, att, .. },
                        AttentionScratch::Materialized {
                            dqkvr,
                            datt,
                            dvaccum,
                        },
                    ) => {
                        let bufs = owned([d.dqkv, d.dout, qkvr, att, dqkvr, datt, dvaccum]);
                        self.compute(name, move || {
                            let [dqkv, dout, qkvr, att, dqkvr, datt, dvaccum] = &bufs;
                            // SAFETY: see the module's documentation.
                            unsafe {
                                attention::attention_backward(
                                    view_mut(dqkv),
                                    view(dout),
                                    view(qkvr),
                                    view(att),
                                    view_mut(dqkvr),
                                    view_mut(datt),
                                    view_mut(dvaccum),
                                    s,
                                )
                            };
                        })
                    }
                    (AttentionActs::Fused { lse }, AttentionScratch::Fused { delta }) => {
                        let bufs = owned([d.dqkv, delta, d.dout, d.qkv, d.out, lse]);
                        self.compute(name, move || {
                            let [dqkv, delta, dout, qkv, out, lse] = &bufs;
                            // SAFETY: see the module's documentation.
                            unsafe {
                                flash::flash_backward(
                                    view_mut(dqkv),
                                    view_mut(delta),
                                    view(dout),
                                    view(qkv),
                                    view(out),
                                    view(lse),
                                    s,
                                )
                            };
                        })
                    }
                    // Op::check refused acts and scratch of different modes.
                    (acts, scratch) => {
                        Err(crate::backend::attention_modes_differ(name, acts, scratch))
                    }
                }
            }
            Op::Rotary(d) => {
                let [qkv, cos, sin] = owned([d.qkv, d.cos, d.sin]);
                let (s, inverse) = (d.shape, d.inverse);
                self.compute(name, move || {
                    // SAFETY: see the module's documentation.
                    unsafe { rotary::rotary(view_mut(&qkv), view(&cos), view(&sin), s, inverse) };
                })
            }
            Op::KvCacheWrite(d) => {
                let [k, v, qkv] = owned([d.k_cache, d.v_cache, d.qkv]);
                let (s, pos, capacity) = (d.shape, d.pos, d.capacity);
                self.compute(name, move || {
                    // SAFETY: see the module's documentation.
                    let (k, v, qkv) = unsafe { (view_mut(&k), view_mut(&v), view(&qkv)) };
                    decode::kv_cache_write(k, v, qkv, s, pos, capacity);
                })
            }
            Op::CachedAttention(d) => {
                let bufs = owned([d.out, d.qkv, d.k_cache, d.v_cache]);
                let (s, pos, capacity) = (d.shape, d.pos, d.capacity);
                self.compute(name, move || {
                    let [out, qkv, k, v] = &bufs;
                    // SAFETY: see the module's documentation.
                    unsafe {
                        decode::cached_attention(
                            view_mut(out),
                            view(qkv),
                            view(k),
                            view(v),
                            s,
                            pos,
                            capacity,
                        )
                    };
                })
            }
            Op::GeluForward(d) => {
                let [out, inp] = owned([d.out, d.inp]);
                if out.same_range(&inp) {
                    // SAFETY: see the module's documentation (in place: one view).
                    return self.compute(name, move || {
                        elementwise::gelu_in_place(unsafe { view_mut(&out) })
                    });
                }
                self.compute(name, move || {
                    // SAFETY: see the module's documentation.
                    unsafe { elementwise::gelu_forward(view_mut(&out), view(&inp)) };
                })
            }
            Op::GeluBackward(d) => {
                let bufs = owned([d.dinp, d.inp, d.dout]);
                let accumulate = d.dinp_mode == GradMode::Accumulate;
                self.compute(name, move || {
                    let [dinp, inp, dout] = &bufs;
                    // SAFETY: see the module's documentation.
                    unsafe {
                        elementwise::gelu_backward(
                            view_mut(dinp),
                            view(inp),
                            view(dout),
                            accumulate,
                        )
                    };
                })
            }
            Op::SwigluForward(d) => {
                let [out, inp] = owned([d.out, d.inp]);
                let i = d.i;
                self.compute(name, move || {
                    // SAFETY: see the module's documentation.
                    unsafe { elementwise::swiglu_forward(view_mut(&out), view(&inp), i) };
                })
            }
            Op::SwigluBackward(d) => {
                let [dinp, dout, inp] = owned([d.dinp, d.dout, d.inp]);
                let i = d.i;
                self.compute(name, move || {
                    // SAFETY: see the module's documentation.
                    unsafe {
                        elementwise::swiglu_backward(view_mut(&dinp), view(&dout), view(&inp), i)
                    };
                })
            }
            Op::ResidualForward(d) => {
                // out may be a or b: then it is an accumulation of the other one.
                let (dst, src) = if d.out.same_range(d.a) {
                    (d.out, d.b)
                } else if d.out.same_range(d.b) {
                    (d.out, d.a)
                } else {
                    let bufs = owned([d.out, d.a, d.b]);
                    return self.compute(name, move || {
                        let [out, a, b] = &bufs;
                        // SAFETY: see the module's documentation.
                        unsafe { elementwise::residual_forward(view_mut(out), view(a), view(b)) };
                    });
                };
                self.add_into("accumulate", dst, src)
            }
            Op::Accumulate(d) => self.add_into(name, d.dst, d.src),
            Op::CrossEntropy(d) => {
                let bufs = owned([d.logits, d.losses, d.targets]);
                let (v, vp, dloss) = (d.v, d.vp, d.dloss);
                self.compute(name, move || {
                    let [logits, losses, targets] = &bufs;
                    // SAFETY: see the module's documentation.
                    unsafe {
                        crossentropy::softmax_crossentropy(
                            view_mut(logits),
                            view(targets),
                            view_mut(losses),
                            dloss,
                            v,
                            vp,
                        )
                    };
                })
            }
        }
    }

    /// dst += src (checked disjoint by the caller's `Op::check`).
    fn add_into(&self, name: &'static str, dst: &Buf, src: &Buf) -> Result<()> {
        let [dst, src] = owned([dst, src]);
        self.compute(name, move || {
            // SAFETY: see the module's documentation.
            unsafe { elementwise::add_into(view_mut(&dst), view(&src)) };
        })
    }
}
