//! The DeepSpeed mapping against DeepSpeed's own example configs and the rules for what the JSON leaves
//! out, gives as "auto" or gets wrong.

use super::*;
use crate::config::{Config, OffloadDevice, OptimConfig, Precision, Schedule};

/// DeepSpeed's ZeRO-Infinity example (its config-json documentation and the ZeRO-Infinity
/// tutorial): parameters and optimizer states on NVMe, with its aio block.
const ZERO_INFINITY: &str = r#"{
  "train_batch_size": 16,
  "train_micro_batch_size_per_gpu": 2,
  "steps_per_print": 10,
  "gradient_clipping": 1.0,
  "optimizer": {
    "type": "AdamW",
    "params": { "lr": 0.0001, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1 }
  },
  "scheduler": {
    "type": "WarmupDecayLR",
    "params": { "warmup_min_lr": 0, "warmup_max_lr": 0.0001, "warmup_num_steps": 100, "total_num_steps": 1000 }
  },
  "bf16": { "enabled": true },
  "zero_optimization": {
    "stage": 3,
    "contiguous_gradients": true,
    "overlap_comm": true,
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5,
    "sub_group_size": 1e9,
    "reduce_bucket_size": 1e7,
    "stage3_gather_16bit_weights_on_model_save": true,
    "offload_param": {
      "device": "nvme",
      "nvme_path": "/local_nvme",
      "pin_memory": true,
      "buffer_count": 5,
      "buffer_size": 1e8,
      "max_in_cpu": 1e9
    },
    "offload_optimizer": {
      "device": "nvme",
      "nvme_path": "/local_nvme",
      "pin_memory": true,
      "buffer_count": 4,
      "fast_init": false,
      "pipeline_read": false,
      "pipeline_write": false
    }
  },
  "aio": {
    "block_size": 1048576,
    "queue_depth": 8,
    "thread_count": 1,
    "single_submit": false,
    "overlap_events": true
  },
  "wall_clock_breakdown": false
}"#;

/// The Hugging Face Trainer's ds_config_zero3.json: "auto" everywhere the Trainer fills in.
const HF_ZERO3: &str = r#"{
  "fp16": { "enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1 },
  "bf16": { "enabled": "auto" },
  "optimizer": { "type": "AdamW", "params": { "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto" } },
  "scheduler": { "type": "WarmupLR", "params": { "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto" } },
  "zero_optimization": {
    "stage": 3,
    "offload_optimizer": { "device": "cpu", "pin_memory": true },
    "offload_param": { "device": "cpu", "pin_memory": true },
    "overlap_comm": true,
    "contiguous_gradients": true,
    "sub_group_size": 1e9,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    "stage3_gather_16bit_weights_on_model_save": true
  },
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "steps_per_print": 2000,
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto",
  "wall_clock_breakdown": false
}"#;

/// A ZeRO-2 CPU-offload config as DeepSpeed's examples write it (fp16, WarmupLR, the
/// activation_checkpointing block).
const ZERO2_CPU: &str = r#"{
  "train_micro_batch_size_per_gpu": 8,
  "gradient_accumulation_steps": 2,
  "zero_allow_untested_optimizer": true,
  "optimizer": { "type": "Adam", "params": { "lr": 3e-5, "weight_decay": 0.01, "adam_w_mode": true } },
  "scheduler": { "type": "WarmupCosineLR", "params": { "total_num_steps": 500, "warmup_num_steps": 50, "cos_min_ratio": 0.1, "warmup_min_ratio": 0 } },
  "zero_optimization": {
    "stage": 2,
    "offload_optimizer": { "device": "cpu", "pin_memory": true },
    "contiguous_gradients": true,
    "overlap_comm": true,
    "allgather_bucket_size": 2e8,
    "reduce_bucket_size": 2e8
  },
  "fp16": { "enabled": true, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1 },
  "steps_per_print": 100,
  "activation_checkpointing": {
    "partition_activations": false, "cpu_checkpointing": false, "contiguous_memory_optimization": false,
    "number_checkpoints": null, "synchronize_checkpoint_boundary": false, "profile": false
  }
}"#;

