//! The optimizer's step arithmetic besides AdamW's kernels (which the backends own:
//! `backend::cpu::adamw` on the host): the learning-rate schedule, global-norm clipping and fp16
//! loss scaling.

mod clip;
mod loss_scale;
mod schedule;

pub use clip::clip_scale;
pub use loss_scale::{LossScaler, StepDecision};
pub use schedule::lr_at;
