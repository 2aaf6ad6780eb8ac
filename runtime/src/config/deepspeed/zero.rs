//! The JSON's memory settings: `zero_optimization` (the stage, `offload_param`, `offload_optimizer`,
//! the `stage3_*` sizes), `aio` (the NVMe engine) and `activation_checkpointing`. What the JSON leaves
//! out keeps the TOML's value: a `zero_optimization` block without `stage` or without offload keys
//! keeps the TOML's stage and placement, and `"stage": "auto"` does too. A stage the JSON gives below 3
//! keeps the parameters on the device (below 1, the optimizer states too) unless the JSON places them,
//! as DeepSpeed does; a note says so where that changes the TOML's placement.

use serde_json::Value;

use super::{ConfigError, Mapper, SettingValue};

/// The DeepSpeed key of the same name as the strata `key`, for the keys whose names are DeepSpeed's
/// (`offload_param.nvme_path` is `zero_optimization.offload_param.nvme_path`).
pub(super) fn json_name(key: &str) -> Option<String> {
    let (section, leaf) = key.split_once('.')?;
    let same_name = match section {
        "offload_param" => [
            "device",
            "nvme_path",
            "buffer_count",
            "buffer_size",
            "pin_memory",
        ]
        .contains(&leaf),
        "offload_optimizer" => {
            ["device", "nvme_path", "buffer_count", "pin_memory"].contains(&leaf)
        }
        "zero" => leaf == "stage",
        _ => false,
    };
    let section = match section {
        "zero" => "",
        other => other,
    };
    let dot = if section.is_empty() { "" } else { "." };
    same_name.then(|| format!("zero_optimization.{section}{dot}{leaf}"))
}

impl Mapper {
    pub(super) fn zero(&mut self, v: &Value) -> Result<(), ConfigError> {
        let section = self.object(v, "zero_optimization")?;
        let mut stage = None;
        for (key, value) in section {
            let from = format!("zero_optimization.{key}");
            match key.as_str() {
                "stage" => {
                    stage = self.count(value, &from)?;
                    if let Some(n) = stage {
                        // count() keeps n within i64.
                        self.set("zero.stage", toml::Value::Integer(n as i64), &from);
                    }
                }
                "offload_param" => self.offload(value, &from, true)?,
                "offload_optimizer" => self.offload(value, &from, false)?,
                "cpu_offload" if self.boolean(value, &from)? => {
                    self.set("offload_optimizer.device", toml::Value::String("cpu".into()), &from)
                }
                "cpu_offload_params" if self.boolean(value, &from)? => {
                    self.set("offload_param.device", toml::Value::String("cpu".into()), &from)
                }
                "cpu_offload" | "cpu_offload_params" => {}
                "cpu_offload_use_pin_memory" => {
                    let pin = self.boolean(value, &from)?;
                    self.set("offload_param.pin_memory", toml::Value::Boolean(pin), &from);
                    self.set("offload_optimizer.pin_memory", toml::Value::Boolean(pin), &from);
                }
                "sub_group_size" => {
                    // DeepSpeed's default (1e9) means "as large as it gets".
                    if let Some(n) = self.count(value, &from)? {
                        let max = crate::config::offload::SUB_GROUP_SIZE_MAX as u64;
                        if n > max {
                            self.out.notes.push(format!(
                                "{from}: {n} is above strata's largest sub-group ({max} elements, a 1 GiB fp32 buffer): using {max}"
                            ));
                        }
                        self.set(
                            "offload_optimizer.sub_group_size",
                            toml::Value::Integer(n.min(max) as i64),
                            &from,
                        );
                    }
                }
                "stage3_prefetch_bucket_size" | "prefetch_bucket_size" => {
                    self.elements_as_bytes(value, &from, "zero.prefetch_bytes_max")?
                }
                "stage3_param_persistence_threshold" | "param_persistence_threshold" => {
                    self.int(value, &from, "zero.param_persistence_threshold")?
                }
                "stage3_max_live_parameters" | "max_live_parameters" => {
                    self.elements_as_bytes(value, &from, "zero.live_params_bytes_max")?
                }
                "stage3_max_reuse_distance" | "max_reuse_distance" => self.note(
                    &from,
                    "strata keeps a gathered unit while its next use is within zero.prefetch_bytes_max",
                ),
                "stage3_gather_16bit_weights_on_model_save" | "stage3_gather_fp16_weights_on_model_save"
                | "gather_16bit_weights_on_model_save" => self.note(
                    &from,
                    "strata's export (train.export_to) always gathers the whole fp32 weights into one safetensors file",
                ),
                "contiguous_gradients" | "reduce_bucket_size" | "allgather_bucket_size" | "allgather_partitions"
                | "reduce_scatter" | "overlap_comm" | "round_robin_gradients" | "use_multi_rank_bucket_allreduce" => {
                    self.note(
                        &from,
                        "strata reduces and gathers one unit (a block) at a time on its communication queue, overlapping compute",
                    )
                }
                "elastic_checkpoint" | "load_from_fp32_weights" | "ignore_unused_parameters" | "legacy_stage1"
                | "memory_efficient_linear" | "stage3_module_granularity_threshold" | "log_trace_cache_warnings" => {
                    self.note(&from, "no counterpart in strata")
                }
                "zero_hpz_partition_size" | "mics_shard_size" => {
                    if self.count(value, &from)?.is_some_and(|n| n > 1) {
                        return Err(self.error(&from, "hierarchical partitioning is not built: strata shards over all ranks"));
                    }
                }
                "zero_quantized_weights" | "zero_quantized_gradients" | "zero_quantized_nontrainable_weights" => {
                    if self.boolean(value, &from)? {
                        return Err(self.error(&from, "quantized communication (ZeRO++) is not built"));
                    }
                }
                _ => return Err(self.unknown(&from)),
            }
        }
        // DeepSpeed offloads parameters only at stage 3 and optimizer states from stage 1: a lower stage the
        // JSON gives takes them back to the device unless the JSON says where they go.
        if let Some(stage) = stage {
            let said = |m: &Self, key| m.out.settings.iter().any(|s| s.key == key);
            let none = || SettingValue::Toml(toml::Value::String("none".into()));
            if stage < 3 && !said(self, "offload_param.device") {
                self.put(
                    "offload_param.device",
                    none(),
                    "zero_optimization.stage",
                    true,
                );
            }
            if stage < 1 && !said(self, "offload_optimizer.device") {
                self.put(
                    "offload_optimizer.device",
                    none(),
                    "zero_optimization.stage",
                    true,
                );
            }
        }
        Ok(())
    }

