//! Checks for a model of your own, to run in its tests.
//!
//! [`check_model_gradients`] trains nothing. It runs the model through an engine twice on the
//! CPU backend (fp32, one rank, every state on the device) and compares the gradients of one
//! micro-batch with and without activation checkpointing; then it calls each stage on its own,
//! with random inputs and a random probe `p` of its output, and compares its backward with
//! central finite differences of `Σ p·forward` (of the mean token loss for the last stage) for a
//! few elements of every parameter tensor and of the stage's input. A model that breaks the
//! [`Model`] trait's contract — a `backward` that reads activations another stage's `forward`
//! overwrote, a stage that keeps state between calls, a backward that does not match its forward
//! — fails naming the stage, tensor and element that disagree.
//!
//! ```no_run
//! # fn my_model() -> Box<dyn strata::Model> { unimplemented!() }
//! let mut config = strata::Config::default();
//! config.model.seq_len = 16;
//! config.data.micro_batch_size = 2;
//! let check = strata::testing::check_model_gradients(&config, my_model).unwrap();
//! println!("{check:?}");
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{self, Arena, Backend, Buf, DType, Device, DeviceError, DeviceOptions, Queue};
use crate::config::{Config, DeviceKind, OffloadDevice, Precision};
use crate::data::{DataError, Loader};
use crate::engine::{Engine, EngineError};
use crate::model::{Batch, HeadGrads, Model, Prepare, Tokens, UnitSpec};
use crate::rng::Rng;

/// Gradients with and without checkpointing may differ by this much, relative to the tensor's
/// largest gradient (the CPU backend recomputes bit for bit; this leaves room for a model whose
/// kernels reduce in a different order).
pub const CHECKPOINTING_REL_MAX: f64 = 1e-5;
/// A sampled gradient may differ from central finite differences by this much relative to the
/// larger of the two, beyond the rounding noise of the differenced scalar.
pub const FINITE_DIFFERENCE_REL_MAX: f64 = 2e-2;
/// The step of the central differences, added to and taken from one element at a time.
pub const FINITE_DIFFERENCE_STEP: f32 = 1e-2;
/// Elements of each tensor (and of each stage's input) checked against finite differences: its
/// largest gradients, then elements spread over it.
const LARGEST_PER_TENSOR: usize = 2;
const SPREAD_PER_TENSOR: usize = 2;

/// What [`check_model_gradients`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct GradientCheck {
    /// The loss of the micro-batch (the same with and without checkpointing).
    pub loss: f32,
    /// Largest difference between the gradients with and without checkpointing, relative to
    /// the largest gradient of the same tensor.
    pub checkpointing_rel: f64,
    /// Largest disagreement of a sampled gradient with finite differences, relative to the
    /// larger of the two (after the rounding noise allowance).
    pub finite_difference_rel: f64,
    /// Gradient elements (of parameters and stage inputs) compared with finite differences.
    pub elements_checked: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GradientCheckError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(
        "{tensor}[{index}]: the gradient is {with} with activation checkpointing and {without} without \
         (relative difference {rel:.2e}): backward must read only what the stage's latest forward \
         wrote (see the call order in the `Model` trait's documentation)"
    )]
    Checkpointing {
        tensor: String,
        index: usize,
        with: f32,
        without: f32,
        rel: f64,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(
        "stage {stage}, {tensor}[{index}]: the gradient is {analytic}, central finite differences \
         give {numeric} (step {step}): the stage's backward does not match its forward"
    )]
    FiniteDifferences {
        stage: String,
        tensor: String,
        index: usize,
        analytic: f32,
        numeric: f64,
        step: f32,
    },
    #[error("the loss is {with} with activation checkpointing and {without} without")]
    Loss { with: f32, without: f32 },
}