fn load(json: &str, world: usize) -> Result<Config, ConfigError> {
    load_over(None, json, world)
}

/// The JSON over a TOML file holding `toml` (over the embedded default when `None`).
fn load_over(toml: Option<&str>, json: &str, world: usize) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ds_config.json");
    std::fs::write(&path, json).expect("write");
    let file = dir.path().join("model.toml");
    if let Some(toml) = toml {
        std::fs::write(&file, toml).expect("write");
    }
    Config::load_with_deepspeed(toml.map(|_| file.as_path()), Some((&path, world)), &[])
}

/// The notes a load gave.
fn notes(c: &Config) -> &[String] {
    &c.deepspeed.as_ref().expect("a DeepSpeed config").1
}

#[test]
fn the_zero_infinity_example_maps_onto_the_toml_tree() {
    let c = load(ZERO_INFINITY, 4).expect("loads");
    assert_eq!((c.data.micro_batch_size, c.data.grad_accum_steps), (2, 2));
    assert_eq!(c.train.precision, Precision::Bf16);
    assert_eq!(
        (c.optim.lr, c.optim.min_lr, c.optim.grad_clip),
        (1e-4, 0.0, 1.0)
    );
    assert_eq!(
        (c.optim.betas, c.optim.eps, c.optim.weight_decay),
        ([0.9, 0.95], 1e-8, 0.1)
    );
    assert_eq!(
        (c.optim.schedule, c.optim.warmup_steps, c.train.steps),
        (Schedule::Linear, 100, 1000)
    );
    assert_eq!(c.train.log_every, 10);
    assert_eq!(c.zero.stage, 3);
    // Element counts at bf16 (2 bytes).
    assert_eq!(c.zero.prefetch_bytes_max.bytes(), 100_000_000);
    assert_eq!(c.zero.live_params_bytes_max.bytes(), 2_000_000_000);
    assert_eq!(c.zero.param_persistence_threshold, 100_000);
    assert_eq!(c.offload_param.buffer_size.bytes(), 200_000_000);
    assert_eq!(
        (c.offload_param.device, c.offload_optimizer.device),
        (OffloadDevice::Nvme, OffloadDevice::Nvme)
    );
    assert_eq!(
        (
            c.offload_param.buffer_count,
            c.offload_optimizer.buffer_count
        ),
        (5, 4)
    );
    assert!(c.offload_param.pin_memory && c.offload_optimizer.pin_memory);
    assert_eq!(c.offload_optimizer.sub_group_size, 1 << 28);
    assert_eq!((c.aio.block_size.bytes(), c.aio.queue_depth), (1 << 20, 8));
    let notes = &c.deepspeed.as_ref().expect("notes").1;
    for key in [
        "zero_optimization.sub_group_size",
        "zero_optimization.stage3_max_reuse_distance",
        "zero_optimization.stage3_gather_16bit_weights_on_model_save",
        "zero_optimization.offload_param.max_in_cpu",
        "zero_optimization.offload_optimizer.pipeline_read",
        "aio.thread_count",
        "aio.single_submit",
        "aio.overlap_events",
        "wall_clock_breakdown",
    ] {
        assert_eq!(
            notes.iter().filter(|n| n.starts_with(key)).count(),
            1,
            "{key}: {notes:#?}"
        );
    }
    // The batch rule: 16 = 2 x 2 x 4 ranks; at 3 ranks it cannot hold.
    let e = load(ZERO_INFINITY, 3).unwrap_err().to_string();
    assert!(!e.contains("TOML"), "{e}");
    assert!(
        e.contains("`train_batch_size`") && e.contains("16 is not a multiple"),
        "{e}"
    );
}

