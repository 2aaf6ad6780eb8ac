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
    let r = reference();
    let (b, accum) = (
        r["batch"]["micro_batch_size"].as_u64().expect("batch"),
        r["batch"]["grad_accum_steps"].as_u64().expect("accum") as usize,
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(["train", "--steps", "1"]);
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

fn first_loss(tmp: &Path) -> f64 {
    let text = std::fs::read_to_string(tmp.join("metrics.jsonl")).expect("metrics");
    let line: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a step")).expect("json");
    line["loss"].as_f64().expect("loss")
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
