//! Device memory of the GPU GPT-2 trainer: the parameter layout (fp32 master vs padded device
//! layout) and every buffer of a step, allocated once from the arena at construction.
//!
//! The same function (`Buffers::build`) runs twice: with a byte counter to size the arena, then
//! with the arena itself, so the arena is exactly as large as the plan (no allocation in a step).

use super::arena::{DeviceArena, DeviceBuf, ARENA_ALIGN_BYTES};
use super::error::Result;
use super::kernels::NORM_PARTIALS_MAX;
use super::DType;
use crate::model::UnitSpec;

/// The LM head's vocabulary is padded to a multiple of this (tensor-core friendly GEMM sizes).
pub const VOCAB_PAD: usize = 128;

/// Sizes fixed at construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Micro-batch size B and sequence length T.
    pub b: usize,
    pub t: usize,
    /// n_embd C, n_head NH, n_layer L.
    pub c: usize,
    pub nh: usize,
    pub l: usize,
    /// Real vocabulary V and padded vocabulary Vp (multiple of VOCAB_PAD).
    pub v: usize,
    pub vp: usize,
    /// Most micro-batches one step may take (losses and tokens are sized for it).
    pub micro_max: usize,
    /// Keep only each layer's input; recompute the layer in backward.
    pub checkpointing: bool,
}

impl Dims {
    pub fn bt(&self) -> usize {
        self.b * self.t
    }
}

/// Where one tensor lives: in the fp32 master/m/v buffers (the `UnitSpec` layout) and in the
/// device layout of the floatX weights and fp32 gradients (the same, except that wte has Vp rows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSlot {
    pub master_offset: usize,
    pub numel: usize,
    pub device_offset: usize,
    /// numel, or Vp·C for the padded token embedding.
    pub device_numel: usize,
    pub decay: bool,
}

/// A run of tensors that AdamW updates with one launch: contiguous in both layouts, same decay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdamSegment {
    pub master_offset: usize,
    pub device_offset: usize,
    pub numel: usize,
    pub decay: bool,
}

/// The parameter layout of all units.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    /// slots[unit][tensor]
    pub slots: Vec<Vec<TensorSlot>>,
    /// Elements of the master layout (the model's parameter count).
    pub master_len: usize,
    /// Elements of the device layout.
    pub device_len: usize,
    pub segments: Vec<AdamSegment>,
}

impl ParamLayout {
    /// `padded_rows` pads the tensor named `transformer.wte.weight` (V, C) to (Vp, C).
    pub fn new(units: &[UnitSpec], vp: usize) -> ParamLayout {
        let (mut master, mut device) = (0usize, 0usize);
        let mut slots = Vec::with_capacity(units.len());
        for unit in units {
            let mut unit_slots = Vec::with_capacity(unit.tensors.len());
            for t in &unit.tensors {
                let numel = t.numel();
                let device_numel = if t.name == "transformer.wte.weight" && t.shape.len() == 2 {
                    vp.max(t.shape[0]) * t.shape[1]
                } else {
                    numel
                };
                unit_slots.push(TensorSlot {
                    master_offset: master,
                    numel,
                    device_offset: device,
                    device_numel,
                    decay: t.decay,
                });
                master += numel;
                device += device_numel;
            }
            slots.push(unit_slots);
        }
        let mut segments: Vec<AdamSegment> = Vec::new();
        for s in slots.iter().flatten() {
            if let Some(last) = segments.last_mut() {
                let contiguous = last.master_offset + last.numel == s.master_offset
                    && last.device_offset + last.numel == s.device_offset;
                if contiguous && last.decay == s.decay {
                    last.numel += s.numel;
                    continue;
                }
            }
            segments.push(AdamSegment {
                master_offset: s.master_offset,
                device_offset: s.device_offset,
                numel: s.numel,
                decay: s.decay,
            });
        }
        ParamLayout {
            slots,
            master_len: master,
            device_len: device,
            segments,
        }
    }
}

/// Hands out buffers: the arena, or a byte counter that sizes the arena.
pub trait Allocator {
    type Buf;
    fn alloc(&mut self, what: &'static str, dtype: DType, numel: usize) -> Result<Self::Buf>;
}

/// Counts the bytes the arena would hand out (same padding as `DeviceArena::alloc`).
#[derive(Debug, Default)]
pub struct ByteCounter {
    pub bytes: usize,
}

impl Allocator for ByteCounter {
    type Buf = ();
    fn alloc(&mut self, _what: &'static str, dtype: DType, numel: usize) -> Result<()> {
        let size = numel.saturating_mul(dtype.size_bytes());
        let padded = size.div_ceil(ARENA_ALIGN_BYTES).max(1) * ARENA_ALIGN_BYTES;
        self.bytes = self.bytes.saturating_add(padded);
        Ok(())
    }
}

/// Allocates from a live arena.
pub struct ArenaAllocator<'a>(pub &'a DeviceArena);

impl Allocator for ArenaAllocator<'_> {
    type Buf = DeviceBuf;
    fn alloc(&mut self, what: &'static str, dtype: DType, numel: usize) -> Result<DeviceBuf> {
        self.0.alloc(what, dtype, numel)
    }
}

