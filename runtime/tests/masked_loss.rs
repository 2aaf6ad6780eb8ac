//! The masked loss (fine-tuning on the assistant's tokens only) against PyTorch's cross-entropy with `-100`
//! labels: the loss of a step is the mean over the unmasked targets of the whole global batch, its gradients
//! likewise, the same at 1 and 2 ranks, with accumulation and with ZeRO-3 and NVMe offload. The reference
//! comes from tests/fixtures/masked_loss/make_masked_loss.py (the tiny GPT-2 of make_parity.py).

use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;
use strata::data::tokens::TokenWriter;
use strata::data::Loader;
use strata::model::IGNORE_TARGET;
use strata::{Config, Engine};

mod common;
use common::{fixture, hf_layout, rel_diff};

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load() -> Reference {
        let bytes = std::fs::read(fixture("masked_loss/masked_loss.safetensors")).expect("fixture");
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("metadata");
        let meta = meta.metadata().clone().expect("metadata present");
        assert_eq!(
            meta.get("magic").map(String::as_str),
            Some("strata-masked-loss")
        );
        assert_eq!(meta.get("version").map(String::as_str), Some("1"));
        Reference { bytes }
    }

    fn config(&self) -> serde_json::Value {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).expect("metadata");
        let meta = meta.metadata().clone().expect("metadata present");
        serde_json::from_str(&meta["config"]).expect("config json")
    }

    fn raw(&self, name: &str) -> Vec<u8> {
        let st = SafeTensors::deserialize(&self.bytes).expect("safetensors");
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name}"));
        t.data().to_vec()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        self.raw(name)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn i32s(&self, name: &str) -> Vec<i32> {
        self.raw(name)
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn tokens(&self) -> Vec<u32> {
        self.i32s("tokens").into_iter().map(|t| t as u32).collect()
    }

    fn mask(&self) -> Vec<u8> {
        self.raw("mask")
    }
}

/// The fixture's model keys as `--set` arguments.
fn model_sets(reference: &Reference) -> Vec<String> {
    let c = reference.config();
    let mut sets: Vec<String> = ["n_layer", "n_head", "n_embd", "vocab_size", "seq_len"]
        .iter()
        .map(|k| format!("model.{k}={}", c[*k]))
        .collect();
    sets.push(format!(
        "model.init_from={}",
        fixture("gpt2_tiny_weights.safetensors").display()
    ));
    sets
}

#[test]
fn the_masked_loss_and_its_gradients_match_pytorch_with_ignored_labels() {
    let reference = Reference::load();
    let c = reference.config();
    let accum = c["grad_accum_steps"].as_u64().expect("accum") as usize;
    let overrides: Vec<String> = model_sets(&reference)
        .into_iter()
        .chain([
            format!("data.micro_batch_size={}", c["micro_batch_size"]),
            format!("data.grad_accum_steps={accum}"),
            "zero.stage=0".into(),
            "offload_param.device=\"none\"".into(),
            "offload_optimizer.device=\"none\"".into(),
            "train.device=\"cpu\"".into(),
        ])
        .collect();
    let config = Config::load(None, &overrides).expect("config");
    let (b, t) = (config.data.micro_batch_size, config.model.seq_len);
    let mut loader =
        Loader::from_masked(reference.tokens(), reference.mask(), b, t, 0, false).expect("loader");
    let mut engine = Engine::from_config(config).expect("engine");
    let mut batches = vec![engine.new_batch(); accum];
    for batch in &mut batches {
        loader.fill(batch).expect("batch");
    }
    // The loader's rule: a target whose mask byte is 0 is ignored (the fixture's -100 labels).
    let counted: Vec<i32> = batches
        .iter()
        .map(|mb| mb.targets.iter().filter(|&&x| x != IGNORE_TARGET).count() as i32)
        .collect();
    assert_eq!(counted, reference.i32s("unmasked"));

    let loss = engine.forward_backward(&batches).expect("forward_backward");
    let want = reference.f32s("loss");
    assert!(rel_diff("loss", &[loss], &want) <= 1e-5);
    // The fixture tells the global mean from the mean of the micro-batches' means.
    let wrong = reference.f32s("mean_of_means");
    assert!(
        rel_diff("mean of means (a wrong rule)", &[loss], &wrong) > 1e-3,
        "the fixture does not tell the two rules apart"
    );
    let grads = engine.grads().expect("grads");
    let mut worst = 0.0f64;
    for unit in engine.units().to_vec() {
        for spec in &unit.tensors {
            let rel = rel_diff(
                &format!("grad {}", spec.name),
                &hf_layout(&engine, &grads, &spec.name),
                &reference.f32s(&format!("grad.{}", spec.name)),
            );
            worst = worst.max(rel);
        }
    }
    assert!(
        worst <= 1e-4,
        "worst gradient relative difference {worst:.3e}"
    );

    // Evaluation adds up the same way: summed losses over counted targets.
    let (mut sum, mut n) = (0.0f64, 0usize);
    for batch in &batches {
        let (s, k) = engine.eval_loss_sum(batch).expect("eval");
        sum += s;
        n += k;
    }
    assert!(rel_diff("eval loss over the step", &[(sum / n as f64) as f32], &want) <= 1e-5);
    // A micro-batch with every target masked counts for nothing (PyTorch's mean over none is NaN).
    let mut none = batches[0].clone();
    none.targets.fill(IGNORE_TARGET);
    assert_eq!(engine.eval_loss_sum(&none).expect("eval"), (0.0, 0));
    assert!(engine.eval_loss(&none).expect("eval").is_nan());
}

