//! AdamW with decoupled weight decay, the learning-rate schedule, and global-norm clipping.

mod adamw;
mod schedule;

pub use adamw::{adamw_update, clip_scale, sum_of_squares, AdamWParams};
pub use schedule::lr_at;
