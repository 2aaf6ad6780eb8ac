//! A model of your own: implement `strata::Model` and the engine trains it — stages, units, gradient
//! accumulation, clipping and AdamW come from strata. The model here is a small next-token MLP:
//! embed (V, C) → hidden = gelu(x·W1ᵀ + b1) → logits = hidden·W2ᵀ + b2, trained on the synthetic set.
//!
//! cargo run --release -p strata-examples --example custom_model

use strata::backend::cpu;
use strata::config::Config;
use strata::data::Loader;
use strata::model::{Batch, HeadGrads, Init, Model, StageSpec, TensorSpec, UnitSpec};
use strata::Engine;

struct Mlp {
    vocab: usize,
    width: usize,
    units: Vec<UnitSpec>,
    stages: Vec<StageSpec>,
    // Activations kept for backward, sized by prepare().
    pre_gelu: Vec<f32>, // (B·T, C)
    hidden: Vec<f32>,   // (B·T, C)
    logits: Vec<f32>,   // (B·T, V)
    losses: Vec<f32>,   // (B·T)
    dhidden: Vec<f32>,  // (B·T, C)
}

fn tensor(name: &str, shape: &[usize], decay: bool, init: Init) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        decay,
        init,
        stored_transposed: false,
    }
}

impl Mlp {
    fn new(vocab: usize, width: usize) -> Mlp {
        let normal = Init::Normal { std: 0.02 };
        let units = vec![
            UnitSpec {
                name: "embed".into(),
                tensors: vec![tensor("embed.weight", &[vocab, width], true, normal)],
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
        let stages = vec![
            StageSpec {
                name: "embed".into(),
                units: vec![0],
            },
            StageSpec {
                name: "hidden".into(),
                units: vec![1],
            },
            StageSpec {
                name: "head".into(),
                units: vec![2],
            },
        ];
        Mlp {
            vocab,
            width,
            units,
            stages,
            pre_gelu: vec![],
            hidden: vec![],
            logits: vec![],
            losses: vec![],
            dhidden: vec![],
        }
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
    fn prepare(&mut self, b: usize, t: usize, _checkpointing: bool) {
        let n = b * t;
        self.pre_gelu = vec![0.0; n * self.width];
        self.hidden = vec![0.0; n * self.width];
        self.logits = vec![0.0; n * self.vocab];
        self.losses = vec![0.0; n];
        self.dhidden = vec![0.0; n * self.width];
    }
    fn forward(
        &mut self,
        stage: usize,
        params: &[&[f32]],
        batch: &Batch,
        input: &[f32],
        output: &mut [f32],
    ) {
        let (c, n) = (self.width, batch.tokens());
        match stage {
            0 => {
                for (row, &tok) in output.chunks_mut(c).zip(&batch.inputs) {
                    row.copy_from_slice(&params[0][tok as usize * c..(tok as usize + 1) * c]);
                }
            }
            _ => {
                let (w1, b1) = params[0].split_at(c * c);
                cpu::matmul_forward(&mut self.pre_gelu, input, w1, Some(b1), n, c, c);
                cpu::gelu_forward(output, &self.pre_gelu);
            }
        }
    }
    fn head(
        &mut self,
        params: &[&[f32]],
        batch: &Batch,
        input: &[f32],
        grads: Option<HeadGrads<'_, '_>>,
    ) -> f32 {
        let (c, v, n) = (self.width, self.vocab, batch.tokens());
        let (w2, b2) = params[0].split_at(v * c);
        cpu::matmul_forward(&mut self.logits, input, w2, Some(b2), n, c, v);
        let dloss = grads.as_ref().map(|g| g.dloss / n as f32);
        cpu::softmax_crossentropy(&mut self.logits, &batch.targets, &mut self.losses, dloss, v);
        if let Some(g) = grads {
            let (dw2, db2) = g.grads[0].split_at_mut(v * c);
            g.dinput.fill(0.0);
            cpu::matmul_backward(
                Some(g.dinput),
                dw2,
                Some(db2),
                &self.logits,
                input,
                w2,
                n,
                c,
                v,
            );
        }
        self.losses.iter().sum::<f32>() / n as f32
    }
    fn backward(
        &mut self,
        stage: usize,
        params: &[&[f32]],
        grads: &mut [&mut [f32]],
        batch: &Batch,
        input: &[f32],
        dout: &[f32],
        dinput: &mut [f32],
    ) {
        let (c, n) = (self.width, batch.tokens());
        match stage {
            0 => {
                for (row, &tok) in dout.chunks(c).zip(&batch.inputs) {
                    let dst = &mut grads[0][tok as usize * c..(tok as usize + 1) * c];
                    dst.iter_mut().zip(row).for_each(|(d, g)| *d += g);
                }
            }
            _ => {
                self.dhidden.fill(0.0);
                cpu::gelu_backward(&mut self.dhidden, &self.pre_gelu, dout);
                let (w1, _) = params[0].split_at(c * c);
                let (dw1, db1) = grads[0].split_at_mut(c * c);
                dinput.fill(0.0);
                cpu::matmul_backward(
                    Some(dinput),
                    dw1,
                    Some(db1),
                    &self.dhidden,
                    input,
                    w1,
                    n,
                    c,
                    c,
                );
            }
        }
    }
    fn flops_per_token(&self, _t: usize) -> f64 {
        6.0 * (self.width * self.width + self.vocab * self.width) as f64
    }
}

fn main() -> anyhow::Result<()> {
    let mut config = Config::default();
    config.train.steps = 200;
    config.model.seq_len = 64;
    let model = Mlp::new(config.model.vocab_size, 128);
    let mut loader = Loader::from_config(&config)?;
    let mut engine = Engine::new(config.clone(), Box::new(model))?;
    let mut batch = vec![engine.new_batch()];
    for _ in 0..config.train.steps {
        loader.fill(&mut batch[0]);
        let s = engine.train_step(&batch)?;
        if s.step % 25 == 0 {
            println!("step {:>4} loss {:.4}", s.step, s.loss);
        }
    }
    Ok(())
}