/// Losses and gradient norms per step and the exported weights of one `strata train` run.
struct Run {
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
    weights: Vec<(String, Vec<f32>)>,
}

/// `strata train` for 3 steps on `data` at `world` ranks on this host, with `sets` last.
fn train(
    dir: &Path,
    name: &str,
    data: &Path,
    reference: &Reference,
    sets: &[&str],
    world: usize,
) -> Run {
    let metrics = dir.join(format!("{name}.jsonl"));
    let weights = dir.join(format!("{name}.safetensors"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(["train", "--steps", "3"]);
    let common = [
        format!("data.train={}", data.display()),
        format!(
            "data.micro_batch_size={}",
            reference.config()["micro_batch_size"]
        ),
        "optim.lr=1e-2".into(),
        "optim.warmup_steps=1".into(),
        "train.device=\"cpu\"".into(),
        "dist.timeout_s=60".into(),
        format!("train.metrics_file={}", metrics.display()),
        format!("train.export_to={}", weights.display()),
    ];
    for set in model_sets(reference)
        .iter()
        .chain(&common)
        .map(String::as_str)
        .chain(sets.iter().copied())
    {
        cmd.args(["--set", set]);
    }
    if world > 1 {
        cmd.args(["--nproc", &world.to_string()]);
    }
    let out = cmd.output().expect("run strata");
    assert!(
        out.status.success(),
        "{name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (losses, grad_norms) = std::fs::read_to_string(&metrics)
        .expect("metrics")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            let loss = v["loss"].as_f64().expect("loss");
            (loss, v["grad_norm"].as_f64().expect("grad norm"))
        })
        .unzip();
    let bytes = std::fs::read(&weights).expect("exported weights");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut weights: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    Run {
        losses,
        grad_norms,
        weights,
    }
}

/// `strata train` on a token file with a loss mask: the first step's loss is PyTorch's; 2 ranks with half
/// the accumulation, and 2 ranks at ZeRO-3 with parameters and optimizer states on NVMe, train as 1 rank.
#[test]
fn a_masked_token_file_trains_alike_at_one_and_two_ranks_and_with_zero_3_offload() {
    let reference = Reference::load();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("masked.bin");
    let vocab = reference.config()["vocab_size"].as_u64().expect("vocab") as usize;
    let mut writer = TokenWriter::create(&data, vocab).expect("writer");
    writer
        .push(&reference.tokens(), Some(&reference.mask()))
        .expect("push");
    assert!(writer.finish().expect("finish").masked);

    let zero0 = [
        "zero.stage=0",
        "offload_param.device=\"none\"",
        "offload_optimizer.device=\"none\"",
    ];
    let one = train(
        dir.path(),
        "one",
        &data,
        &reference,
        &[&zero0[..], &["data.grad_accum_steps=4"]].concat(),
        1,
    );
    assert!(
        rel_diff(
            "step 1 loss",
            &[one.losses[0] as f32],
            &reference.f32s("loss")
        ) <= 1e-5
    );
    // The file holds one step: the next steps read it again, and the loss falls.
    assert!(one.losses[2] < one.losses[0], "{:?}", one.losses);

    let nvme = dir.path().join("nvme");
    std::fs::create_dir(&nvme).expect("nvme dir");
    let nvme_sets = [
        "zero.stage=3".to_string(),
        "zero.param_persistence_threshold=0".into(),
        "offload_param.device=\"nvme\"".into(),
        "offload_optimizer.device=\"nvme\"".into(),
        format!("offload_param.nvme_path={}", nvme.display()),
        format!("offload_optimizer.nvme_path={}", nvme.display()),
        "data.grad_accum_steps=2".into(),
    ];
    let runs = [
        (
            "two_ranks",
            [&zero0[..], &["data.grad_accum_steps=2"]].concat(),
        ),
        (
            "two_ranks_zero3_nvme",
            nvme_sets.iter().map(String::as_str).collect::<Vec<_>>(),
        ),
    ];
    for (name, sets) in runs {
        let run = train(dir.path(), name, &data, &reference, &sets, 2);
        assert_eq!(run.losses.len(), one.losses.len());
        let steps = run.losses.iter().zip(&run.grad_norms);
        for (step, (a, b)) in steps
            .zip(one.losses.iter().zip(&one.grad_norms))
            .enumerate()
        {
            for (what, got, want) in [("loss", a.0, b.0), ("grad norm", a.1, b.1)] {
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs(),
                    "{name}: step {} {what} {got} vs one rank's {want}",
                    step + 1
                );
            }
        }
        for ((na, a), (nb, b)) in run.weights.iter().zip(&one.weights) {
            assert_eq!(na, nb);
            let (mut a, mut b) = (a.clone(), b.clone());
            if na.ends_with("attn.c_attn.bias") {
                // The key bias has an exact gradient of zero (softmax cancels a shift of every
                // score of a row): AdamW normalises rounding noise there, which another
                // summation order changes. Bound it by AdamW's largest movement (lr per step,
                // 3 steps); the query and value biases are compared below.
                let c = a.len() / 3;
                let key: f32 = a
                    .drain(c..2 * c)
                    .zip(b.drain(c..2 * c))
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(
                    key <= 2.0 * 3.0 * 1e-2,
                    "{name}: {na} key part moved by {key}"
                );
            }
            assert!(
                rel_diff(&format!("{name}: {na}"), &a, &b) <= 1e-4,
                "{name}: weights of {na}"
            );
        }
    }
}

