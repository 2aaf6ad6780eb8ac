//! What a run did, printed at its end: the [`Summary`], and how a signal [`Stopped`] it.

use crate::engine::StepStats;

/// What a run did, printed at its end.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub steps: usize,
    pub params: usize,
    pub first_loss: f32,
    /// Mean loss of the last (up to) 10 steps.
    pub final_loss: f32,
    /// The last validation loss (after the last step), when `data.val` is set.
    pub val_loss: Option<f32>,
    pub tokens: usize,
    pub seconds: f64,
    /// Mean over steps after the first (which includes warm-up effects).
    pub tokens_per_s: f64,
    pub tflops: f64,
    /// The data-parallel rank that wrote this summary (only rank 0 prints it).
    pub rank: usize,
    /// Set when SIGINT or SIGTERM stopped the run before `train.steps` (after saving).
    pub stopped: Option<Stopped>,
}

/// A run that a signal stopped: it finished its step, saved a checkpoint and ended, which is not
/// an error; `strata train` exits with 128 + the signal's number, as a shell reports a signal.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stopped {
    pub signal: i32,
    /// The last step taken (and saved).
    pub step: usize,
    pub checkpoint: std::path::PathBuf,
}

impl Stopped {
    /// "SIGINT" or "SIGTERM".
    pub fn signal_name(&self) -> &'static str {
        if self.signal == libc::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.stopped {
            Some(s) => write!(
                f,
                "stopped by {} after step {} (checkpoint written to {}; continue with --resume latest): ",
                s.signal_name(),
                s.step,
                s.checkpoint.display()
            )?,
            None => write!(f, "done: ")?,
        }
        if self.steps == 0 {
            return write!(
                f,
                "0 steps, {} params: the run was already at train.steps",
                self.params
            );
        }
        write!(
            f,
            "{} steps, {} params, loss {:.4} -> {:.4} (mean of last 10), ",
            self.steps, self.params, self.first_loss, self.final_loss
        )?;
        if let Some(v) = self.val_loss {
            write!(f, "val loss {v:.4}, ")?;
        }
        write!(
            f,
            "{} tokens in {:.1}s, {:.0} tokens/s, {:.3} TFLOP/s",
            self.tokens, self.seconds, self.tokens_per_s, self.tflops
        )
    }
}

/// The summary of the steps in `history` (the first one, with its warm-up, not timed).
pub(super) fn summarize(history: &[StepStats], params: usize, rank: usize) -> Summary {
    let tail = &history[history.len().saturating_sub(10)..];
    let timed = if history.len() > 1 {
        &history[1..]
    } else {
        history
    };
    let seconds_timed: f64 = timed.iter().map(|s| s.step_ms / 1e3).sum();
    let tokens_timed: usize = timed.iter().map(|s| s.tokens).sum();
    let flops_timed: f64 = timed.iter().map(|s| s.tflops * s.step_ms / 1e3).sum();
    Summary {
        steps: history.len(),
        params,
        first_loss: history.first().map_or(f32::NAN, |s| s.loss),
        final_loss: tail.iter().map(|s| s.loss).sum::<f32>() / tail.len().max(1) as f32,
        val_loss: None,
        tokens: history.iter().map(|s| s.tokens).sum(),
        seconds: history.iter().map(|s| s.step_ms / 1e3).sum(),
        tokens_per_s: tokens_timed as f64 / seconds_timed.max(1e-9),
        tflops: flops_timed / seconds_timed.max(1e-9),
        rank,
        stopped: None,
    }
}
