//! `model.init_from = "DIR"`: Hugging Face model directories written by transformers'
//! `save_pretrained` (runtime/tests/fixtures/hf_dirs/make_hf_dirs.py: a GQA Llama in fp32 shards, a
//! GPT-2 in bf16 shards, several shards each) load at ZeRO-3 with parameters and optimizer states
//! on NVMe, at 1 and 2 ranks, and the first step's loss equals transformers' on the same tokens;
//! a broken directory is refused in one line naming the file and the tensor or key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_dirs")
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference json")
}

/// `strata train` for one step on the fixture tokens from `dir`, with `sets` after the run's.
fn train(dir: &Path, tmp: &Path, world: usize, sets: &[String]) -> Output {
    train_steps(dir, tmp, world, 1, sets, &[])
}

/// [`train`] for `steps` steps, with `extra` arguments.
fn train_steps(
    dir: &Path,
    tmp: &Path,
    world: usize,
    steps: usize,
    sets: &[String],
    extra: &[&str],
) -> Output {
    let r = reference();
    let (b, accum) = (
        r["batch"]["micro_batch_size"].as_u64().expect("batch"),
        r["batch"]["grad_accum_steps"].as_u64().expect("accum") as usize,
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(["train", "--steps", &steps.to_string()]);
    cmd.args(extra);
    let nvme = tmp.join("nvme");
    std::fs::create_dir_all(&nvme).expect("nvme dir");
    for set in [
        format!("model.init_from={:?}", dir.display().to_string()),
        format!(
            "data.train={:?}",
            fixtures().join("tokens.bin").display().to_string()
        ),
        format!("data.micro_batch_size={b}"),
        // The global batch is the fixture's whatever the world size.
        format!("data.grad_accum_steps={}", accum / world),
        "zero.stage=3".into(),
        "zero.param_persistence_threshold=0".into(),
        "offload_param.device=\"nvme\"".into(),
        "offload_optimizer.device=\"nvme\"".into(),
        format!("offload_param.nvme_path={:?}", nvme.display().to_string()),
        format!(
            "offload_optimizer.nvme_path={:?}",
            nvme.display().to_string()
        ),
        "train.device=\"cpu\"".into(),
        "dist.timeout_s=60".into(),
        format!(
            "train.metrics_file={:?}",
            tmp.join("metrics.jsonl").display().to_string()
        ),
    ]
    .iter()
    .chain(sets)
    {
        cmd.args(["--set", set]);
    }
    if world > 1 {
        cmd.args(["--nproc", &world.to_string()]);
    }
    cmd.output().expect("run strata")
}

/// Each step's (loss, grad norm) of the run in `tmp`.
fn steps(tmp: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(tmp.join("metrics.jsonl")).expect("metrics");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            (
                v["loss"].as_f64().expect("loss"),
                v["grad_norm"].as_f64().expect("grad norm"),
            )
        })
        .collect()
}

fn first_loss(tmp: &Path) -> f64 {
    steps(tmp)[0].0
}

#[test]
fn transformers_directories_load_sharded_at_zero3_on_nvme_with_transformers_loss() {
    let r = reference();
    for name in ["llama", "gpt2"] {
        let want = r[name]["loss"].as_f64().expect("reference loss");
        let seq_len = r[name]["seq_len"].as_u64().expect("seq_len");
        let dir = fixtures().join(name);
        let shards = std::fs::read_dir(&dir)
            .expect("fixture dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("model-"))
            })
            .count();
        assert!(shards >= 3, "{name}: {shards} shards");
        for world in [1, 2] {
            let tmp = tempfile::tempdir().expect("tempdir");
            // The Llama family's context is the user's; GPT-2's is config.json's n_positions.
            let sets = match name {
                "llama" => vec![format!("model.seq_len={seq_len}")],
                _ => Vec::new(),
            };
            let out = train(&dir, tmp.path(), world, &sets);
            assert!(
                out.status.success(),
                "{name} at {world} ranks:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got = first_loss(tmp.path());
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "{name} at {world} ranks: strata's loss {got}, transformers' {want}"
            );
        }
    }
}

/// A copy of fixture `name` in `tmp`, changed by `edit`.
fn broken(tmp: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).expect("copy dir");
    for e in std::fs::read_dir(fixtures().join(name)).expect("fixture") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy");
    }
    edit(&dir);
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    edit(json.as_object_mut().expect("object"));
    std::fs::write(&path, serde_json::to_string(&json).expect("text")).expect("write config");
}

