//! What causal self-attention needs besides its operands: its sizes ([`AttentionShape`], with
//! key/value heads and a head size of its own), how it keeps what its backward reads
//! ([`AttentionMode`]) and the buffers of each mode ([`AttentionActs`], [`AttentionScratch`]).
//!
//! Layout of the attention's input, `qkv` (B, T, (NH + 2·NKV)·HS): each token's NH query heads,
//! then its NKV key heads, then its NKV value heads, HS elements each — what one GEMM against the
//! rows of `q_proj`, `k_proj` and `v_proj` stacked writes. GPT-2's `c_attn` output (B, T, 3C) is
//! the case NKV = NH, HS = C/NH. Query head h reads key/value head h / (NH/NKV) (grouped-query
//! attention); no backend repeats K or V in memory. The output is (B, T, NH·HS).

use super::arena::{Arena, Buf};
use super::device::{DType, DeviceError, Result};

/// `train.attention`, a setting of the config that every attention operation takes.
pub use crate::config::AttentionMode;

/// Sizes of one causal self-attention call: B sequences of T tokens, NH query heads and NKV
/// key/value heads (NKV divides NH) of HS elements each; the scores are scaled by 1/√HS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub b: usize,
    pub t: usize,
    /// Query heads.
    pub nh: usize,
    /// Key/value heads.
    pub nkv: usize,
    /// Head size.
    pub hs: usize,
}

impl AttentionShape {
    /// Multi-head attention over C = NH·HS channels (GPT-2's: as many key/value heads as query
    /// heads).
    pub fn multi_head(b: usize, t: usize, c: usize, nh: usize) -> AttentionShape {
        AttentionShape {
            b,
            t,
            nh,
            nkv: nh,
            hs: c / nh.max(1),
        }
    }

    pub fn head_size(&self) -> usize {
        self.hs
    }
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.nh / self.nkv.max(1)
    }
    /// Width of the output and of the query part of a token: NH·HS.
    pub fn q_width(&self) -> usize {
        self.nh * self.hs
    }
    /// Width of one token of qkv: (NH + 2·NKV)·HS.
    pub fn qkv_width(&self) -> usize {
        (self.nh + 2 * self.nkv) * self.hs
    }
    /// Elements of the output (B,T,NH·HS).
    pub fn out_len(&self) -> usize {
        self.b * self.t * self.q_width()
    }
    /// Elements of qkv (B,T,(NH+2·NKV)·HS).
    pub fn qkv_len(&self) -> usize {
        self.b * self.t * self.qkv_width()
    }
    /// Elements of one (B,NH,T,T) score tensor.
    pub fn scores_len(&self) -> usize {
        self.b * self.nh * self.t * self.t
    }
    /// Elements of q, k, v together in per-head layout: q (B,NH,T,HS), then k and v
    /// (B,NKV,T,HS) each.
    pub fn qkvr_len(&self) -> usize {
        self.qkv_len()
    }
    /// Elements of one per-row statistic (B,NH,T): the fused mode's logsumexp and D.
    pub fn rows_len(&self) -> usize {
        self.b * self.nh * self.t
    }

    /// Fails unless the sizes are positive and NKV divides NH.
    pub fn check(&self, op: &'static str) -> Result<()> {
        super::device::ensure(
            self.b > 0
                && self.t > 0
                && self.hs > 0
                && self.nkv > 0
                && self.nh > 0
                && self.nh % self.nkv == 0,
            op,
            || format!("attention sizes {self:?}: need positive sizes and NKV dividing NH"),
        )
    }
}

/// What attention's forward writes and its backward reads, per [`AttentionMode`].
#[derive(Debug, Clone)]
pub enum AttentionActs {
    /// All X.
    Materialized {
        /// q, k, v in per-head layout (see [`AttentionShape::qkvr_len`]).
        qkvr: Buf,
        /// Softmax probabilities (B,NH,T,T), zero above the diagonal.
        att: Buf,
        /// att·V in per-head layout (B,NH,T,HS): scratch of the forward pass.
        vaccum: Buf,
    },
    /// No (T,T) buffer: the backward recomputes the scores from qkv and the output.
    Fused {
        /// (B,NH,T) f32: logsumexp over the visible keys of each query row's scaled scores.
        lse: Buf,
    },
}

/// Scratch of attention's backward pass; one set can serve every layer.
#[derive(Debug, Clone)]
pub enum AttentionScratch {
    /// All X.
    Materialized {
        /// dq, dk, dv in per-head layout.
        dqkvr: Buf,
        /// (B,NH,T,T): d(att), then d(scores) in place.
        datt: Buf,
        /// dout in per-head layout (B,NH,T,HS).
        dvaccum: Buf,
    },
    Fused {
        /// (B,NH,T) f32: D = rowsum(dout ∘ out) of each query row and head.
        delta: Buf,
    },
}

/// Ledger names of attention's allocations ("what takes the memory").
const ATTENTION_ACTS: &str = "block activations";
const ATTENTION_SCORES: &str = "attention scores";
const ATTENTION_SCRATCH: &str = "block scratch";
const ATTENTION_ROWS: &str = "attention row statistics";

impl AttentionActs {
    /// Allocates (or counts) the activations of one attention call in `mode`, X = `x`.
    pub fn alloc(arena: &Arena, mode: AttentionMode, s: &AttentionShape, x: DType) -> Result<Self> {
        Ok(match mode {
            AttentionMode::Materialized => AttentionActs::Materialized {
                qkvr: arena.alloc(ATTENTION_ACTS, x, s.qkvr_len())?,
                att: arena.alloc(ATTENTION_SCORES, x, s.scores_len())?,
                vaccum: arena.alloc(ATTENTION_ACTS, x, s.out_len())?,
            },
            AttentionMode::Fused => AttentionActs::Fused {
                lse: arena.alloc(ATTENTION_ROWS, DType::F32, s.rows_len())?,
            },
        })
    }

    pub fn mode(&self) -> AttentionMode {
        match self {
            AttentionActs::Materialized { .. } => AttentionMode::Materialized,
            AttentionActs::Fused { .. } => AttentionMode::Fused,
        }
    }
}

impl AttentionScratch {
    /// Allocates (or counts) the backward scratch of one attention call in `mode`, X = `x`.
    pub fn alloc(arena: &Arena, mode: AttentionMode, s: &AttentionShape, x: DType) -> Result<Self> {
        Ok(match mode {
            AttentionMode::Materialized => AttentionScratch::Materialized {
                dqkvr: arena.alloc(ATTENTION_SCRATCH, x, s.qkvr_len())?,
                datt: arena.alloc(ATTENTION_SCORES, x, s.scores_len())?,
                dvaccum: arena.alloc(ATTENTION_SCRATCH, x, s.out_len())?,
            },
            AttentionMode::Fused => AttentionScratch::Fused {
                delta: arena.alloc(ATTENTION_ROWS, DType::F32, s.rows_len())?,
            },
        })
    }

    pub fn mode(&self) -> AttentionMode {
        match self {
            AttentionScratch::Materialized { .. } => AttentionMode::Materialized,
            AttentionScratch::Fused { .. } => AttentionMode::Fused,
        }
    }
}

/// The error of an attention backward handed acts and scratch of different modes.
pub fn attention_modes_differ(
    op: &'static str,
    acts: &AttentionActs,
    scratch: &AttentionScratch,
) -> DeviceError {
    DeviceError::op(
        op,
        format!(
            "acts are {} but scratch is {}: allocate both for one train.attention mode",
            acts.mode().name(),
            scratch.mode().name()
        ),
    )
}