/// Checks `make()`'s gradients (see the module documentation) on one micro-batch of
/// `config.data.train` (the synthetic set by default), with `config.model.seq_len` and
/// `config.data.micro_batch_size`. The device, precision, ZeRO stage and offload settings of
/// `config` are replaced by the CPU backend in fp32 with every state on the device; it runs in
/// this process as one rank. Initial weights come from the model's init, seeded by
/// `data.seed`.
pub fn check_model_gradients(
    config: &Config,
    make: impl Fn() -> Box<dyn Model>,
) -> Result<GradientCheck, GradientCheckError> {
    let mut base = config.clone();
    base.train.device = DeviceKind::Cpu;
    base.train.precision = Precision::Fp32;
    base.zero.stage = 0;
    base.offload_param.device = OffloadDevice::None;
    base.offload_optimizer.device = OffloadDevice::None;
    base.data.grad_accum_steps = 1;
    let mut batch = Batch::zeros(base.data.micro_batch_size, base.model.seq_len);
    Loader::from_config(&base)?.fill(&mut batch)?;

    let gradients = |checkpointing: bool| -> Result<_, GradientCheckError> {
        let mut c = base.clone();
        c.train.activation_checkpointing = checkpointing;
        let mut engine = Engine::new(c, make())?;
        let loss = engine.forward_backward(std::slice::from_ref(&batch))?;
        Ok((loss, engine.grads()?))
    };
    let (loss_with, with) = gradients(true)?;
    let (loss, without) = gradients(false)?;
    if (loss_with - loss).abs() > 1e-6 * loss.abs() {
        return Err(GradientCheckError::Loss {
            with: loss_with,
            without: loss,
        });
    }
    let units = make().units().to_vec();
    let checkpointing_rel = compare_checkpointing(&units, &with, &without)?;
    let mut stages = StageBench::new(&base, make(), &batch)?;
    let (finite_difference_rel, elements_checked) = stages.check_all()?;
    Ok(GradientCheck {
        loss,
        checkpointing_rel,
        finite_difference_rel,
        elements_checked,
    })
}

/// Every tensor's gradients with and without checkpointing; the largest relative difference.
fn compare_checkpointing(
    units: &[UnitSpec],
    with: &[Vec<f32>],
    without: &[Vec<f32>],
) -> Result<f64, GradientCheckError> {
    let mut worst = 0.0f64;
    for (u, unit) in units.iter().enumerate() {
        for (spec, range) in unit.tensors.iter().zip(unit.ranges()) {
            let (a, b) = (&with[u][range.clone()], &without[u][range]);
            let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            for (index, (&x, &y)) in a.iter().zip(b).enumerate() {
                let rel = (x as f64 - y as f64).abs() / scale.max(f64::MIN_POSITIVE);
                if rel.is_nan() || rel > CHECKPOINTING_REL_MAX {
                    return Err(GradientCheckError::Checkpointing {
                        tensor: spec.name.clone(),
                        index,
                        with: x,
                        without: y,
                        rel,
                    });
                }
                worst = worst.max(rel);
            }
        }
    }
    Ok(worst)
}