    fn offload(&mut self, v: &Value, prefix: &str, params: bool) -> Result<(), ConfigError> {
        let section = self.object(v, prefix)?;
        let k = |param: &'static str, optim: &'static str| if params { param } else { optim };
        for (key, value) in section {
            let from = format!("{prefix}.{key}");
            match key.as_str() {
                "device" => {
                    let device = self.string(value, &from)?;
                    if !matches!(device, "none" | "cpu" | "nvme") {
                        return Err(self.error(&from, format!("\"{device}\": use \"none\", \"cpu\" or \"nvme\"")));
                    }
                    self.set(
                        k("offload_param.device", "offload_optimizer.device"),
                        toml::Value::String(device.into()),
                        &from,
                    );
                }
                "nvme_path" => {
                    let value = match value {
                        Value::String(s) => toml::Value::String(s.clone()),
                        Value::Array(a) => toml::Value::Array(
                            a.iter()
                                .map(|p| self.string(p, &from).map(|s| toml::Value::String(s.into())))
                                .collect::<Result<_, _>>()?,
                        ),
                        _ => return Err(self.error(&from, "must be a path or a list of paths")),
                    };
                    self.set(k("offload_param.nvme_path", "offload_optimizer.nvme_path"), value, &from);
                }
                "buffer_count" => self.int(value, &from, k("offload_param.buffer_count", "offload_optimizer.buffer_count"))?,
                "pin_memory" => {
                    let pin = self.boolean(value, &from)?;
                    self.set(k("offload_param.pin_memory", "offload_optimizer.pin_memory"), toml::Value::Boolean(pin), &from);
                }
                "buffer_size" if params => self.elements_as_bytes(value, &from, "offload_param.buffer_size")?,
                "max_in_cpu" if params => self.note(&from, "strata keeps every parameter shard on the tier offload_param.device names"),
                "pipeline_read" | "pipeline_write" | "pipeline" if !params => self.note(
                    &from,
                    "strata always pipelines the optimizer's NVMe sub-groups (read k+1 while stepping k and writing k-1)",
                ),
                "fast_init" if !params => self.note(&from, "strata writes the initial states once, before step 1"),
                "ratio" if !params => {
                    if self.number(value, &from)?.is_some_and(|r| r < 1.0) {
                        return Err(self.error(&from, "partial offload is not built: every optimizer shard lives on offload_optimizer.device"));
                    }
                }
                _ => return Err(self.unknown(&from)),
            }
        }
        Ok(())
    }

    pub(super) fn aio(&mut self, v: &Value) -> Result<(), ConfigError> {
        for (key, value) in self.object(v, "aio")? {
            let from = format!("aio.{key}");
            match key.as_str() {
                "block_size" => self.int(value, &from, "aio.block_size")?,
                "queue_depth" => self.int(value, &from, "aio.queue_depth")?,
                "thread_count" | "intra_op_parallelism" => {
                    self.note(&from, "strata's io_uring rings (aio.rings) each run on one thread")
                }
                "single_submit" | "overlap_events" => {
                    self.note(&from, "strata keeps aio.queue_depth requests in flight per ring and reaps them as they complete")
                }
                "use_gds" => {
                    if self.boolean(value, &from)? {
                        return Err(self.error(&from, "GPUDirect Storage is not built: NVMe reads land in pinned host memory"));
                    }
                }
                _ => return Err(self.unknown(&from)),
            }
        }
        Ok(())
    }

    pub(super) fn checkpointing(&mut self, v: &Value) -> Result<(), ConfigError> {
        self.set(
            "train.activation_checkpointing",
            toml::Value::Boolean(true),
            "activation_checkpointing",
        );
        for (key, value) in self.object(v, "activation_checkpointing")? {
            let from = format!("activation_checkpointing.{key}");
            match key.as_str() {
                "partition_activations" | "cpu_checkpointing" => {
                    if self.boolean(value, &from)? {
                        self.note(&from, "strata keeps each block's input on the device and recomputes the block in backward");
                    }
                }
                "contiguous_memory_optimization"
                | "number_checkpoints"
                | "synchronize_checkpoint_boundary"
                | "profile" => self.note(&from, "strata checkpoints every block"),
                _ => return Err(self.unknown(&from)),
            }
        }
        Ok(())
    }
}
