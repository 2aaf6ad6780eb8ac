//! Causal multi-head attention in the two modes of `train.attention`:
//! - materialized, as llm.c's CUDA version: permute qkv to per-head layout, Q·Kᵀ and att·V as
//!   cuBLAS strided-batched GEMMs (B·NH batches), causal softmax kernel, unpermute; the score
//!   matrices (B,NH,T,T) are stored;
//! - fused: the flash-attention kernels of `flash.rs`, no (T,T) buffer anywhere.

use super::context::GpuContext;
use super::error::{ensure, Result};
use super::gemm::{BatchStrides, GemmShape};
use crate::backend::{
    attention_modes_differ, AttentionActs, AttentionScratch, AttentionShape, Buf,
};

fn check_shape(s: &AttentionShape) -> Result<()> {
    ensure(
        s.nh > 0 && s.c % s.nh == 0 && s.b > 0 && s.t > 0,
        "attention",
        || format!("C = {} must be a positive multiple of NH = {}", s.c, s.nh),
    )
}

fn batch(s: &AttentionShape, stride_a: usize, stride_b: usize, stride_c: usize) -> BatchStrides {
    BatchStrides {
        count: s.b * s.nh,
        stride_a,
        stride_b,
        stride_c,
    }
}

impl GpuContext {
    fn attention_cfg_args(&self, s: &AttentionShape) -> Result<[i32; 4]> {
        let hs = s.head_size();
        let to_i32 = |v: usize| {
            i32::try_from(v).map_err(|_| {
                super::error::CudaError::precondition("attention", format!("{v} exceeds i32"))
            })
        };
        Ok([to_i32(s.b)?, to_i32(s.t)?, to_i32(s.nh)?, to_i32(hs)?])
    }

    /// out (B,T,C) X = causal self-attention of qkv (B,T,3C) X with NH heads, scale 1/√HS;
    /// fills `acts` for the backward pass.
    pub fn attention_forward(
        &self,
        out: &Buf,
        acts: &AttentionActs,
        qkv: &Buf,
        s: AttentionShape,
    ) -> Result<()> {
        check_shape(&s)?;
        check_x(self, "out", out, s.b * s.t * s.c)?;
        check_x(self, "qkv", qkv, 3 * s.b * s.t * s.c)?;
        match acts {
            AttentionActs::Materialized { qkvr, att, vaccum } => {
                self.materialized_forward(out, qkvr, att, vaccum, qkv, s)
            }
            AttentionActs::Fused { lse } => self.flash_forward(out, lse, qkv, s),
        }
    }