/// The shard of `dir` that holds `tensor`, rewritten with that tensor as F64.
fn widen_to_f64(dir: &Path, tensor: &str) -> PathBuf {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).expect("index"),
    )
    .expect("json");
    let shard = dir.join(index["weight_map"][tensor].as_str().expect("listed"));
    let bytes = std::fs::read(&shard).expect("shard");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        if name == tensor {
            let wide: Vec<u8> = view
                .data()
                .chunks_exact(2)
                .flat_map(|b| {
                    f64::from(half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).to_le_bytes()
                })
                .collect();
            owned.push((name, Dtype::F64, view.shape().to_vec(), wide));
        } else {
            owned.push((
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, &None, &shard).expect("rewrite shard");
    shard
}

#[test]
fn a_broken_model_directory_is_refused_in_one_line_naming_file_and_tensor_or_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let cases: Vec<(PathBuf, Vec<String>, Vec<String>)> = vec![
        {
            let d = broken(&t.join("a"), "llama", |d| {
                std::fs::remove_file(d.join("config.json")).expect("rm")
            });
            (
                d.clone(),
                vec![],
                vec![d.join("config.json").display().to_string()],
            )
        },
        {
            let d = broken(&t.join("b"), "llama", |d| {
                edit_config(d, |c| {
                    c.insert(
                        "architectures".into(),
                        serde_json::json!(["BertForMaskedLM"]),
                    );
                })
            });
            let file = d.join("config.json").display().to_string();
            (
                d,
                vec![],
                vec![file, "architectures".into(), "BertForMaskedLM".into()],
            )
        },
        {
            let d = broken(&t.join("c"), "llama", |d| {
                std::fs::remove_file(d.join("model-00003-of-00010.safetensors")).expect("rm")
            });
            let file = d
                .join("model-00003-of-00010.safetensors")
                .display()
                .to_string();
            (
                d,
                vec![],
                vec![file, "model.layers.0.mlp.gate_proj.weight".into()],
            )
        },
        {
            // config.json says 64, the shards hold a 48-wide MLP.
            let d = broken(&t.join("d"), "llama", |d| {
                edit_config(d, |c| {
                    c.insert("intermediate_size".into(), 64.into());
                })
            });
            // The first tensor by name that does not fit.
            let file = d
                .join("model-00005-of-00010.safetensors")
                .display()
                .to_string();
            (
                d,
                vec![],
                vec![
                    file,
                    "model.layers.0.mlp.down_proj.weight".into(),
                    "[32, 48]".into(),
                ],
            )
        },
        {
            let mut shard = PathBuf::new();
            let d = broken(&t.join("e"), "gpt2", |d| {
                shard = widen_to_f64(d, "transformer.h.0.attn.c_proj.weight")
            });
            let file = shard.display().to_string();
            (
                d,
                vec![],
                vec![
                    file,
                    "transformer.h.0.attn.c_proj.weight".into(),
                    "F64".into(),
                ],
            )
        },
        {
            let d = fixtures().join("llama");
            let file = d.join("config.json").display().to_string();
            (
                d,
                vec!["model.n_kv_head=4".into()],
                vec![file, "model.n_kv_head".into(), "num_key_value_heads".into()],
            )
        },
        {
            let d = broken(&t.join("f"), "gpt2", |d| {
                edit_config(d, |c| {
                    c.insert("scale_attn_by_inverse_layer_idx".into(), true.into());
                })
            });
            let file = d.join("config.json").display().to_string();
            (
                d,
                vec![],
                vec![file, "scale_attn_by_inverse_layer_idx".into()],
            )
        },
        {
            // An export into the model directory read is refused: inputs are never written.
            let d = broken(&t.join("g"), "llama", |_| {});
            let out = d.join("exported").display().to_string();
            (
                d.clone(),
                vec![format!("train.export_to={out:?}")],
                vec!["train.export_to".into(), "model.init_from".into(), out],
            )
        },
    ];
    for (dir, sets, names) in cases {
        let run = t.join("run");
        let out = train(&dir, &run, 1, &sets);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: succeeded", dir.display());
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        for name in &names {
            assert!(
                lines[0].contains(name.as_str()),
                "`{name}` not in: {stderr}"
            );
        }
        // Nothing trained.
        assert!(!run.join("metrics.jsonl").exists(), "{stderr}");
    }
}

/// Every tensor of a model directory (each shard), by name, as f32, with the shard that holds it.
fn tensors_of(dir: &Path) -> std::collections::BTreeMap<String, (String, Vec<f32>)> {
    let mut all = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("export dir") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".safetensors") {
            continue;
        }
        let bytes = std::fs::read(e.path()).expect("shard");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        for (tensor, view) in st.tensors() {
            assert_eq!(view.dtype(), Dtype::F32, "{tensor}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let before = all.insert(tensor.clone(), (name.clone(), values));
            assert!(before.is_none(), "{tensor} is in two shards");
        }
    }
    all
}