/// End to end: chats rendered by the Llama 3 tokenizer fixture's chat template (`strata prepare`, the loss on
/// the assistant's tokens only) fine-tune a small Llama at 2 ranks with ZeRO-3 and everything on NVMe; the
/// training loss and the held-out masked loss fall; the model directory it exports, read back at one rank,
/// has the held-out loss of the run's last evaluation. (That transformers computes the same loss on that
/// directory is checked by hand: tests/fixtures/llama/check_chat_export.py.)
#[test]
fn a_llama_fine_tunes_on_chat_jsonl_at_two_ranks_with_zero_3_on_nvme() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Answers the model can learn from the question: the assistant repeats the user's words in reverse.
    let words = [
        "apple", "river", "stone", "cloud", "green", "seven", "light", "music", "paper", "table",
    ];
    let mut lines = String::new();
    for i in 0..240usize {
        let ask: Vec<&str> = (0..3)
            .map(|k| words[(i * 7 + k * 3) % words.len()])
            .collect();
        let answer: Vec<&str> = ask.iter().rev().copied().collect();
        let chat = serde_json::json!({"messages": [
            {"role": "user", "content": format!("reverse: {}", ask.join(" "))},
            {"role": "assistant", "content": answer.join(" ")},
        ]});
        lines.push_str(&format!("{chat}\n"));
    }
    let input = dir.path().join("chats.jsonl");
    std::fs::write(&input, lines).expect("chats");
    let tokens = dir.path().join("chats.bin");
    let strata = env!("CARGO_BIN_EXE_strata");
    let tokenizer = fixture("tokenizers/llama3");
    let out = Command::new(strata)
        .args(["prepare", "--val-fraction", "0.1", "--tokenizer"])
        .arg(&tokenizer)
        .arg("-o")
        .arg(&tokens)
        .arg(&input)
        .output()
        .expect("run strata prepare");
    assert!(
        out.status.success(),
        "prepare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nvme = dir.path().join("nvme");
    std::fs::create_dir(&nvme).expect("nvme dir");
    let metrics = dir.path().join("metrics.jsonl");
    let export = dir.path().join("export");
    let mut cmd = Command::new(strata);
    cmd.args([
        "train",
        "configs/llama-tiny.toml",
        "--nproc",
        "2",
        "--steps",
        "40",
    ])
    .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    for set in [
        format!("data.train={}", tokens.display()),
        format!("data.val={}", dir.path().join("chats_val.bin").display()),
        // The fixture's vocabulary (420 ids and 5 special tokens) under 512.
        "model.vocab_size=512".into(),
        "model.seq_len=64".into(),
        "model.n_layer=2".into(),
        "data.micro_batch_size=4".into(),
        "optim.warmup_steps=5".into(),
        "train.eval_every=20".into(),
        "train.eval_batches=4".into(),
        "zero.stage=3".into(),
        "zero.param_persistence_threshold=0".into(),
        "offload_param.device=\"nvme\"".into(),
        "offload_optimizer.device=\"nvme\"".into(),
        format!("offload_param.nvme_path={}", nvme.display()),
        format!("offload_optimizer.nvme_path={}", nvme.display()),
        "dist.timeout_s=60".into(),
        format!("train.metrics_file={}", metrics.display()),
        format!("train.export_to={}", export.display()),
    ] {
        cmd.args(["--set", &set]);
    }
    let out = cmd.output().expect("run strata train");
    assert!(
        out.status.success(),
        "train: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let loss = |r: &serde_json::Value| r["loss"].as_f64().expect("loss");
    let first: f64 = records[..5].iter().map(loss).sum::<f64>() / 5.0;
    let last: f64 = records[records.len() - 5..].iter().map(loss).sum::<f64>() / 5.0;
    let val: Vec<f64> = records
        .iter()
        .filter_map(|r| r["val_loss"].as_f64())
        .collect();
    println!("train loss {first:.3} → {last:.3}; val loss {val:?}");
    assert!(last < 0.6 * first, "train loss {first} → {last}");
    assert_eq!(val.len(), 2, "{val:?}");
    assert!(val[1] < val[0], "{val:?}");

    // The export (fp32, a Hugging Face directory) read back by one rank without ZeRO: the same
    // held-out micro-batches give the last evaluation's loss.
    let sets = [
        format!("model.init_from={}", export.display()),
        "model.seq_len=64".into(),
        format!("data.val={}", dir.path().join("chats_val.bin").display()),
        "data.micro_batch_size=4".into(),
        "train.device=\"cpu\"".into(),
        "zero.stage=0".into(),
        "offload_param.device=\"none\"".into(),
        "offload_optimizer.device=\"none\"".into(),
    ];
    let config = Config::load(None, &sets).expect("config of the export");
    assert_eq!(config.model.n_layer, 2, "config.json fills [model]");
    let mut loader = Loader::val_from_config(&config)
        .expect("val loader")
        .expect("data.val");
    let mut engine = Engine::from_config(config).expect("engine on the export");
    let mut batch = engine.new_batch();
    let (mut sum, mut counted) = (0.0f64, 0usize);
    for _ in 0..4 {
        loader.fill(&mut batch).expect("batch");
        let (s, n) = engine.eval_loss_sum(&batch).expect("eval");
        sum += s;
        counted += n;
    }
    let reread = (sum / counted as f64) as f32;
    assert!(rel_diff("held-out loss of the export", &[reread], &[val[1] as f32]) <= 1e-5);
}
