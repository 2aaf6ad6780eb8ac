//! A model on one device for decoding: its parameters in device memory, a key/value cache, and
//! the stages walked with [`Model::forward_cached`] over the new tokens only. No engine: nothing
//! is partitioned, offloaded or trained.
//!
//! The arena holds the parameters and the cache, then the workspaces of one step (the model's
//! `prepare` for the step's token count, the tokens and two activation buffers), made again when
//! the token count changes (the prompt, then one token at a time).

use std::sync::Arc;

use crate::backend::{Arena, AttentionMode, Buf, DType, Device, DeviceError, Queue};
use crate::model::decode::KvCache;
use crate::model::{Model, Prepare, Tokens};

/// The workspaces of steps of `t` new tokens.
struct Step {
    t: usize,
    tokens: Tokens,
    acts: [Buf; 2],
}

pub struct Decoder {
    dev: Arc<dyn Device>,
    model: Box<dyn Model>,
    /// Each unit's parameters, X.
    params: Vec<Buf>,
    cache: KvCache,
    /// The arena's fill after the parameters and the cache: where a step's workspaces start.
    mark: usize,
    step: Option<Step>,
}

/// The model's units and cache in `arena`.
fn alloc_model(
    arena: &Arena,
    model: &dyn Model,
    capacity: usize,
    x: DType,
) -> Result<(Vec<Buf>, KvCache), DeviceError> {
    let heads = model
        .cache_heads()
        .ok_or_else(|| DeviceError::op("generate", "this model does not decode with a cache"))?;
    let params = model
        .units()
        .iter()
        .map(|u| arena.alloc("parameters", x, u.numel()))
        .collect::<Result<_, _>>()?;
    Ok((params, KvCache::alloc(arena, heads, 1, capacity, x)?))
}

/// Prepares `model` for steps of `t` tokens and allocates the step's buffers.
fn alloc_step(
    arena: &Arena,
    model: &mut dyn Model,
    t: usize,
    x: DType,
) -> Result<Step, DeviceError> {
    model.prepare(
        arena,
        Prepare {
            b: 1,
            t,
            x,
            checkpointing: true,
            attention: AttentionMode::Fused,
        },
    )?;
    let act = || arena.alloc("activations", x, model.activation_len(1, t));
    Ok(Step {
        t,
        tokens: Tokens {
            inputs: arena.alloc("tokens", DType::I32, t)?,
            targets: arena.alloc("tokens", DType::I32, t)?,
            b: 1,
            t,
        },
        acts: [act()?, act()?],
    })
}

impl Decoder {
    /// Bytes of device memory for the model, a cache of `capacity` positions and steps of at most
    /// `prefill` tokens.
    pub fn arena_bytes(
        model: &mut dyn Model,
        capacity: usize,
        prefill: usize,
        x: DType,
    ) -> Result<usize, DeviceError> {
        let arena = Arena::counting();
        alloc_model(&arena, model, capacity, x)?;
        let mark = arena.mark();
        for t in [prefill, 1] {
            arena.reset_to(mark)?;
            alloc_step(&arena, model, t, x)?;
        }
        Ok(arena.peak_bytes())
    }

