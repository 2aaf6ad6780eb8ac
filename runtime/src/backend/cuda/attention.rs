//! Causal attention in the two modes of `train.attention`:
//! - materialized, as llm.c's CUDA version: the heads of the packed qkv permuted to per-head
//!   layout (q (B,NH,T,HS), k and v (B,NKV,T,HS)), Q·Kᵀ and att·V as cuBLAS strided-batched
//!   GEMMs, causal softmax kernel, unpermute; the score matrices (B,NH,T,T) are stored. With
//!   grouped-query attention each product runs once per query head of a group, batched over
//!   (batch, key/value head), so K and V are read where they are, never repeated;
//! - fused: the flash-attention kernels of `flash.rs`, no (T,T) buffer anywhere.

use super::context::GpuContext;
use super::error::{CudaError, Result};
use super::gemm::{BatchStrides, GemmShape};
use crate::backend::{AttentionShape, Buf};

/// One batched product per query head `j` of a group: operands start `j` matrices into their
/// buffer when their stride is per query head.
#[derive(Clone, Copy)]
struct Operand<'a> {
    buf: &'a Buf,
    /// Elements of one matrix.
    size: usize,
    /// Whether the operand has one matrix per query head (q, scores, the output's heads) rather
    /// than one per key/value head (k, v).
    per_query_head: bool,
}

impl<'a> Operand<'a> {
    fn query(buf: &'a Buf, size: usize) -> Self {
        Operand {
            buf,
            size,
            per_query_head: true,
        }
    }

    fn key_value(buf: &'a Buf, size: usize) -> Self {
        Operand {
            buf,
            size,
            per_query_head: false,
        }
    }

    /// The view for query head `j` of each group and its batch stride.
    fn at(&self, j: usize, group: usize) -> Result<(Buf, usize)> {
        if self.per_query_head {
            let start = j * self.size;
            Ok((
                self.buf.slice(start, self.buf.len() - start)?,
                group * self.size,
            ))
        } else {
            Ok((self.buf.clone(), self.size))
        }
    }
}

impl GpuContext {
    /// The permute kernels' int arguments beyond the pointers: (B, T, heads, HS, W, first head).
    fn permute_args(&self, s: &AttentionShape, heads: usize, first: usize) -> Result<[i32; 6]> {
        let to_i32 = |v: usize| {
            i32::try_from(v)
                .map_err(|_| CudaError::precondition("attention", format!("{v} exceeds i32")))
        };
        Ok([
            to_i32(s.b)?,
            to_i32(s.t)?,
            to_i32(heads)?,
            to_i32(s.hs)?,
            to_i32(s.qkv_width())?,
            to_i32(first)?,
        ])
    }

    /// `c = alpha · a · b (+ c)` for every query head of a group, batched over (batch,
    /// key/value head); with `accumulate_group` the products of a group's heads are summed into
    /// one output (the key/value heads' gradients).
    #[allow(clippy::too_many_arguments)]
    fn grouped_gemm(
        &self,
        label: &'static str,
        s: &AttentionShape,
        shape: GemmShape,
        c: Operand<'_>,
        a: Operand<'_>,
        b: Operand<'_>,
        alpha: f32,
        accumulate_group: bool,
    ) -> Result<()> {
        let g = s.group();
        for j in 0..g {
            let ((cv, sc), (av, sa), (bv, sb)) = (c.at(j, g)?, a.at(j, g)?, b.at(j, g)?);
            let batch = BatchStrides {
                count: s.b * s.nkv,
                stride_a: sa,
                stride_b: sb,
                stride_c: sc,
            };
            let beta = if accumulate_group && j > 0 { 1.0 } else { 0.0 };
            self.blas()
                .matmul_strided_batched(&cv, &av, &bv, shape, batch, alpha, beta)?;
            self.profile_mark(label)?;
        }
        Ok(())
    }

    /// The per-head parts of `qkvr` (or `dqkvr`): q (B,NH,T,HS), k and v (B,NKV,T,HS).
    fn heads(s: &AttentionShape, qkvr: &Buf) -> Result<[Buf; 3]> {
        let (q, kv) = (s.b * s.nh * s.t * s.hs, s.b * s.nkv * s.t * s.hs);
        Ok([
            qkvr.slice(0, q)?,
            qkvr.slice(q, kv)?,
            qkvr.slice(q + kv, kv)?,
        ])
    }