/// The elements of a gradient `g` to check: its largest, then some spread evenly.
fn sample(g: &[f32]) -> Vec<usize> {
    let mut by_size: Vec<usize> = (0..g.len()).collect();
    by_size.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let mut picked: Vec<usize> = by_size.into_iter().take(LARGEST_PER_TENSOR).collect();
    for k in 0..SPREAD_PER_TENSOR {
        let i = (2 * k + 1) * g.len() / (2 * SPREAD_PER_TENSOR);
        if i < g.len() && !picked.contains(&i) {
            picked.push(i);
        }
    }
    picked
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// One model on a CPU device of its own, each stage called directly: buffers for every unit's
/// parameters and gradients, one micro-batch of tokens, a stage input, output and gradient.
struct StageBench {
    // Before `dev`: the model's views into the arena go first.
    model: Box<dyn Model>,
    units: Vec<UnitSpec>,
    /// Each unit's weights on the host (its init), and on the device (f32).
    host: Vec<Vec<f32>>,
    params: Vec<Buf>,
    grads: Vec<Buf>,
    tokens: Tokens,
    input: Buf,
    output: Buf,
    dres: Buf,
    losses: Buf,
    rng: Rng,
    dev: Arc<dyn Device>,
}

/// The device buffers of a [`StageBench`], allocated (or counted) on `arena`.
type Buffers = (Vec<Buf>, Vec<Buf>, Tokens, [Buf; 4]);

fn allocate(
    arena: &Arena,
    units: &[UnitSpec],
    act_len: usize,
    bt: usize,
    b: usize,
    t: usize,
) -> Result<Buffers, DeviceError> {
    let mut params = Vec::with_capacity(units.len());
    let mut grads = Vec::with_capacity(units.len());
    for unit in units {
        params.push(arena.alloc("params", DType::F32, unit.numel())?);
        grads.push(arena.alloc("gradients", DType::F32, unit.numel())?);
    }
    let tokens = Tokens {
        inputs: arena.alloc("tokens", DType::I32, bt)?,
        targets: arena.alloc("tokens", DType::I32, bt)?,
        b,
        t,
    };
    let acts = [
        arena.alloc("stage input", DType::F32, act_len)?,
        arena.alloc("stage output", DType::F32, act_len)?,
        arena.alloc("stage gradient", DType::F32, act_len)?,
        arena.alloc("losses", DType::F32, bt)?,
    ];
    Ok((params, grads, tokens, acts))
}

impl StageBench {
    fn new(
        config: &Config,
        mut model: Box<dyn Model>,
        batch: &Batch,
    ) -> Result<StageBench, GradientCheckError> {
        let (b, t) = (batch.b, batch.t);
        let units = model.units().to_vec();
        let act_len = model.activation_len(b, t);
        let prepare = Prepare {
            b,
            t,
            x: DType::F32,
            checkpointing: false,
            attention: config.train.attention,
        };
        let counting = Arena::counting();
        allocate(&counting, &units, act_len, b * t, b, t)?;
        model.prepare(&counting, prepare)?;
        let dev = backend::open(&DeviceOptions {
            backend: Backend::Cpu,
            precision: backend::Precision::Fp32,
            arena_bytes: counting.peak_bytes(),
            budget_bytes: None,
            threads: crate::threads::compute_threads(config.train.threads),
            ordinal: 0,
            stall_timeout: Duration::from_secs(600),
        })?;
        let (params, grads, tokens, [input, output, dres, losses]) =
            allocate(dev.arena(), &units, act_len, b * t, b, t)?;
        model.prepare(dev.arena(), prepare)?;
        let host: Vec<Vec<f32>> = units
            .iter()
            .enumerate()
            .map(|(i, u)| u.init_params(config.data.seed, i))
            .collect();
        for (buf, values) in params.iter().zip(&host) {
            dev.upload(buf, values)?;
        }
        let ids = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        dev.upload(&tokens.inputs, &ids(&batch.inputs))?;
        dev.upload(&tokens.targets, &ids(&batch.targets))?;
        Ok(StageBench {
            model,
            units,
            host,
            params,
            grads,
            tokens,
            input,
            output,
            dres,
            losses,
            rng: Rng::new(config.data.seed ^ 0x5eed),
            dev,
        })
    }

    /// Every stage against finite differences: the largest relative disagreement and the
    /// elements checked.
    fn check_all(&mut self) -> Result<(f64, usize), GradientCheckError> {
        let stages = self.model.stages().to_vec();
        let (mut worst, mut checked) = (0.0f64, 0);
        for (s, spec) in stages.iter().enumerate() {
            let last = s + 1 == stages.len();
            let (w, n) = self.check_stage(s, &spec.name, &spec.units, last)?;
            worst = worst.max(w);
            checked += n;
        }
        Ok((worst, checked))
    }

    /// The scalar a stage's backward differentiates: Σ probe·output, or the mean token loss of
    /// the last stage; with its rounding noise (an upper bound of the f32 rounding it differences).
    fn scalar(
        &mut self,
        s: usize,
        units: &[usize],
        last: bool,
        probe: &[f32],
    ) -> Result<(f64, f64), GradientCheckError> {
        let dev = &*self.dev;
        let params: Vec<Buf> = units.iter().map(|&u| self.params[u].clone()).collect();
        if last {
            self.model
                .head(dev, &params, &self.tokens, &self.input, &self.losses, None)?;
            let losses = dev.read_f32(&self.losses)?;
            let mean = losses.iter().map(|&l| l as f64).sum::<f64>() / losses.len() as f64;
            return Ok((mean, 4.0 * f32::EPSILON as f64 * mean.abs().max(1.0)));
        }
        self.model
            .forward(dev, s, &params, &self.tokens, &self.input, &self.output)?;
        let out = dev.read_f32(&self.output)?;
        let magnitude: f64 = out
            .iter()
            .zip(probe)
            .map(|(o, p)| (*o as f64 * *p as f64).abs())
            .sum();
        let noise = 16.0 * f32::EPSILON as f64 * magnitude / (out.len() as f64).sqrt();
        Ok((dot(probe, &out), noise))
    }

    /// The stage's backward with ∂scalar/∂output = `probe` (or ∂loss = 1 for the last stage),
    /// after its forward.
    fn analytic(
        &mut self,
        s: usize,
        units: &[usize],
        last: bool,
        probe: &[f32],
    ) -> Result<StageGrads, GradientCheckError> {
        let dev = &*self.dev;
        let params: Vec<Buf> = units.iter().map(|&u| self.params[u].clone()).collect();
        let grads: Vec<Buf> = units.iter().map(|&u| self.grads[u].clone()).collect();
        for g in &grads {
            dev.memset(Queue::Compute, g, 0)?;
        }
        if last {
            let g = HeadGrads {
                grads: &grads,
                dres: &self.dres,
                dloss: 1.0,
            };
            let (tokens, input) = (&self.tokens, &self.input);
            self.model
                .head(dev, &params, tokens, input, &self.losses, Some(g))?;
        } else {
            let (tokens, input) = (&self.tokens, &self.input);
            self.model
                .forward(dev, s, &params, tokens, input, &self.output)?;
            dev.upload(&self.dres, probe)?;
            self.model
                .backward(dev, s, &params, &grads, tokens, input, &self.dres)?;
        }
        let params = grads
            .iter()
            .map(|g| dev.read_f32(g))
            .collect::<Result<_, _>>()?;
        let input = if s > 0 {
            Some(dev.read_f32(&self.dres)?)
        } else {
            None
        };
        Ok(StageGrads { params, input })
    }

    /// The scalar with element `at` of unit `u`'s weights set to `value` (restored after).
    #[allow(clippy::too_many_arguments)]
    fn with_param(
        &mut self,
        (u, at): (usize, usize),
        value: f32,
        s: usize,
        units: &[usize],
        last: bool,
        probe: &[f32],
    ) -> Result<(f64, f64), GradientCheckError> {
        let original = std::mem::replace(&mut self.host[u][at], value);
        self.dev.upload(&self.params[u], &self.host[u])?;
        let scalar = self.scalar(s, units, last, probe);
        self.host[u][at] = original;
        self.dev.upload(&self.params[u], &self.host[u])?;
        scalar
    }

    /// The scalar with the stage's input `input` except element `at`, set to `value`.
    #[allow(clippy::too_many_arguments)]
    fn with_input(
        &mut self,
        input: &[f32],
        (at, value): (usize, f32),
        s: usize,
        units: &[usize],
        last: bool,
        probe: &[f32],
    ) -> Result<(f64, f64), GradientCheckError> {
        let mut perturbed = input.to_vec();
        perturbed[at] = value;
        self.dev.upload(&self.input, &perturbed)?;
        let scalar = self.scalar(s, units, last, probe);
        self.dev.upload(&self.input, input)?;
        scalar
    }

    /// Stage `s` (named `name`, using `units`) against central finite differences, on a random
    /// input and probe: the largest relative disagreement and the elements checked.
    fn check_stage(
        &mut self,
        s: usize,
        name: &str,
        units: &[usize],
        last: bool,
    ) -> Result<(f64, usize), GradientCheckError> {
        let act_len = self.input.len();
        let input = self.rng.normal_vec(act_len, 1.0);
        self.dev.upload(&self.input, &input)?;
        let probe = if last {
            Vec::new()
        } else {
            self.rng.normal_vec(act_len, 1.0)
        };
        let grads = self.analytic(s, units, last, &probe)?;
        let h = FINITE_DIFFERENCE_STEP;
        let mut report = Report {
            stage: name,
            worst: 0.0,
            checked: 0,
        };
        for (k, &u) in units.iter().enumerate() {
            let unit = self.units[u].clone();
            for (spec, range) in unit.tensors.iter().zip(unit.ranges()) {
                // Padding rows are not parameters.
                let g = &grads.params[k][range.start..range.start + spec.numel()];
                for index in sample(g) {
                    let at = (u, range.start + index);
                    let original = self.host[u][at.1];
                    let up = self.with_param(at, original + h, s, units, last, &probe)?;
                    let down = self.with_param(at, original - h, s, units, last, &probe)?;
                    report.judge(&spec.name, index, g[index], up, down)?;
                }
            }
        }
        if let Some(g) = &grads.input {
            for index in sample(g) {
                let x = input[index];
                let up = self.with_input(&input, (index, x + h), s, units, last, &probe)?;
                let down = self.with_input(&input, (index, x - h), s, units, last, &probe)?;
                report.judge("input", index, g[index], up, down)?;
            }
        }
        Ok((report.worst, report.checked))
    }
}

/// A stage's gradients: of each of its units' parameters, and of its input (none for the first
/// stage, which reads tokens).
struct StageGrads {
    params: Vec<Vec<f32>>,
    input: Option<Vec<f32>>,
}

/// The finite-difference comparisons of one stage so far.
struct Report<'a> {
    stage: &'a str,
    worst: f64,
    checked: usize,
}

