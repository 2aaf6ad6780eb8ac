//! A training loop of your own around `strata::Engine`: build the config in code, feed micro-batches, read
//! `StepStats`, evaluate, and save the weights.
//!
//! cargo run --release -p strata-examples --example train_loop

use strata::config::Config;
use strata::data::Loader;
use strata::Engine;

fn main() -> anyhow::Result<()> {
    let mut config = Config::default();
    config.model.n_layer = 2;
    config.model.n_embd = 64;
    config.model.seq_len = 64;
    config.train.steps = 120;
    config.optim.warmup_steps = 10;
    config.validate()?;

    let mut loader = Loader::from_config(&config)?;
    let mut engine = Engine::from_config(config.clone())?;
    let mut batches = vec![engine.new_batch(); config.data.grad_accum_steps];
    for _ in 0..config.train.steps {
        batches.iter_mut().for_each(|b| loader.fill(b));
        let stats = engine.train_step(&batches)?;
        if stats.step % 20 == 0 {
            println!(
                "step {:>4} loss {:.4} lr {:.2e} grad norm {:.3} {:.0} tokens/s",
                stats.step, stats.loss, stats.lr, stats.grad_norm, stats.tokens_per_s
            );
        }
    }
    let mut held_out = engine.new_batch();
    loader.fill(&mut held_out);
    println!(
        "eval loss on the next micro-batch: {:.4}",
        engine.eval_loss(&held_out)?
    );
    let path = std::env::temp_dir().join("strata-example.safetensors");
    engine.save_weights(&path)?;
    println!("weights written to {}", path.display());
    Ok(())
}