    /// The materialized forward: acts qkvr (per-head q, k, v), att (B,NH,T,T), vaccum
    /// (B,NH,T,HS).
    pub(super) fn materialized_forward(
        &self,
        out: &Buf,
        qkvr: &Buf,
        att: &Buf,
        vaccum: &Buf,
        qkv: &Buf,
        s: AttentionShape,
    ) -> Result<()> {
        let (t, hs) = (s.t, s.hs);
        let [q, k, v] = Self::heads(&s, qkvr)?;
        for (dst, heads, first) in [(&q, s.nh, 0), (&k, s.nkv, s.nh), (&v, s.nkv, s.nh + s.nkv)] {
            self.launch_attention(
                ("attention_permute", "attention_permute_vec"),
                s.b * heads * t * hs,
                &[dst.ptr(), qkv.ptr()],
                &self.permute_args(&s, heads, first)?,
            )?;
        }
        let scale = 1.0 / (hs as f32).sqrt();
        let (th, tt) = (t * hs, t * t);
        // att (T,T) = scale · q (T,HS) · k (T,HS)ᵀ per (b, h).
        let qk = GemmShape {
            m: t,
            n: t,
            k: hs,
            trans_a: false,
            trans_b: true,
        };
        let label = "gemm: attention_forward";
        let (att_h, q_h, k_h) = (
            Operand::query(att, tt),
            Operand::query(&q, th),
            Operand::key_value(&k, th),
        );
        self.grouped_gemm(label, &s, qk, att_h, q_h, k_h, scale, false)?;
        self.launch_rows(
            "attention_softmax_forward",
            &[att.ptr(), att.ptr()],
            s.rows_len(),
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
        let y = Operand::query(vaccum, th);
        self.grouped_gemm(
            label,
            &s,
            av,
            y,
            att_h,
            Operand::key_value(&v, th),
            1.0,
            false,
        )?;
        let dims = self.permute_args(&s, s.nh, 0)?;
        self.launch_attention(
            ("attention_unpermute", "attention_unpermute_vec"),
            s.out_len(),
            &[out.ptr(), vaccum.ptr()],
            &dims[..4],
        )
    }

    /// The materialized backward: scratch dqkvr (per-head dq, dk, dv), datt (B,NH,T,T),
    /// dvaccum (B,NH,T,HS).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn materialized_backward(
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
        let (t, hs) = (s.t, s.hs);
        let [q, k, v] = Self::heads(&s, qkvr)?;
        let [dq, dk, dv] = Self::heads(&s, dqkvr)?;
        let scale = 1.0 / (hs as f32).sqrt();
        let (th, tt) = (t * hs, t * t);
        let label = "gemm: attention_backward";
        let dims = self.permute_args(&s, s.nh, 0)?;
        self.launch_attention(
            (
                "attention_unpermute_backward",
                "attention_unpermute_backward_vec",
            ),
            s.out_len(),
            &[dvaccum.ptr(), dout.ptr()],
            &dims[..4],
        )?;
        let (att_h, datt_h, dy_h) = (
            Operand::query(att, tt),
            Operand::query(datt, tt),
            Operand::query(dvaccum, th),
        );
        // datt (T,T) = dvaccum (T,HS) · v (T,HS)ᵀ
        let g1 = GemmShape {
            m: t,
            n: t,
            k: hs,
            trans_a: false,
            trans_b: true,
        };
        let v_kv = Operand::key_value(&v, th);
        self.grouped_gemm(label, &s, g1, datt_h, dy_h, v_kv, 1.0, false)?;
        // dv (T,HS) = Σ over the group of att (T,T)ᵀ · dvaccum (T,HS)
        let g2 = GemmShape {
            m: t,
            n: hs,
            k: t,
            trans_a: true,
            trans_b: false,
        };
        let dv_kv = Operand::key_value(&dv, th);
        self.grouped_gemm(label, &s, g2, dv_kv, att_h, dy_h, 1.0, true)?;
        // dpreatt = softmax backward, in place over datt.
        self.launch_rows(
            "attention_softmax_backward",
            &[datt.ptr(), datt.ptr(), att.ptr()],
            s.rows_len(),
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
        let (dq_h, k_kv) = (Operand::query(&dq, th), Operand::key_value(&k, th));
        self.grouped_gemm(label, &s, g3, dq_h, datt_h, k_kv, scale, false)?;
        // dk (T,HS) = scale · Σ over the group of dpreatt (T,T)ᵀ · q (T,HS)
        let g4 = GemmShape {
            m: t,
            n: hs,
            k: t,
            trans_a: true,
            trans_b: false,
        };
        let (dk_kv, q_h) = (Operand::key_value(&dk, th), Operand::query(&q, th));
        self.grouped_gemm(label, &s, g4, dk_kv, datt_h, q_h, scale, true)?;
        for (src, heads, first) in [
            (&dq, s.nh, 0),
            (&dk, s.nkv, s.nh),
            (&dv, s.nkv, s.nh + s.nkv),
        ] {
            self.launch_attention(
                (
                    "attention_permute_backward",
                    "attention_permute_backward_vec",
                ),
                s.b * heads * t * hs,
                &[dqkv.ptr(), src.ptr()],
                &self.permute_args(&s, heads, first)?,
            )?;
        }
        Ok(())
    }

    /// Permute kernels: pointers, then (B, T, heads, HS[, W, first]) as int; `n` = B·heads·T·HS
    /// elements. Uses `name_vec` (one thread per 16-byte pack, int index math) when HS divides
    /// by the pack, every pointer is 16-byte aligned and the pack count is at most 2^30.
    fn launch_attention(
        &self,
        (name, name_vec): (&'static str, &'static str),
        n: usize,
        ptrs: &[u64],
        dims: &[i32],
    ) -> Result<()> {
        let pack = self.pack();
        let hs = usize::try_from(dims[3]).unwrap_or(0);
        let vec = hs % pack == 0
            && n / pack <= 1 << 30
            && super::kernels::aligned16(ptrs.iter().copied());
        let (kernel, threads) = if vec { (name_vec, n / pack) } else { (name, n) };
        let cfg = super::kernels::elementwise_config(threads);
        self.launch_ptrs_ints(kernel, cfg, ptrs, dims)
    }

    /// Softmax kernels: pointers, then (rows, T) as int; one warp per row.
    fn launch_rows(&self, name: &'static str, ptrs: &[u64], rows: usize, t: usize) -> Result<()> {
        let to_i32 = |v: usize| {
            i32::try_from(v).map_err(|_| CudaError::precondition(name, format!("{v} exceeds i32")))
        };
        let cfg = super::kernels::rows_config(rows)?;
        self.launch_ptrs_ints(name, cfg, ptrs, &[to_i32(rows)?, to_i32(t)?])
    }
}