impl Report<'_> {
    /// One element: `analytic` against the central difference of the scalars `up` and `down`
    /// (each with its rounding noise), at step [`FINITE_DIFFERENCE_STEP`].
    fn judge(
        &mut self,
        tensor: &str,
        index: usize,
        analytic: f32,
        up: (f64, f64),
        down: (f64, f64),
    ) -> Result<(), GradientCheckError> {
        let h = FINITE_DIFFERENCE_STEP;
        let numeric = (up.0 - down.0) / (2.0 * h as f64);
        let noise = (up.1 + down.1) / (2.0 * h as f64);
        let excess = ((numeric - analytic as f64).abs() - noise).max(0.0);
        let scale = numeric.abs().max(analytic.abs() as f64).max(noise);
        let rel = excess / scale.max(f64::MIN_POSITIVE);
        if rel.is_nan() || rel > FINITE_DIFFERENCE_REL_MAX {
            return Err(GradientCheckError::FiniteDifferences {
                stage: self.stage.to_string(),
                tensor: tensor.to_string(),
                index,
                analytic,
                numeric,
                step: h,
            });
        }
        self.worst = self.worst.max(rel);
        self.checked += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2 (both attention modes) keeps the contract: the engine's recompute gives the same
    /// gradients, and every block's backward matches finite differences of its forward.
    #[test]
    fn gpt2_passes_the_gradient_check() {
        let mut config = Config::default();
        config.model.n_layer = 2;
        config.model.n_head = 2;
        config.model.n_embd = 32;
        config.model.vocab_size = 96;
        config.model.seq_len = 16;
        config.data.micro_batch_size = 2;
        for attention in [
            crate::backend::AttentionMode::Fused,
            crate::backend::AttentionMode::Materialized,
        ] {
            config.train.attention = attention;
            let shape = crate::model::gpt2::Gpt2Shape::from_config(&config.model);
            let check =
                check_model_gradients(&config, || Box::new(crate::model::gpt2::Gpt2::new(shape)))
                    .unwrap();
            println!("{}: {check:?}", attention.name());
            assert_eq!(check.checkpointing_rel, 0.0);
            // embed (2 tensors + input-less), 2 blocks of 12 tensors + input, head (ln_f, wte) + input.
            assert!(check.elements_checked >= 4 * (2 + 2 * 12 + 4), "{check:?}");
        }
    }
}
