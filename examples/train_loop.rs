//! A training loop of your own around `strata::Engine`: load a config, feed micro-batches, read `StepStats`,
//! measure the validation loss and save the weights. The README shows this file as it is.
//!
//! cargo run --release -p strata-examples --example train_loop

use strata::config::Config;
use strata::data::Loader;
use strata::Engine;

fn main() -> anyhow::Result<()> {
    // The embedded default (configs/tiny.toml, built into strata), so this runs from any directory and
    // any crate; Config::load(Some(path), …) reads a file of yours instead. Arguments KEY=VALUE override
    // it further (`train_loop data.micro_batch_size=16`).
    let mut overrides = vec!["train.steps=120".to_string(), "data.val=synthetic".into()];
    overrides.extend(std::env::args().skip(1));
    let config = Config::load(None, &overrides)?;

    // This rank's micro-batches: under `strata launch` (torchrun, srun) each rank reads its own.
    let mut loader = Loader::from_config(&config)?;
    let mut val = Loader::val_from_config(&config)?.ok_or(anyhow::anyhow!("no data.val"))?;
    let mut engine = Engine::from_config(config.clone())?;
    let mut batches = vec![engine.new_batch(); config.data.grad_accum_steps];
    for _ in 0..config.train.steps {
        for b in batches.iter_mut() {
            loader.fill(b)?;
        }
        let stats = engine.train_step(&batches)?; // loss, lr, grad_norm, tokens_per_s, …
        let step = stats.step + 1; // StepStats counts from 0, the CLI's log from 1
        if step % 20 == 0 {
            let (loss, lr) = (stats.loss, stats.lr);
            println!("step {step:>4} | loss {loss:.6} | lr {lr:.2e}");
        }
    }

    let mut batch = engine.new_batch();
    let mut sum = 0.0;
    for _ in 0..config.train.eval_batches {
        val.fill(&mut batch)?;
        sum += engine.eval_loss(&batch)?;
    }
    println!("val loss {:.6}", sum / config.train.eval_batches as f32);
    let out = std::env::temp_dir().join("strata-example.safetensors");
    engine.save_weights(&out)?;
    println!("weights written to {}", out.display());
    Ok(())
}