/// What one layer's forward keeps for its backward (llm.c's ActivationTensors, one layer).
pub struct LayerActs<B> {
    pub ln1: B,       // (B,T,C) X
    pub ln1_mean: B,  // (B,T) f32
    pub ln1_rstd: B,  // (B,T) f32
    pub qkv: B,       // (B,T,3C) X
    pub atty: B,      // (B,T,C) X
    pub qkvr: B,      // (3,B,NH,T,HS) X
    pub att: B,       // (B,NH,T,T) X
    pub residual2: B, // (B,T,C) X
    pub ln2: B,       // (B,T,C) X
    pub ln2_mean: B,  // (B,T) f32
    pub ln2_rstd: B,  // (B,T) f32
    pub fch: B,       // (B,T,4C) X
    pub fch_gelu: B,  // (B,T,4C) X
}

impl<B> LayerActs<B> {
    fn build<A: Allocator<Buf = B>>(a: &mut A, x: DType, d: &Dims) -> Result<Self> {
        let (bt, c) = (d.bt(), d.c);
        Ok(LayerActs {
            ln1: a.alloc("ln1", x, bt * c)?,
            ln1_mean: a.alloc("ln1_mean", DType::F32, bt)?,
            ln1_rstd: a.alloc("ln1_rstd", DType::F32, bt)?,
            qkv: a.alloc("qkv", x, bt * 3 * c)?,
            atty: a.alloc("atty", x, bt * c)?,
            qkvr: a.alloc("qkvr", x, 3 * bt * c)?,
            att: a.alloc("att", x, d.b * d.nh * d.t * d.t)?,
            residual2: a.alloc("residual2", x, bt * c)?,
            ln2: a.alloc("ln2", x, bt * c)?,
            ln2_mean: a.alloc("ln2_mean", DType::F32, bt)?,
            ln2_rstd: a.alloc("ln2_rstd", DType::F32, bt)?,
            fch: a.alloc("fch", x, bt * 4 * c)?,
            fch_gelu: a.alloc("fch_gelu", x, bt * 4 * c)?,
        })
    }
}

/// Every device buffer of the trainer.
pub struct Buffers<B> {
    pub master: B,   // (P) f32, UnitSpec layout
    pub adam_m: B,   // (P) f32
    pub adam_v: B,   // (P) f32
    pub grads: B,    // (Pd) f32, device layout
    pub params_x: B, // (Pd) X, device layout
    /// (2, micro_max, B, T) i32: every micro-batch's inputs, then every micro-batch's targets.
    pub tokens: B,
    /// residuals[l] (B,T,C) X is the input of layer l; residuals[L] the head's input;
    /// residuals[0] the embedding's output.
    pub residuals: Vec<B>,
    /// One per layer, or one shared by all layers with checkpointing.
    pub layers: Vec<LayerActs<B>>,
    pub vaccum: B,   // (B,NH,T,HS) X, attention scratch
    pub proj_out: B, // (B,T,C) X, output of each projection before its residual add
    pub lnf: B,      // (B,T,C) X
    pub lnf_mean: B, // (B,T) f32
    pub lnf_rstd: B, // (B,T) f32
    pub logits: B,   // (B,T,Vp) X; dlogits in place
    pub losses: B,   // (micro_max, B, T) f32
    // Backward scratch, shared by every layer.
    pub dres: B,          // (B,T,C) X, gradient along the residual stream
    pub dln: B,           // (B,T,C) X, gradient of a LayerNorm output
    pub datty: B,         // (B,T,C) X
    pub dqkv: B,          // (B,T,3C) X
    pub dfch: B,          // (B,T,4C) X
    pub dfch_gelu: B,     // (B,T,4C) X
    pub dqkvr: B,         // (3,B,NH,T,HS) X
    pub datt: B,          // (B,NH,T,T) X
    pub dvaccum: B,       // (B,NH,T,HS) X
    pub norm: B,          // (1) f32, squared global grad norm
    pub norm_partials: B, // (NORM_PARTIALS_MAX) f32
}