    /// dqkv (B,T,3C) X += attention backward of dout (B,T,C) X (accumulates, like the CPU
    /// backend), from the forward's input qkv, output out and `acts`; `scratch` is overwritten.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        dqkv: &Buf,
        dout: &Buf,
        qkv: &Buf,
        out: &Buf,
        acts: &AttentionActs,
        scratch: &AttentionScratch,
        s: AttentionShape,
    ) -> Result<()> {
        check_shape(&s)?;
        check_x(self, "dqkv", dqkv, 3 * s.b * s.t * s.c)?;
        check_x(self, "dout", dout, s.b * s.t * s.c)?;
        match (acts, scratch) {
            (
                AttentionActs::Materialized { qkvr, att, .. },
                AttentionScratch::Materialized {
                    dqkvr,
                    datt,
                    dvaccum,
                },
            ) => self.materialized_backward(dqkv, dout, qkvr, att, dqkvr, datt, dvaccum, s),
            (AttentionActs::Fused { lse }, AttentionScratch::Fused { delta }) => {
                self.flash_backward(dqkv, delta, dout, qkv, out, lse, s)
            }
            (acts, scratch) => {
                Err(attention_modes_differ("attention_backward", acts, scratch).into())
            }
        }
    }

    /// The materialized forward: acts qkvr (3,B,NH,T,HS), att (B,NH,T,T), vaccum (B,NH,T,HS).
    fn materialized_forward(
        &self,
        out: &Buf,
        qkvr: &Buf,
        att: &Buf,
        vaccum: &Buf,
        qkv: &Buf,
        s: AttentionShape,
    ) -> Result<()> {
        let (b, t, c) = (s.b, s.t, s.c);
        let hs = s.head_size();
        let per_head = b * s.nh * t * hs;
        check_x(self, "acts.qkvr", qkvr, s.qkvr_len())?;
        check_x(self, "acts.att", att, s.scores_len())?;
        check_x(self, "acts.vaccum", vaccum, b * t * c)?;
        let q = qkvr.slice(0, per_head)?;
        let k = qkvr.slice(per_head, per_head)?;
        let v = qkvr.slice(2 * per_head, per_head)?;
        let [bi, ti, nhi, hsi] = self.attention_cfg_args(&s)?;
        self.launch_attention(
            ("attention_permute", "attention_permute_vec"),
            per_head,
            &[q.ptr(), k.ptr(), v.ptr(), qkv.ptr()],
            [bi, ti, nhi, hsi],
        )?;

        let scale = 1.0 / (hs as f32).sqrt();
        // preatt (T,T) = scale · q (T,HS) · k (T,HS)ᵀ per (b, h).
        let qk = GemmShape {
            m: t,
            n: t,
            k: hs,
            trans_a: false,
            trans_b: true,
        };
        self.attention_gemm(
            "gemm: attention_forward",
            att,
            &q,
            &k,
            qk,
            batch(&s, t * hs, t * hs, t * t),
            scale,
            0.0,
        )?;
        self.launch_rows(
            "attention_softmax_forward",
            &[att.ptr(), att.ptr()],
            b * s.nh * t,
            t,
        )?;
        // vaccum (T,HS) = att (T,T) · v (T,HS).
        let av = GemmShape {
            m: t,
            n: hs,
            k: t,
            trans_a: false,
            trans_b: false,
        };
        self.attention_gemm(
            "gemm: attention_forward",
            vaccum,
            att,
            &v,
            av,
            batch(&s, t * t, t * hs, t * hs),
            1.0,
            0.0,
        )?;
        self.launch_attention(
            ("attention_unpermute", "attention_unpermute_vec"),
            per_head,
            &[out.ptr(), vaccum.ptr()],
            [bi, ti, nhi, hsi],
        )
    }

    /// The materialized backward: scratch dqkvr (3,B,NH,T,HS), datt (B,NH,T,T), dvaccum.
    #[allow(clippy::too_many_arguments)]
    fn materialized_backward(
        &self,
        dqkv: &Buf,
        dout: &Buf,
        qkvr: &Buf,
        att: &Buf,
        dqkvr: &Buf,
        datt: &Buf,
        dvaccum: &Buf,
        s: AttentionShape,
    ) -> Result<()> {
        let (b, t, c) = (s.b, s.t, s.c);
        let hs = s.head_size();
        let per_head = b * s.nh * t * hs;
        check_x(self, "acts.qkvr", qkvr, s.qkvr_len())?;
        check_x(self, "acts.att", att, s.scores_len())?;
        check_x(self, "scratch.dqkvr", dqkvr, s.qkvr_len())?;
        check_x(self, "scratch.datt", datt, s.scores_len())?;
        check_x(self, "scratch.dvaccum", dvaccum, b * t * c)?;
        let q = qkvr.slice(0, per_head)?;
        let k = qkvr.slice(per_head, per_head)?;
        let v = qkvr.slice(2 * per_head, per_head)?;
        let dq = dqkvr.slice(0, per_head)?;
        let dk = dqkvr.slice(per_head, per_head)?;
        let dv = dqkvr.slice(2 * per_head, per_head)?;
        let [bi, ti, nhi, hsi] = self.attention_cfg_args(&s)?;
        let scale = 1.0 / (hs as f32).sqrt();
        let th = t * hs;
        let tt = t * t;

        self.launch_attention(
            (
                "attention_unpermute_backward",
                "attention_unpermute_backward_vec",
            ),
            per_head,
            &[dvaccum.ptr(), dout.ptr()],
            [bi, ti, nhi, hsi],
        )?;
        // datt (T,T) = dvaccum (T,HS) · v (T,HS)ᵀ
        let g1 = GemmShape {
            m: t,
            n: t,
            k: hs,
            trans_a: false,
            trans_b: true,
        };
        self.attention_gemm(
            "gemm: attention_backward",
            datt,
            dvaccum,
            &v,
            g1,
            batch(&s, th, th, tt),
            1.0,
            0.0,
        )?;
        // dv (T,HS) = att (T,T)ᵀ · dvaccum (T,HS)
        let g2 = GemmShape {
            m: t,
            n: hs,
            k: t,
            trans_a: true,
            trans_b: false,
        };
        self.attention_gemm(
            "gemm: attention_backward",
            &dv,
            att,
            dvaccum,
            g2,
            batch(&s, tt, th, th),
            1.0,
            0.0,
        )?;
        // dpreatt = softmax backward, in place over datt.
        self.launch_rows(
            "attention_softmax_backward",
            &[datt.ptr(), datt.ptr(), att.ptr()],
            b * s.nh * t,
            t,
        )?;
        // dq (T,HS) = scale · dpreatt (T,T) · k (T,HS)
        let g3 = GemmShape {
            m: t,
            n: hs,
            k: t,
            trans_a: false,
            trans_b: false,
        };
        self.attention_gemm(
            "gemm: attention_backward",
            &dq,
            datt,
            &k,
            g3,
            batch(&s, tt, th, th),
            scale,
            0.0,
        )?;
        // dk (T,HS) = scale · dpreatt (T,T)ᵀ · q (T,HS)
        let g4 = GemmShape {
            m: t,
            n: hs,
            k: t,
            trans_a: true,
            trans_b: false,
        };
        self.attention_gemm(
            "gemm: attention_backward",
            &dk,
            datt,
            &q,
            g4,
            batch(&s, tt, th, th),
            scale,
            0.0,
        )?;
        self.launch_attention(
            (
                "attention_permute_backward",
                "attention_permute_backward_vec",
            ),
            per_head,
            &[dqkv.ptr(), dq.ptr(), dk.ptr(), dv.ptr()],
            [bi, ti, nhi, hsi],
        )
    }
}