#[test]
fn the_hugging_face_zero3_config_keeps_the_toml_where_it_says_auto() {
    let c = load(HF_ZERO3, 1).expect("loads");
    let d = Config::default();
    assert_eq!(
        c.optim,
        OptimConfig {
            schedule: Schedule::Constant,
            ..d.optim.clone()
        }
    );
    assert_eq!(
        (c.data.micro_batch_size, c.data.grad_accum_steps),
        (d.data.micro_batch_size, 1)
    );
    assert_eq!(
        (c.offload_param.device, c.offload_optimizer.device),
        (OffloadDevice::Cpu, OffloadDevice::Cpu)
    );
    assert_eq!(c.zero.prefetch_bytes_max, d.zero.prefetch_bytes_max);
    assert_eq!(c.train.precision, Precision::Auto);
    let notes = &c.deepspeed.as_ref().expect("notes").1;
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("optimizer.params.lr: \"auto\"")),
        "{notes:#?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("fp16.loss_scale_window")),
        "{notes:#?}"
    );
}

#[test]
fn a_zero2_cpu_offload_config_with_fp16_and_a_cosine_schedule() {
    let c = load(ZERO2_CPU, 1).expect("loads");
    assert_eq!(
        (c.zero.stage, c.offload_optimizer.device),
        (2, OffloadDevice::Cpu)
    );
    assert_eq!(c.train.precision, Precision::Fp16);
    assert_eq!((c.data.micro_batch_size, c.data.grad_accum_steps), (8, 2));
    assert_eq!(c.optim.schedule, Schedule::Cosine);
    assert!((c.optim.min_lr - 3e-6).abs() < 1e-12, "{}", c.optim.min_lr);
    assert_eq!((c.optim.warmup_steps, c.train.steps), (50, 500));
    assert!(c.train.activation_checkpointing);
}

