//! AdamW with decoupled weight decay, the learning-rate schedule, global-norm clipping and fp16
//! loss scaling: the optimizer's arithmetic, shared by both backends.

mod adamw;
mod loss_scale;
mod schedule;

pub use adamw::{
    adamw_update, adamw_update_any, adamw_update_bf16, clip_scale, sum_of_squares, Cast, Moments,
};
pub use loss_scale::{LossScaler, StepDecision};
pub use schedule::lr_at;
