//! The example model against the `Model` contract: its gradients with and without activation
//! checkpointing and against finite differences (`strata::testing::check_model_gradients`), and
//! the check failing on models that break the contract.

#[path = "../models/mlp.rs"]
mod mlp;

use strata::backend::{Arena, Buf, Device, DeviceError};
use strata::config::{Config, DeviceKind};
use strata::data::Loader;
use strata::model::{HeadGrads, Model, Prepare, StageSpec, Tokens, UnitSpec};
use strata::testing::{check_model_gradients, GradientCheckError};
use strata::Engine;

fn config() -> Config {
    let mut config = Config::default();
    config.model.seq_len = 16;
    config.data.micro_batch_size = 2;
    config.train.device = DeviceKind::Cpu;
    config
}

fn example_model() -> Box<dyn Model> {
    let c = config();
    Box::new(mlp::Mlp::new(c.model.vocab_size, 32, c.model.seq_len, 2))
}

#[test]
fn the_example_model_passes_the_gradient_check() {
    let check = check_model_gradients(&config(), example_model).unwrap();
    println!("{check:?}");
    assert!(check.elements_checked >= 6 * 4, "{check:?}");
    assert_eq!(
        check.checkpointing_rel, 0.0,
        "the CPU recomputes bit for bit"
    );
}

/// Losses of `steps` training steps of the example model.
fn losses(checkpointing: bool, steps: usize) -> Vec<f32> {
    let mut config = config();
    config.train.activation_checkpointing = checkpointing;
    config.optim.warmup_steps = 2;
    let mut loader = Loader::from_config(&config).unwrap();
    let mut engine = Engine::new(config, example_model()).unwrap();
    let mut batch = vec![engine.new_batch()];
    (0..steps)
        .map(|_| {
            loader.fill(&mut batch[0]).unwrap();
            engine.train_step(&batch).unwrap().loss
        })
        .collect()
}

/// The model shares one workspace among its hidden stages with checkpointing: it trains bit for
/// bit as without (before the engine ran each stage's forward again before its backward, the
/// shared workspace held the last stage's activations and step 20 gave another loss).
#[test]
fn a_model_sharing_its_workspace_trains_alike_with_and_without_checkpointing() {
    let (with, without) = (losses(true, 20), losses(false, 20));
    assert_eq!(with, without);
    assert!(with[19] < with[0] - 0.01, "{with:?}");
}

/// Forwards everything to the example model but changes one thing, to see the check fail.
struct Broken {
    inner: Box<dyn Model>,
    defect: Defect,
    /// Stages whose forward ran in this step (for `Defect::NoRecompute`).
    forwarded: Vec<bool>,
}

#[derive(Clone, Copy)]
enum Defect {
    /// Ignores the engine's recompute (a model written before the contract said who recomputes):
    /// with checkpointing its backward reads another stage's activations.
    NoRecompute,
    /// Runs a hidden stage's backward twice: gradients no longer match the forward.
    DoubleBackward,
}

impl Model for Broken {
    fn units(&self) -> &[UnitSpec] {
        self.inner.units()
    }
    fn stages(&self) -> &[StageSpec] {
        self.inner.stages()
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn seq_len(&self) -> usize {
        self.inner.seq_len()
    }
    fn activation_len(&self, b: usize, t: usize) -> usize {
        self.inner.activation_len(b, t)
    }
    fn prepare(&mut self, arena: &Arena, shape: Prepare) -> Result<(), DeviceError> {
        self.forwarded = vec![false; self.inner.stages().len()];
        self.inner.prepare(arena, shape)
    }
    fn forward(
        &mut self,
        dev: &dyn Device,
        stage: usize,
        params: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        output: &Buf,
    ) -> Result<(), DeviceError> {
        if matches!(self.defect, Defect::NoRecompute) && self.forwarded[stage] {
            return Ok(());
        }
        self.forwarded[stage] = true;
        self.inner
            .forward(dev, stage, params, tokens, input, output)
    }
    fn head(
        &mut self,
        dev: &dyn Device,
        params: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        losses: &Buf,
        grads: Option<HeadGrads<'_>>,
    ) -> Result<(), DeviceError> {
        self.inner.head(dev, params, tokens, input, losses, grads)
    }
    fn backward(
        &mut self,
        dev: &dyn Device,
        stage: usize,
        params: &[Buf],
        grads: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        dres: &Buf,
    ) -> Result<(), DeviceError> {
        if stage == 0 {
            // The step's walk is over: forwards count again.
            self.forwarded.iter_mut().for_each(|f| *f = false);
        }
        if matches!(self.defect, Defect::DoubleBackward) && stage == 1 {
            self.inner
                .backward(dev, stage, params, grads, tokens, input, dres)?;
        }
        self.inner
            .backward(dev, stage, params, grads, tokens, input, dres)
    }
    fn flops_per_token(&self, t: usize) -> f64 {
        self.inner.flops_per_token(t)
    }
}

fn broken(defect: Defect) -> impl Fn() -> Box<dyn Model> {
    move || {
        Box::new(Broken {
            inner: example_model(),
            defect,
            forwarded: Vec::new(),
        })
    }
}

#[test]
fn the_check_catches_a_model_that_does_not_take_the_engines_recompute() {
    let err = check_model_gradients(&config(), broken(Defect::NoRecompute)).unwrap_err();
    println!("{err}");
    let GradientCheckError::Checkpointing { tensor, .. } = &err else {
        panic!("{err}");
    };
    // The last hidden stage and the head read their own activations; the stages before do not.
    assert!(
        !tensor.starts_with("hidden.1") && !tensor.starts_with("out"),
        "{err}"
    );
}

#[test]
fn the_check_catches_a_backward_that_does_not_match_the_forward() {
    let err = check_model_gradients(&config(), broken(Defect::DoubleBackward)).unwrap_err();
    println!("{err}");
    assert!(
        matches!(err, GradientCheckError::FiniteDifferences { .. }),
        "{err}"
    );
}