    /// The model with `host` (each unit's f32 parameters) in the device's memory and an empty
    /// cache of `capacity` positions.
    pub fn new(
        dev: Arc<dyn Device>,
        model: Box<dyn Model>,
        host: &[Vec<f32>],
        capacity: usize,
    ) -> Result<Decoder, DeviceError> {
        let x = dev.x();
        if x != DType::F32 {
            return Err(DeviceError::op("generate", "decoding computes in fp32"));
        }
        let (params, cache) = alloc_model(dev.arena(), model.as_ref(), capacity, x)?;
        for (buf, values) in params.iter().zip(host) {
            if buf.len() != values.len() {
                return Err(DeviceError::op(
                    "generate",
                    format!("a unit of {} parameters given {}", buf.len(), values.len()),
                ));
            }
            // SAFETY: `values` outlives the copy: the queue is drained before the next unit.
            unsafe { dev.copy_h2d(Queue::Compute, buf, bytemuck::cast_slice(values))? };
            dev.synchronize(Queue::Compute)?;
        }
        let mark = dev.arena().mark();
        Ok(Decoder {
            dev,
            model,
            params,
            cache,
            mark,
            step: None,
        })
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// Positions held in the cache.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// The workspaces for `t` new tokens, made when the last step had another count.
    fn prepared(&mut self, t: usize) -> Result<&Step, DeviceError> {
        if self.step.as_ref().map(|s| s.t) != Some(t) {
            self.step = None;
            let arena = self.dev.arena();
            arena.reset_to(self.mark)?;
            self.step = Some(alloc_step(arena, self.model.as_mut(), t, self.dev.x())?);
        }
        self.step
            .as_ref()
            .ok_or_else(|| DeviceError::op("generate", "no workspaces"))
    }

    /// Runs `ids` (new tokens, at positions `len()..`) through every stage, adding their keys and
    /// values to the cache; returns the logits of the last one (the real vocabulary's).
    pub fn step(&mut self, ids: &[u32]) -> Result<Vec<f32>, DeviceError> {
        let t = ids.len();
        if t == 0 || self.cache.len() + t > self.cache.capacity() {
            return Err(DeviceError::op(
                "generate",
                format!(
                    "{t} new tokens after {} do not fit the cache of {}",
                    self.cache.len(),
                    self.cache.capacity()
                ),
            ));
        }
        let vocab = self.model.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(DeviceError::op(
                "generate",
                format!("token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        let host: Vec<i32> = ids.iter().map(|&id| id as i32).collect();
        let step = self.prepared(t)?;
        let (tokens, [a, b]) = (step.tokens.clone(), step.acts.clone());
        // SAFETY: `host` lives until the queue is drained at the end of this function.
        unsafe {
            self.dev
                .copy_h2d(Queue::Compute, &tokens.inputs, bytemuck::cast_slice(&host))?
        };
        let stages = self.model.stages().to_vec();
        let (mut input, mut output) = (b, a);
        let dev = self.dev.as_ref();
        let Some((head, body)) = stages.split_last() else {
            return Err(DeviceError::op("generate", "a model without stages"));
        };
        for (s, stage) in body.iter().enumerate() {
            let params: Vec<Buf> = stage
                .units
                .iter()
                .map(|&u| self.params[u].clone())
                .collect();
            self.model
                .forward_cached(dev, s, &params, &tokens, &input, &output, &self.cache)?;
            std::mem::swap(&mut input, &mut output);
        }
        let params: Vec<Buf> = head.units.iter().map(|&u| self.params[u].clone()).collect();
        let (logits, _, _) = self.model.logits_chunk(dev, &params, &input, t - 1)?;
        let mut out = vec![0.0f32; vocab];
        // SAFETY: `out` lives until the queue is drained just below.
        unsafe {
            dev.copy_d2h(
                Queue::Compute,
                bytemuck::cast_slice_mut(&mut out),
                &logits.slice(0, vocab)?,
            )?
        };
        dev.synchronize(Queue::Compute)?;
        self.cache.advance(t)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{CpuDevice, CpuOptions};
    use crate::config::Config;
    use std::time::Duration;

    fn cpu(arena_bytes: usize) -> Arc<dyn Device> {
        Arc::new(
            CpuDevice::new(&CpuOptions {
                threads: 2,
                arena_bytes,
                budget_bytes: None,
                stall_timeout: Duration::from_secs(60),
            })
            .expect("cpu device"),
        )
    }

    /// The logits of the last of `ids` by the training forward (no cache) on a device of its own.
    fn full_forward(sets: &[String], host: &[Vec<f32>], ids: &[u32]) -> Vec<f32> {
        let m = Config::load(None, sets).expect("config").model;
        let mut model = crate::model::build(&m);
        let t = ids.len();
        let bytes = Decoder::arena_bytes(model.as_mut(), t, t, DType::F32).expect("size");
        let dev = cpu(bytes);
        let arena = dev.arena();
        let (params, _) = alloc_model(arena, model.as_ref(), t, DType::F32).expect("params");
        for (buf, values) in params.iter().zip(host) {
            unsafe { dev.copy_h2d(Queue::Compute, buf, bytemuck::cast_slice(values)) }
                .expect("copy");
        }
        let step = alloc_step(arena, model.as_mut(), t, DType::F32).expect("step");
        let host_ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        unsafe {
            dev.copy_h2d(
                Queue::Compute,
                &step.tokens.inputs,
                bytemuck::cast_slice(&host_ids),
            )
        }
        .expect("copy");
        let stages = model.stages().to_vec();
        let [mut output, mut input] = step.acts.clone();
        for (s, stage) in stages[..stages.len() - 1].iter().enumerate() {
            let p: Vec<Buf> = stage.units.iter().map(|&u| params[u].clone()).collect();
            model
                .forward(dev.as_ref(), s, &p, &step.tokens, &input, &output)
                .expect("forward");
            std::mem::swap(&mut input, &mut output);
        }
        let head = stages.last().expect("head");
        let p: Vec<Buf> = head.units.iter().map(|&u| params[u].clone()).collect();
        let (logits, _, _) = model
            .logits_chunk(dev.as_ref(), &p, &input, t - 1)
            .expect("logits");
        let mut out = vec![0.0f32; model.vocab_size()];
        let row = logits.slice(0, out.len()).expect("row");
        unsafe { dev.copy_d2h(Queue::Compute, bytemuck::cast_slice_mut(&mut out), &row) }
            .expect("copy");
        dev.synchronize(Queue::Compute).expect("sync");
        out
    }

    /// A prompt, then one token at a time through the cache: each step's logits equal the
    /// training forward's logits of the same prefix (GPT-2; the Llama family with grouped-query
    /// heads, untied and tied, with q/k norms and biases).
    #[test]
    fn cached_decoding_gives_the_logits_of_a_full_forward_of_each_prefix() {
        let variants: [&[&str]; 3] = [
            &[
                "model.n_layer=2",
                "model.n_embd=32",
                "model.n_head=4",
                "model.vocab_size=50",
                "model.seq_len=16",
            ],
            &[
                "model.arch=\"llama\"",
                "model.n_layer=2",
                "model.n_embd=32",
                "model.n_head=4",
                "model.n_kv_head=2",
                "model.intermediate_size=48",
                "model.vocab_size=50",
                "model.seq_len=16",
                "model.rope_scaling={rope_type=\"linear\", factor=2.0}",
            ],
            &[
                "model.arch=\"llama\"",
                "model.n_layer=2",
                "model.n_embd=32",
                "model.n_head=4",
                "model.n_kv_head=1",
                "model.intermediate_size=48",
                "model.vocab_size=50",
                "model.seq_len=16",
                "model.qk_norm=true",
                "model.head_dim=16",
                "model.tie_word_embeddings=true",
                "model.qkv_bias=true",
            ],
        ];
        for sets in variants {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let m = Config::load(None, &sets).expect("config").model;
            let mut model = crate::model::build(&m);
            // Larger weights than training's init, so the logits differ visibly between prefixes.
            let host: Vec<Vec<f32>> = model
                .units()
                .iter()
                .enumerate()
                .map(|(i, u)| u.init_params(7, i).iter().map(|v| v * 5.0).collect())
                .collect();
            let ids: Vec<u32> = vec![3, 17, 42, 5, 0, 49, 21, 8, 13, 34];
            let prompt = 4;
            let bytes =
                Decoder::arena_bytes(model.as_mut(), ids.len(), prompt, DType::F32).expect("size");
            let mut decoder = Decoder::new(cpu(bytes), model, &host, ids.len()).expect("decoder");
            let mut got = vec![decoder.step(&ids[..prompt]).expect("prompt")];
            for &id in &ids[prompt..] {
                got.push(decoder.step(&[id]).expect("step"));
            }
            for (k, logits) in got.iter().enumerate() {
                let n = prompt + k;
                let want = full_forward(&sets, &host, &ids[..n]);
                let worst = logits
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                // 1e-5 relative to the logits' scale (fp32 sums in another order).
                let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                assert!(
                    worst <= 1e-5 * scale,
                    "{sets:?}: prefix {n}: |Δlogit| {worst}, logits up to {scale}"
                );
            }
            // Prefixes differ, so equality above is not trivially true.
            assert!(got[0]
                .iter()
                .zip(&got[1])
                .any(|(a, b)| (a - b).abs() > 1e-3));
        }
    }

    #[test]
    fn a_token_outside_the_vocabulary_or_beyond_the_cache_is_refused() {
        let sets = vec![
            "model.n_layer=1".to_string(),
            "model.vocab_size=10".to_string(),
        ];
        let m = Config::load(None, &sets).expect("config").model;
        let mut model = crate::model::build(&m);
        let host: Vec<Vec<f32>> = model.units().iter().map(|u| vec![0.0; u.numel()]).collect();
        let bytes = Decoder::arena_bytes(model.as_mut(), 4, 4, DType::F32).expect("size");
        let mut decoder = Decoder::new(cpu(bytes), model, &host, 4).expect("decoder");
        let e = decoder.step(&[1, 10]).expect_err("outside");
        assert!(e.to_string().contains("token id 10"), "{e}");
        decoder.step(&[1, 2, 3]).expect("fits");
        let e = decoder.step(&[1, 2]).expect_err("beyond");
        assert!(e.to_string().contains("do not fit"), "{e}");
    }
}