#[test]
fn unknown_and_unsupported_keys_are_errors_naming_them() {
    for (json, needles) in [
        (
            r#"{"zero_optimization": {"stage": 3, "offload_parm": {}}}"#,
            &["`zero_optimization.offload_parm`", "not a DeepSpeed key"][..],
        ),
        (r#"{"train_batch_sise": 8}"#, &["`train_batch_sise`"]),
        (
            r#"{"optimizer": {"type": "Lamb", "params": {}}}"#,
            &["`optimizer.type`", "\"Lamb\" is not built"],
        ),
        (
            r#"{"optimizer": {"type": "Adam", "params": {"adam_w_mode": false}}}"#,
            &["`optimizer.params.adam_w_mode`"],
        ),
        (
            r#"{"scheduler": {"type": "OneCycle", "params": {}}}"#,
            &["`scheduler.type`"],
        ),
        (
            r#"{"aio": {"use_gds": true}}"#,
            &["`aio.use_gds`", "GPUDirect Storage"],
        ),
        (
            r#"{"bf16": {"enabled": true}, "fp16": {"enabled": true}}"#,
            &["`fp16.enabled`", "bf16.enabled is enabled too"],
        ),
        (
            r#"{"zero_optimization": {"offload_param": {"device": "disk"}}}"#,
            &["`zero_optimization.offload_param.device`", "\"disk\""],
        ),
        (
            r#"{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}, "zero_optimization_x": 1}"#,
            &["`zero_optimization_x`"],
        ),
        ("{\"stage\": 3,}", &["not valid JSON", "line 1 column"]),
        (
            r#"{"train_micro_batch_size_per_gpu": 18446744073709551615}"#,
            &[
                "`train_micro_batch_size_per_gpu`",
                "18446744073709551615 is beyond the largest integer",
            ],
        ),
        (
            r#"{"steps_per_print": 1e30}"#,
            &["`steps_per_print`", "is beyond the largest integer"],
        ),
        (
            r#"{"zero_optimization": {"stage3_prefetch_bucket_size": 9e18}}"#,
            &[
                "`zero_optimization.stage3_prefetch_bucket_size`",
                "elements of 4 bytes are beyond",
            ],
        ),
        (
            r#"{"train_batch_size": 8, "gradient_accumulation_steps": 0}"#,
            &["`gradient_accumulation_steps`", "at least 1"],
        ),
        (
            r#"{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4611686018427387904, "gradient_accumulation_steps": 4}"#,
            &["`train_batch_size`", "8 is not"],
        ),
    ] {
        let e = load(json, 1).unwrap_err().to_string();
        for n in needles {
            assert!(e.contains(n), "{json}: {e}");
        }
    }
    // A value strata rejects names the JSON key it came from.
    let e = load(
        r#"{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}"#,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`zero_optimization.offload_param.device` (strata's offload_param.device)")
            && e.contains("zero.stage = 3"),
        "{e}"
    );
}

#[test]
fn what_the_json_leaves_out_or_says_auto_keeps_the_toml() {
    const TOML: &str = "[zero]\nstage = 3\n[offload_param]\ndevice = \"cpu\"\n[offload_optimizer]\ndevice = \"cpu\"\n";
    for json in [
        r#"{"zero_optimization": {"stage": "auto"}}"#,
        r#"{"zero_optimization": {"overlap_comm": true}}"#,
        r#"{"zero_optimization": {"stage": 3, "contiguous_gradients": true}}"#,
    ] {
        let c = load_over(Some(TOML), json, 1).expect("loads");
        assert_eq!(c.zero.stage, 3, "{json}");
        assert_eq!(
            (c.offload_param.device, c.offload_optimizer.device),
            (OffloadDevice::Cpu, OffloadDevice::Cpu),
            "{json}"
        );
    }
    // A stage below 3 takes the parameters back to the device, as DeepSpeed does, and says so.
    let c = load_over(Some(TOML), r#"{"zero_optimization": {"stage": 2}}"#, 1).expect("loads");
    assert_eq!(
        (
            c.zero.stage,
            c.offload_param.device,
            c.offload_optimizer.device
        ),
        (2, OffloadDevice::None, OffloadDevice::Cpu)
    );
    assert!(
        notes(&c).iter().any(|n| n
            == "zero_optimization.stage: as in DeepSpeed, offload_param.device = \"none\" (the TOML had \"cpu\")"),
        "{:#?}",
        notes(&c)
    );
    // Where the TOML already agrees, nothing is said.
    let c = load_over(None, r#"{"zero_optimization": {"stage": 0}}"#, 1).expect("loads");
    assert_eq!(c.offload_optimizer.device, OffloadDevice::None);
    let c = load_over(
        Some("[zero]\nstage = 1\n"),
        r#"{"zero_optimization": {"stage": 2}}"#,
        1,
    )
    .expect("loads");
    assert!(
        !notes(&c).iter().any(|n| n.contains("as in DeepSpeed")),
        "{:#?}",
        notes(&c)
    );
}

#[test]
fn an_error_about_a_value_the_json_set_or_left_out_names_the_json_key() {
    // A file without an nvme_path (the embedded default has one):
    let e = load_over(
        Some("[model]\nn_layer = 2\n"),
        r#"{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}, "offload_optimizer": {"device": "cpu"}}}"#,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(
            "`zero_optimization.offload_param.nvme_path` (strata's offload_param.nvme_path)"
        ),
        "{e}"
    );
    // A rule across keys broken by the JSON names the JSON key it set and the TOML key.
    let e = load_over(
        Some("[zero]\nstage = 3\n[offload_param]\ndevice = \"cpu\"\n[offload_optimizer]\ndevice = \"cpu\"\n"),
        r#"{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}}"#,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`zero_optimization.offload_optimizer.device` (strata's offload_optimizer.device): config key `offload_param.device`"),
        "{e}"
    );
    // bf16 on the CPU backend: the JSON key, not strata's.
    let e = load_over(
        Some("[train]\ndevice = \"cpu\"\n"),
        r#"{"bf16": {"enabled": true}}"#,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`bf16.enabled` (strata's train.precision)"),
        "{e}"
    );
    // An error the engine finds later is named the same way.
    let c = load(r#"{"bf16": {"enabled": true}}"#, 1).expect("loads");
    let e = c
        .blame_deepspeed("train.precision", "Bf16 needs a GPU")
        .expect("named")
        .to_string();
    assert!(
        e.ends_with(": `bf16.enabled` (strata's train.precision): Bf16 needs a GPU"),
        "{e}"
    );
    assert!(c.blame_deepspeed("optim.lr", "x").is_none());
}

#[test]
fn the_unknown_key_error_points_at_a_readme_table_that_exists() {
    let readme = include_str!("../../../../README.md");
    let heading = readme
        .lines()
        .find(|l| l.starts_with('#') && l.contains(README_TABLE))
        .unwrap_or_else(|| panic!("no README heading \"{README_TABLE}\""));
    // Every top-level key the mapper reads is in the table below the heading.
    let table: String = readme
        .lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    for key in [
        "zero_optimization",
        "offload_param",
        "offload_optimizer",
        "aio",
        "optimizer",
        "scheduler",
        "bf16",
        "fp16",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "steps_per_print",
        "activation_checkpointing",
        "tensorboard",
    ] {
        assert!(
            table.contains(&format!("`{key}")),
            "the README's table lacks {key}"
        );
    }
}

#[test]
fn schedules_follow_deepspeed_where_the_scheduler_type_defines_them() {
    // WarmupDecayLR decays to warmup_min_lr (0 when left out), the TOML's min_lr replaced with a note.
    let c = load_over(
        Some("[optim]\nlr = 1e-3\nmin_lr = 1e-4\n"),
        r#"{"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}}}"#,
        1,
    )
    .expect("loads");
    assert_eq!((c.optim.min_lr, c.optim.schedule), (0.0, Schedule::Linear));
    assert!(
        notes(&c).iter().any(|n| n
            .starts_with("scheduler.params.warmup_min_lr: as in DeepSpeed, optim.min_lr = 0.0")),
        "{:#?}",
        notes(&c)
    );
    let c = load(
        r#"{"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3, "warmup_type": "linear"}}}"#,
        1,
    )
    .expect("loads");
    assert_eq!((c.optim.min_lr, c.optim.lr), (1e-5, 1e-3));
    // DeepSpeed warms up on a log curve unless told "linear": strata's linear warmup is said.
    assert!(
        !notes(&c)
            .iter()
            .any(|n| n.starts_with("scheduler.params.warmup_type")),
        "{:#?}",
        notes(&c)
    );
    let c = load(
        r#"{"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}}"#,
        1,
    )
    .expect("loads");
    assert!(
        notes(&c)
            .iter()
            .any(|n| n.starts_with("scheduler.params.warmup_type: not given")
                && n.contains("log curve")),
        "{:#?}",
        notes(&c)
    );
    assert_eq!(c.optim.warmup_steps, 5);
    // WarmupCosineLR ends at cos_min_ratio x lr (0.0001 when left out), of the TOML's lr where the JSON
    // says "auto".
    let c = load_over(
        Some("[optim]\nlr = 2e-3\n"),
        r#"{"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "scheduler": {"type": "WarmupCosineLR", "params": {"cos_min_ratio": 0.5}}}"#,
        1,
    )
    .expect("loads");
    assert_eq!((c.optim.lr, c.optim.min_lr), (2e-3, 1e-3));
    let c = load(r#"{"scheduler": {"type": "WarmupCosineLR"}}"#, 1).expect("loads");
    assert!((c.optim.min_lr - 3e-7).abs() < 1e-12, "{}", c.optim.min_lr);
}
