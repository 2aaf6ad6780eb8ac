//! AdamW with decoupled weight decay, the learning-rate schedule, global-norm clipping and fp16
//! loss scaling: the optimizer's arithmetic, shared by both backends.

mod adamw;
mod loss_scale;
mod schedule;

pub use adamw::{adamw_update, clip_scale, sum_of_squares};
pub use loss_scale::{LossScaler, StepDecision};
pub use schedule::lr_at;