impl<B> Buffers<B> {
    /// Allocates (or counts) every buffer for `layout` and `dims` with floatX = `x`.
    pub fn build<A: Allocator<Buf = B>>(
        a: &mut A,
        x: DType,
        layout: &ParamLayout,
        d: &Dims,
    ) -> Result<Self> {
        let (bt, c) = (d.bt(), d.c);
        let (p, pd) = (layout.master_len, layout.device_len);
        let layer_count = if d.checkpointing { 1 } else { d.l };
        Ok(Buffers {
            master: a.alloc("master params", DType::F32, p)?,
            adam_m: a.alloc("adam m", DType::F32, p)?,
            adam_v: a.alloc("adam v", DType::F32, p)?,
            grads: a.alloc("grads", DType::F32, pd)?,
            params_x: a.alloc("compute params", x, pd)?,
            tokens: a.alloc("tokens", DType::I32, 2 * d.micro_max * bt)?,
            residuals: (0..=d.l)
                .map(|_| a.alloc("residual", x, bt * c))
                .collect::<Result<_>>()?,
            layers: (0..layer_count)
                .map(|_| LayerActs::build(a, x, d))
                .collect::<Result<_>>()?,
            vaccum: a.alloc("vaccum", x, bt * c)?,
            proj_out: a.alloc("proj_out", x, bt * c)?,
            lnf: a.alloc("lnf", x, bt * c)?,
            lnf_mean: a.alloc("lnf_mean", DType::F32, bt)?,
            lnf_rstd: a.alloc("lnf_rstd", DType::F32, bt)?,
            logits: a.alloc("logits", x, bt * d.vp)?,
            losses: a.alloc("losses", DType::F32, d.micro_max * bt)?,
            dres: a.alloc("dres", x, bt * c)?,
            dln: a.alloc("dln", x, bt * c)?,
            datty: a.alloc("datty", x, bt * c)?,
            dqkv: a.alloc("dqkv", x, bt * 3 * c)?,
            dfch: a.alloc("dfch", x, bt * 4 * c)?,
            dfch_gelu: a.alloc("dfch_gelu", x, bt * 4 * c)?,
            dqkvr: a.alloc("dqkvr", x, 3 * bt * c)?,
            datt: a.alloc("datt", x, d.b * d.nh * d.t * d.t)?,
            dvaccum: a.alloc("dvaccum", x, bt * c)?,
            norm: a.alloc("grad norm", DType::F32, 1)?,
            norm_partials: a.alloc("grad norm partials", DType::F32, NORM_PARTIALS_MAX)?,
        })
    }
}

/// Bytes of arena the trainer needs for `layout` and `dims` (without the cuBLAS workspace).
pub fn arena_bytes(x: DType, layout: &ParamLayout, d: &Dims) -> usize {
    let mut counter = ByteCounter::default();
    // The counter never fails.
    match Buffers::build(&mut counter, x, layout, d) {
        Ok(_) => counter.bytes,
        Err(_) => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt2::{Gpt2, Gpt2Shape};
    use crate::model::Model;

    fn shape() -> Gpt2Shape {
        Gpt2Shape {
            n_layer: 2,
            n_head: 4,
            n_embd: 64,
            vocab_size: 300,
            max_seq_len: 32,
        }
    }

    #[test]
    fn wte_is_padded_and_segments_cover_every_parameter() {
        let s = shape();
        let model = Gpt2::new(s);
        let layout = ParamLayout::new(model.units(), 384);
        assert_eq!(layout.master_len, s.num_params());
        assert_eq!(layout.device_len, s.num_params() + (384 - 300) * 64);
        let wte = &layout.slots[0][0];
        assert_eq!((wte.numel, wte.device_numel), (300 * 64, 384 * 64));
        assert_eq!(layout.slots[0][1].device_offset, 384 * 64);
        let covered: usize = layout.segments.iter().map(|s| s.numel).sum();
        assert_eq!(covered, layout.master_len);
        for seg in &layout.segments {
            let slot = layout
                .slots
                .iter()
                .flatten()
                .find(|t| t.master_offset == seg.master_offset)
                .expect("segment starts at a tensor");
            assert_eq!(slot.device_offset, seg.device_offset);
        }
        // ln_1.weight and ln_1.bias (both without decay) share one launch.
        let block = &layout.slots[1];
        assert!(layout
            .segments
            .iter()
            .any(|s| s.master_offset == block[0].master_offset && s.numel == 2 * 64));
    }

    #[test]
    fn gpt_1_3b_fits_an_h100() {
        let s = Gpt2Shape {
            n_layer: 24,
            n_head: 16,
            n_embd: 2048,
            vocab_size: 50304,
            max_seq_len: 1024,
        };
        let layout = ParamLayout::new(Gpt2::new(s).units(), 50304);
        let d = Dims {
            b: 8,
            t: 1024,
            c: 2048,
            nh: 16,
            l: 24,
            v: 50304,
            vp: 50304,
            micro_max: 1,
            checkpointing: false,
        };
        let gib = arena_bytes(DType::Bf16, &layout, &d) as f64 / (1u64 << 30) as f64;
        eprintln!("GPT 1.3B, B=8, T=1024, bf16, no checkpointing: arena {gib:.1} GiB");
        // 18 bytes per parameter (fp32 master, m, v, grads; bf16 weights) ≈ 22 GiB, plus about
        // 24 GiB of activations: well inside an H100's 80 GB with room for cuBLAS and NVRTC.
        assert!((40.0..60.0).contains(&gib), "{gib:.1} GiB");
    }

    #[test]
    fn checkpointing_needs_less_memory() {
        let s = shape();
        let layout = ParamLayout::new(Gpt2::new(s).units(), 384);
        let mut d = Dims {
            b: 4,
            t: 32,
            c: 64,
            nh: 4,
            l: 2,
            v: 300,
            vp: 384,
            micro_max: 1,
            checkpointing: false,
        };
        let full = arena_bytes(DType::Bf16, &layout, &d);
        d.checkpointing = true;
        let ckpt = arena_bytes(DType::Bf16, &layout, &d);
        assert!(
            ckpt < full && full > 5 * layout.master_len * 4,
            "{ckpt} {full}"
        );
    }
}
