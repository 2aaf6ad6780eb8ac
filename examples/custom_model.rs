//! A model of your own: implement `strata::Model` against the device seam and the engine trains
//! it on the CPU or a GPU alike — stages, units, gradient accumulation, clipping and AdamW come
//! from strata, and so does every byte of memory (the model allocates its activations from the
//! engine's arena, so the engine's dry run counts them). The model (`models/mlp.rs`) is a
//! next-token MLP with two hidden stages, trained on the synthetic set; its tests check its
//! gradients with `strata::testing::check_model_gradients`.
//!
//! cargo run --release -p strata-examples --example custom_model [cpu|cuda]

#[path = "models/mlp.rs"]
mod mlp;

use strata::config::{Config, DeviceKind};
use strata::data::Loader;
use strata::Engine;

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
    let model = mlp::Mlp::new(config.model.vocab_size, 128, config.model.seq_len, 2);
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
