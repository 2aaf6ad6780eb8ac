//! A model of your own: implement `strata::Model` against the device seam and the engine trains
//! it on the CPU or a GPU alike — stages, units, gradient accumulation, clipping and AdamW come
//! from strata, and so does every byte of memory (the model allocates its activations from the
//! engine's arena, so the engine's dry run counts them). The model is a small next-token MLP:
//! x = wte[token] + wpe[position] → hidden = gelu(x·W1ᵀ + b1) → logits = hidden·W2ᵀ + b2,
//! trained on the synthetic set.
//!
//! cargo run --release -p strata-examples --example custom_model [cpu|cuda]

use strata::backend::{Arena, Buf, Device, DeviceError, GradMode};
use strata::config::{Config, DeviceKind};
use strata::data::Loader;
use strata::model::{HeadGrads, Init, Model, Prepare, StageSpec, TensorSpec, Tokens, UnitSpec};
use strata::Engine;

/// Activations kept between forward and backward, from the engine's arena.
struct Workspace {
    pre_gelu: Buf, // (B·T, C) X
    logits: Buf,   // (B·T, V) X
    dhidden: Buf,  // (B·T, C) X
}

struct Mlp {
    vocab: usize,
    width: usize,
    units: Vec<UnitSpec>,
    stages: Vec<StageSpec>,
    ws: Option<Workspace>,
}

fn tensor(name: &str, shape: &[usize], decay: bool, init: Init) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        decay,
        init,
        stored_transposed: false,
        pad_rows: 0,
    }
}

fn stage(name: &str, unit: usize) -> StageSpec {
    StageSpec {
        name: name.into(),
        units: vec![unit],
    }
}

impl Mlp {
    fn new(vocab: usize, width: usize, seq_len: usize) -> Mlp {
        let normal = Init::Normal { std: 0.02 };
        let units = vec![
            UnitSpec {
                name: "embed".into(),
                tensors: vec![
                    tensor("wte", &[vocab, width], true, normal),
                    tensor("wpe", &[seq_len, width], true, normal),
                ],
            },
            UnitSpec {
                name: "hidden".into(),
                tensors: vec![
                    tensor("w1", &[width, width], true, normal),
                    tensor("b1", &[width], false, Init::Zeros),
                ],
            },
            UnitSpec {
                name: "out".into(),
                tensors: vec![
                    tensor("w2", &[vocab, width], true, normal),
                    tensor("b2", &[vocab], false, Init::Zeros),
                ],
            },
        ];
        Mlp {
            vocab,
            width,
            units,
            stages: vec![stage("embed", 0), stage("hidden", 1), stage("head", 2)],
            ws: None,
        }
    }

    fn ws(&self) -> Result<&Workspace, DeviceError> {
        self.ws
            .as_ref()
            .ok_or_else(|| DeviceError::op("mlp", "prepare() first"))
    }
}

impl Model for Mlp {
    fn units(&self) -> &[UnitSpec] {
        &self.units
    }

    fn stages(&self) -> &[StageSpec] {
        &self.stages
    }

    fn activation_len(&self, b: usize, t: usize) -> usize {
        b * t * self.width
    }

    fn prepare(&mut self, arena: &Arena, p: Prepare) -> Result<(), DeviceError> {
        let n = p.b * p.t;
        self.ws = Some(Workspace {
            pre_gelu: arena.alloc("mlp activations", p.x, n * self.width)?,
            logits: arena.alloc("mlp logits", p.x, n * self.vocab)?,
            dhidden: arena.alloc("mlp scratch", p.x, n * self.width)?,
        });
        Ok(())
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
        let (c, n) = (self.width, tokens.count());
        let p = self.units[stage].views(&params[0])?;
        match stage {
            0 => dev.encoder_forward(output, &tokens.inputs, &p[0], &p[1], tokens.b, tokens.t, c),
            _ => {
                let ws = self.ws()?;
                dev.matmul_forward(&ws.pre_gelu, input, &p[0], Some(&p[1]), n, c, c)?;
                dev.gelu_forward(output, &ws.pre_gelu)
            }
        }
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
        let (c, v, n) = (self.width, self.vocab, tokens.count());
        let p = self.units[2].views(&params[0])?;
        let ws = self.ws()?;
        dev.matmul_forward(&ws.logits, input, &p[0], Some(&p[1]), n, c, v)?;
        let dloss = grads.as_ref().map(|g| g.dloss / n as f32);
        dev.crossentropy_forward_backward(&ws.logits, losses, &tokens.targets, n, v, v, dloss)?;
        let Some(g) = grads else {
            return Ok(());
        };
        let dp = self.units[2].views(&g.grads[0])?;
        // dlogits (in place of the logits) → ∂L/∂input, dW2, db2.
        dev.matmul_backward(
            g.dres,
            GradMode::Overwrite,
            &dp[0],
            Some(&dp[1]),
            &ws.logits,
            input,
            &p[0],
            n,
            c,
            v,
        )
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
        let (c, n) = (self.width, tokens.count());
        let dp = self.units[stage].views(&grads[0])?;
        if stage == 0 {
            return dev.encoder_backward(
                &dp[0],
                &dp[1],
                dres,
                &tokens.inputs,
                tokens.b,
                tokens.t,
                c,
            );
        }
        let p = self.units[stage].views(&params[0])?;
        let ws = self.ws()?;
        dev.gelu_backward(&ws.dhidden, GradMode::Overwrite, &ws.pre_gelu, dres)?;
        dev.matmul_backward(
            dres,
            GradMode::Overwrite,
            &dp[0],
            Some(&dp[1]),
            &ws.dhidden,
            input,
            &p[0],
            n,
            c,
            c,
        )
    }

    fn flops_per_token(&self, _t: usize) -> f64 {
        6.0 * (self.width * self.width + self.vocab * self.width) as f64
    }
}

fn main() -> anyhow::Result<()> {
    let mut config = Config::default();
    config.train.steps = 200;
    config.model.seq_len = 64;
    config.train.device = match std::env::args().nth(1).as_deref() {
        None => DeviceKind::Auto,
        Some("cpu") => DeviceKind::Cpu,
        Some("cuda") => DeviceKind::Cuda,
        Some(other) => anyhow::bail!("unknown device {other:?}: expected cpu or cuda"),
    };
    let model = Mlp::new(config.model.vocab_size, 128, config.model.seq_len);
    let mut loader = Loader::from_config(&config)?;
    let mut engine = Engine::new(config.clone(), Box::new(model))?;
    println!(
        "training an MLP of {} parameters on {}",
        engine.num_params(),
        engine.device().name()
    );
    let mut batch = vec![engine.new_batch()];
    for _ in 0..config.train.steps {
        loader.fill(&mut batch[0])?;
        let s = engine.train_step(&batch)?;
        if s.step % 25 == 0 {
            println!("step {:>4} loss {:.4}", s.step, s.loss);
        }
    }
    Ok(())
}