#[test]
fn an_exported_directory_reads_back_and_trains_on_bitwise_as_the_checkpoint_resumed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let source = fixtures().join("llama");
    let seq = "model.seq_len=16".to_string();
    // 4 steps are the token file's 8 micro-batches: step 5 reads micro-batches 0 and 1 again,
    // as step 1 of a run from the export does.
    let ckpt = t.join("ckpt");
    let trained = t.join("trained");
    let final_dir = t.join("final");
    let out = train_steps(
        &source,
        &trained,
        1,
        4,
        &[
            seq.clone(),
            format!("train.checkpoint_dir={:?}", ckpt.display().to_string()),
            format!("train.export_to={:?}", final_dir.display().to_string()),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // strata export into a directory of small shards.
    let limit = 20_000u64;
    let exported = t.join("exported");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["export", &ckpt.display().to_string(), "-o"])
        .arg(&exported)
        .args(["--max-shard-size", "20KB", "--tokenizer-from"])
        .arg(&source)
        .output()
        .expect("export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(exported.join("model.safetensors.index.json")).expect("index"),
    )
    .expect("json");
    let weight_map = index["weight_map"].as_object().expect("weight_map");
    let tensors = tensors_of(&exported);
    // The index lists every tensor once, in the shard that holds it.
    assert_eq!(weight_map.len(), tensors.len());
    for (name, (shard, _)) in &tensors {
        assert_eq!(weight_map[name].as_str(), Some(shard.as_str()), "{name}");
    }
    let shards: std::collections::BTreeSet<&String> = tensors.values().map(|(s, _)| s).collect();
    assert!(shards.len() >= 3, "{shards:?}");
    for shard in &shards {
        let len = std::fs::metadata(exported.join(shard))
            .expect("shard")
            .len();
        let held = tensors.values().filter(|(s, _)| s == *shard).count();
        assert!(
            len <= limit || held == 1,
            "{shard}: {len} bytes, {held} tensors"
        );
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(exported.join("config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["torch_dtype"], "float32");
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(exported.join(name)).expect(name),
            std::fs::read(source.join(name)).expect(name),
            "{name}"
        );
    }
    // train.export_to = DIR holds the same weights, in one file (under 5GB), and the
    // init_from directory's tokenizer files.
    let from_train = tensors_of(&final_dir);
    assert!(final_dir.join("model.safetensors").is_file());
    assert!(!final_dir.join("model.safetensors.index.json").exists());
    assert!(final_dir.join("tokenizer.json").is_file());
    assert_eq!(from_train.len(), tensors.len());
    for (name, (_, values)) in &tensors {
        assert_eq!(&from_train[name].1, values, "{name}");
    }

    // The checkpoint resumed for step 5, and the export read back for step 1: the same weights
    // on the same rows give the same loss and gradient norm, bit for bit.
    let resumed = t.join("resumed");
    let out = train_steps(
        &source,
        &resumed,
        1,
        5,
        &[
            seq.clone(),
            format!("train.checkpoint_dir={:?}", ckpt.display().to_string()),
        ],
        &["--resume", "latest"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = t.join("back");
    let out = train_steps(&exported, &back, 1, 1, &[seq], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed_steps = steps(&resumed);
    let back_steps = steps(&back);
    assert_eq!(
        resumed_steps.last(),
        back_steps.first(),
        "{resumed_steps:?}"
    );
    // And not the first step's: the export holds the trained weights.
    assert_ne!(steps(&trained)[0], back_steps[0]);
}

#[test]
fn a_bad_value_in_one_ranks_part_stops_every_rank_naming_file_and_tensor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut shard = PathBuf::new();
    // The last value of the LM head lies in rank 1's part of its unit (its shard's end).
    let dir = broken(tmp.path(), "llama", |d| {
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.join("model.safetensors.index.json")).expect("index"),
        )
        .expect("json");
        shard = d.join(
            index["weight_map"]["lm_head.weight"]
                .as_str()
                .expect("listed"),
        );
        let mut bytes = std::fs::read(&shard).expect("shard");
        let end = {
            let st = SafeTensors::deserialize(&bytes).expect("safetensors");
            let view = st.tensor("lm_head.weight").expect("lm_head");
            view.data().as_ptr() as usize - bytes.as_ptr() as usize + view.data().len()
        };
        bytes[end - 4..end].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(&shard, bytes).expect("write shard");
    });
    let run = tmp.path().join("run");
    let out = train(&dir, &run, 2, &["model.seq_len=16".to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&shard.display().to_string())
            && stderr.contains("lm_head.weight")
            && stderr.contains("NaN"),
        "{stderr}"
    );
    // The rank whose part was fine names the one that was not, instead of waiting for it.
    assert!(
        stderr.contains("rank 1 could not read its part"),
        "{stderr}"
    );
    assert!(!run.join("metrics.jsonl").exists(), "{stderr}");
}
