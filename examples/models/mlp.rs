//! The model of `examples/custom_model.rs`, in its own file so that the examples' tests check it
//! too (`strata::testing::check_model_gradients`).
//!
//! A next-token MLP with several hidden stages: x = wte[token] + wpe[position], then for each
//! hidden stage x ← gelu(x·Wᵀ + b), then logits = x·W_outᵀ + b_out. Each hidden stage is its own
//! unit and stage, so the engine gathers, offloads and releases them one by one. With activation
//! checkpointing the hidden stages share one workspace: the engine runs a stage's forward again
//! right before its backward, so the workspace always holds that stage's activations.

use strata::backend::{
    Arena, Buf, CrossEntropy, Device, DeviceError, EncoderBackward, EncoderForward, GeluBackward,
    GeluForward, GradMode, MatmulBackward, MatmulForward,
};
use strata::model::{HeadGrads, Init, Model, Prepare, StageSpec, TensorSpec, Tokens, UnitSpec};

/// What a hidden stage's forward keeps for its backward, from the engine's arena.
struct Hidden {
    pre_gelu: Buf, // (B·T, C) X
}

/// Activations and scratch, allocated by `prepare`.
struct Workspace {
    /// One per hidden stage, or one for all of them with checkpointing.
    hidden: Vec<Hidden>,
    logits: Buf,  // (B·T, V) X
    dhidden: Buf, // (B·T, C) X
    checkpointing: bool,
}

pub struct Mlp {
    vocab: usize,
    width: usize,
    seq_len: usize,
    units: Vec<UnitSpec>,
    stages: Vec<StageSpec>,
    ws: Option<Workspace>,
}

fn tensor(name: String, shape: &[usize], decay: bool, init: Init) -> TensorSpec {
    TensorSpec {
        name,
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
    /// `hidden_layers` hidden stages of `width` channels over a vocabulary of `vocab` tokens.
    pub fn new(vocab: usize, width: usize, seq_len: usize, hidden_layers: usize) -> Mlp {
        let normal = Init::Normal { std: 0.02 };
        let mut units = vec![UnitSpec {
            name: "embed".into(),
            tensors: vec![
                tensor("wte".into(), &[vocab, width], true, normal),
                tensor("wpe".into(), &[seq_len, width], true, normal),
            ],
        }];
        let mut stages = vec![stage("embed", 0)];
        for i in 0..hidden_layers {
            units.push(UnitSpec {
                name: format!("hidden.{i}"),
                tensors: vec![
                    tensor(format!("hidden.{i}.weight"), &[width, width], true, normal),
                    tensor(format!("hidden.{i}.bias"), &[width], false, Init::Zeros),
                ],
            });
            stages.push(stage(&format!("hidden.{i}"), 1 + i));
        }
        units.push(UnitSpec {
            name: "out".into(),
            tensors: vec![
                tensor("out.weight".into(), &[vocab, width], true, normal),
                tensor("out.bias".into(), &[vocab], false, Init::Zeros),
            ],
        });
        stages.push(stage("head", 1 + hidden_layers));
        Mlp {
            vocab,
            seq_len,
            width,
            units,
            stages,
            ws: None,
        }
    }

    fn ws(&self) -> Result<&Workspace, DeviceError> {
        self.ws
            .as_ref()
            .ok_or_else(|| DeviceError::op("mlp", "prepare() first"))
    }

    /// The activations of hidden stage `stage` (1-based, as the stages count).
    fn hidden(&self, stage: usize) -> Result<&Hidden, DeviceError> {
        let ws = self.ws()?;
        let i = if ws.checkpointing { 0 } else { stage - 1 };
        ws.hidden
            .get(i)
            .ok_or_else(|| DeviceError::op("mlp", format!("no hidden stage {stage}")))
    }
}

impl Model for Mlp {
    fn units(&self) -> &[UnitSpec] {
        &self.units
    }

    fn stages(&self) -> &[StageSpec] {
        &self.stages
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn seq_len(&self) -> usize {
        self.seq_len
    }

    fn activation_len(&self, b: usize, t: usize) -> usize {
        b * t * self.width
    }

    fn prepare(&mut self, arena: &Arena, p: Prepare) -> Result<(), DeviceError> {
        let n = p.b * p.t;
        let sets = if p.checkpointing {
            1
        } else {
            self.stages.len() - 2
        };
        let hidden = (0..sets)
            .map(|_| {
                Ok(Hidden {
                    pre_gelu: arena.alloc("mlp activations", p.x, n * self.width)?,
                })
            })
            .collect::<Result<_, DeviceError>>()?;
        self.ws = Some(Workspace {
            hidden,
            logits: arena.alloc("mlp logits", p.x, n * self.vocab)?,
            dhidden: arena.alloc("mlp scratch", p.x, n * self.width)?,
            checkpointing: p.checkpointing,
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
        if stage == 0 {
            return dev.run(EncoderForward {
                out: output,
                tokens: &tokens.inputs,
                wte: &p[0],
                wpe: Some(&p[1]),
                b: tokens.b,
                t: tokens.t,
                c,
            });
        }
        let h = self.hidden(stage)?;
        dev.run(MatmulForward {
            out: &h.pre_gelu,
            inp: input,
            weight: &p[0],
            bias: Some(&p[1]),
            n,
            c,
            oc: c,
        })?;
        dev.run(GeluForward {
            out: output,
            inp: &h.pre_gelu,
        })
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
        let out_unit = self.units.len() - 1;
        let p = self.units[out_unit].views(&params[0])?;
        let ws = self.ws()?;
        dev.run(MatmulForward {
            out: &ws.logits,
            inp: input,
            weight: &p[0],
            bias: Some(&p[1]),
            n,
            c,
            oc: v,
        })?;
        let dloss = grads.as_ref().map(|g| g.dloss / n as f32);
        dev.run(CrossEntropy {
            logits: &ws.logits,
            losses,
            targets: &tokens.targets,
            r: n,
            v,
            vp: v,
            dloss,
        })?;
        let Some(g) = grads else {
            return Ok(());
        };
        let dp = self.units[out_unit].views(&g.grads[0])?;
        // dlogits (in place of the logits) → ∂L/∂input, dW, db.
        dev.run(MatmulBackward {
            dinp: g.dres,
            dinp_mode: GradMode::Overwrite,
            dweight: &dp[0],
            dbias: Some(&dp[1]),
            dout: &ws.logits,
            inp: input,
            weight: &p[0],
            n,
            c,
            oc: v,
        })
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
            return dev.run(EncoderBackward {
                dwte: &dp[0],
                dwpe: Some(&dp[1]),
                dout: dres,
                tokens: &tokens.inputs,
                b: tokens.b,
                t: tokens.t,
                c,
            });
        }
        let p = self.units[stage].views(&params[0])?;
        let h = self.hidden(stage)?;
        let ws = self.ws()?;
        dev.run(GeluBackward {
            dinp: &ws.dhidden,
            dinp_mode: GradMode::Overwrite,
            inp: &h.pre_gelu,
            dout: dres,
        })?;
        dev.run(MatmulBackward {
            dinp: dres,
            dinp_mode: GradMode::Overwrite,
            dweight: &dp[0],
            dbias: Some(&dp[1]),
            dout: &ws.dhidden,
            inp: input,
            weight: &p[0],
            n,
            c,
            oc: c,
        })
    }

    fn flops_per_token(&self, _t: usize) -> f64 {
        let hidden = (self.stages.len() - 2) * self.width * self.width;
        6.0 * (hidden + self.vocab * self.width) as f64
    }
}