fn check_x(gpu: &GpuContext, name: &str, buf: &Buf, numel: usize) -> Result<()> {
    let x = gpu.x();
    ensure(buf.dtype() == x && buf.len() == numel, "attention", || {
        format!(
            "{name} must be {numel} x {}, got {} x {}",
            x.name(),
            buf.len(),
            buf.dtype().name()
        )
    })
}

impl GpuContext {
    /// Permute kernels: pointers, then (B, T, NH, HS) as int; `n` = B·NH·T·HS elements. Uses
    /// `name_vec` (one thread per 16-byte pack, int index math) when HS divides by the pack,
    /// every pointer is 16-byte aligned and the pack count is at most 2^30.
    fn launch_attention(
        &self,
        (name, name_vec): (&'static str, &'static str),
        n: usize,
        ptrs: &[u64],
        dims: [i32; 4],
    ) -> Result<()> {
        let pack = self.pack();
        let hs = usize::try_from(dims[3]).unwrap_or(0);
        let vec = hs % pack == 0
            && n / pack <= 1 << 30
            && super::kernels::aligned16(ptrs.iter().copied());
        let (kernel, threads) = if vec { (name_vec, n / pack) } else { (name, n) };
        let cfg = super::kernels::elementwise_config(threads);
        self.launch_ptrs_ints(kernel, cfg, ptrs, &dims)
    }

    /// One batched attention GEMM (see `Blas::matmul_strided_batched`), timed as `label` when a
    /// profile is open.
    #[allow(clippy::too_many_arguments)]
    fn attention_gemm(
        &self,
        label: &'static str,
        c: &Buf,
        a: &Buf,
        b: &Buf,
        shape: GemmShape,
        batch: BatchStrides,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.blas()
            .matmul_strided_batched(c, a, b, shape, batch, alpha, beta)?;
        self.profile_mark(label)
    }

    /// Softmax kernels: pointers, then (rows, T) as int; one warp per row.
    fn launch_rows(&self, name: &'static str, ptrs: &[u64], rows: usize, t: usize) -> Result<()> {
        let to_i32 = |v: usize| {
            i32::try_from(v).map_err(|_| {
                super::error::CudaError::precondition(name, format!("{v} exceeds i32"))
            })
        };
        let cfg = super::kernels::rows_config(rows)?;
        self.launch_ptrs_ints(name, cfg, ptrs, &[to_i32(rows)?, to_i32(t)?])
    }
}
