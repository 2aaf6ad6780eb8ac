//! `strata train model.toml --deepspeed ds_config.json`: the JSON DeepSpeed users already have,
//! mapped onto the TOML tree. Each key either sets a strata key, is accepted with one note saying
//! what strata does instead (keys that tune DeepSpeed's own machinery), or is an error naming it.
//! DeepSpeed counts some sizes in elements (`stage3_prefetch_bucket_size`,
//! `stage3_max_live_parameters`, `offload_param.buffer_size`): they become bytes at the compute
//! precision the JSON selects (2 bytes with bf16 or fp16 enabled, else 4).

use std::path::Path;

use serde_json::{Map, Value};

use super::ConfigError;

/// One strata key set from the JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting {
    /// The TOML key (`optim.lr`).
    pub key: &'static str,
    pub value: toml::Value,
    /// The JSON key it came from (`optimizer.params.lr`).
    pub from: String,
}

/// What a DeepSpeed config says, in strata's terms.
#[derive(Clone, Debug, Default)]
pub struct DeepSpeed {
    pub origin: String,
    pub settings: Vec<Setting>,
    /// One line per accepted key that strata does not use as DeepSpeed does.
    pub notes: Vec<String>,
}

/// Reads and maps `path`; `world` is the number of data-parallel ranks (for `train_batch_size`).
pub fn read(path: &Path, world: usize) -> Result<DeepSpeed, ConfigError> {
    let bytes =
        crate::inputs::read_bounded(path, super::CONFIG_FILE_BYTES_MAX, "a DeepSpeed config")?;
    let origin = path.display().to_string();
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::Syntax {
        origin: origin.clone(),
        message: format!(
            "not UTF-8 text (byte offset {})",
            e.utf8_error().valid_up_to()
        ),
    })?;
    parse(&text, &origin, world)
}

/// Maps the JSON `text` (named `origin` in errors).
pub fn parse(text: &str, origin: &str, world: usize) -> Result<DeepSpeed, ConfigError> {
    let root: Value = serde_json::from_str(text).map_err(|e| ConfigError::Syntax {
        origin: origin.to_string(),
        message: format!("not valid JSON: {e}"),
    })?;
    let mut m = Mapper {
        out: DeepSpeed {
            origin: origin.to_string(),
            ..DeepSpeed::default()
        },
        x_bytes: 4,
        lr: None,
    };
    let root = m.object(&root, "")?;
    // The compute precision first: element counts become bytes at its width.
    for name in ["bf16", "bfloat16", "fp16"] {
        if let Some(v) = root.get(name) {
            m.precision(name, v)?;
        }
    }
    if let Some(v) = root.get("optimizer") {
        m.optimizer(v)?;
    }
    let mut batch = Batch::default();
    for (key, v) in root {
        match key.as_str() {
            "bf16" | "bfloat16" | "fp16" | "optimizer" => {}
            "train_batch_size" => batch.total = m.count(v, key)?,
            "train_micro_batch_size_per_gpu" => batch.micro = m.count(v, key)?,
            "gradient_accumulation_steps" => batch.accum = m.count(v, key)?,
            "gradient_clipping" => m.float(v, key, "optim.grad_clip")?,
            "steps_per_print" => m.int(v, key, "train.log_every")?,
            "scheduler" => m.scheduler(v)?,
            "zero_optimization" => m.zero(v)?,
            "aio" => m.aio(v)?,
            "activation_checkpointing" => m.checkpointing(v)?,
            "tensorboard" => m.tensorboard(v)?,
            "wall_clock_breakdown" => m.note(key, "strata train --trace FILE writes a timeline with every queue's work"),
            "memory_breakdown" => m.note(key, "strata prints each rank's memory by purpose at the end of a run"),
            "zero_allow_untested_optimizer" | "zero_force_ds_cpu_optimizer" => {
                m.note(key, "strata has one optimizer, AdamW, on the device or the host")
            }
            "prescale_gradients" | "gradient_predivide_factor" => m.note(
                key,
                "strata sums gradients in fp32 across ranks and divides once by the number of micro-batches",
            ),
            "communication_data_type" | "data_types" => {
                m.note(key, "strata reduces and accumulates gradients in fp32")
            }
            "flops_profiler" => m.note(key, "strata-bench train reports TFLOP/s and MFU; strata train logs TFLOP/s per step"),
            "comms_logger" => m.note(key, "strata train --trace FILE shows communication on its own track"),
            "csv_monitor" | "wandb" | "comet" => m.note(
                key,
                "strata writes train.metrics_file (JSON lines) and train.tensorboard_dir",
            ),
            "checkpoint" => m.note(key, "strata writes its weights with train.export_to"),
            "dump_state" => m.note(key, "strata train --print-config prints the effective config"),
            other => return Err(m.unknown(other)),
        }
    }
    m.batch(batch, world)?;
    Ok(m.out)
}

#[derive(Default)]
struct Batch {
    total: Option<usize>,
    micro: Option<usize>,
    accum: Option<usize>,
}

struct Mapper {
    out: DeepSpeed,
    /// Bytes per compute element (2 with bf16/fp16 enabled).
    x_bytes: u64,
    /// optimizer.params.lr, for ratios of the scheduler.
    lr: Option<f64>,
}

/// A JSON value that asks DeepSpeed (or the Hugging Face Trainer) to pick.
fn is_auto(v: &Value) -> bool {
    v.as_str() == Some("auto")
}

impl Mapper {
    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            origin: self.out.origin.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn unknown(&self, key: &str) -> ConfigError {
        self.error(
            key,
            "not a DeepSpeed key strata knows (see the README's \"DeepSpeed configs\" table); remove it or use the TOML key",
        )
    }

    fn note(&mut self, key: &str, what: &str) {
        self.out
            .notes
            .push(format!("{key}: accepted, not used: {what}"));
    }

    fn set(&mut self, key: &'static str, value: toml::Value, from: &str) {
        self.out.settings.retain(|s| s.key != key);
        self.out.settings.push(Setting {
            key,
            value,
            from: from.to_string(),
        });
    }

    fn object<'a>(&self, v: &'a Value, key: &str) -> Result<&'a Map<String, Value>, ConfigError> {
        v.as_object().ok_or_else(|| {
            self.error(
                if key.is_empty() { "(top level)" } else { key },
                "must be a JSON object",
            )
        })
    }

    /// `"auto"`: strata keeps its own value (noted); otherwise `None`.
    fn auto(&mut self, v: &Value, from: &str, strata_key: &str) -> bool {
        if is_auto(v) {
            self.out.notes.push(format!(
                "{from}: \"auto\": strata keeps {strata_key} from the TOML (or its default)"
            ));
        }
        is_auto(v)
    }

    fn count(&mut self, v: &Value, from: &str) -> Result<Option<usize>, ConfigError> {
        if self.auto(v, from, "its value") {
            return Ok(None);
        }
        let n = v
            .as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                    .map(|f| f as u64)
            })
            .ok_or_else(|| self.error(from, format!("{v} must be a whole number")))?;
        usize::try_from(n)
            .map(Some)
            .map_err(|_| self.error(from, format!("{n} is too large")))
    }

    fn int(&mut self, v: &Value, from: &str, key: &'static str) -> Result<(), ConfigError> {
        if let Some(n) = self.count(v, from)? {
            self.set(key, toml::Value::Integer(n as i64), from);
        }
        Ok(())
    }

    fn number(&mut self, v: &Value, from: &str) -> Result<Option<f64>, ConfigError> {
        if self.auto(v, from, "its value") {
            return Ok(None);
        }
        v.as_f64()
            .map(Some)
            .ok_or_else(|| self.error(from, format!("{v} must be a number")))
    }

    fn float(&mut self, v: &Value, from: &str, key: &'static str) -> Result<(), ConfigError> {
        if let Some(f) = self.number(v, from)? {
            self.set(key, toml::Value::Float(f), from);
        }
        Ok(())
    }

    fn boolean(&self, v: &Value, from: &str) -> Result<bool, ConfigError> {
        v.as_bool()
            .ok_or_else(|| self.error(from, format!("{v} must be true or false")))
    }

    fn string<'a>(&self, v: &'a Value, from: &str) -> Result<&'a str, ConfigError> {
        v.as_str()
            .ok_or_else(|| self.error(from, format!("{v} must be a string")))
    }

    /// An element count as bytes of compute weights.
    fn elements_as_bytes(
        &mut self,
        v: &Value,
        from: &str,
        key: &'static str,
    ) -> Result<(), ConfigError> {
        if let Some(n) = self.count(v, from)? {
            let bytes = (n as u64).saturating_mul(self.x_bytes);
            self.set(
                key,
                toml::Value::Integer(i64::try_from(bytes).unwrap_or(i64::MAX)),
                from,
            );
        }
        Ok(())
    }

    fn precision(&mut self, name: &str, v: &Value) -> Result<(), ConfigError> {
        let section = self.object(v, name)?;
        let mut enabled = false;
        for (key, value) in section {
            let from = format!("{name}.{key}");
            match key.as_str() {
                "enabled" => enabled = !self.auto(value, &from, "train.precision") && self.boolean(value, &from)?,
                "auto_cast" | "loss_scale" | "initial_scale_power" | "loss_scale_window" | "hysteresis"
                | "consecutive_hysteresis" | "min_loss_scale" | "fp16_master_weights_and_grads"
                    if name == "fp16" =>
                {
                    self.note(&from, "strata's dynamic loss scaler has its own schedule (it halves on overflow and doubles after 1000 clean steps)")
                }
                "immediate_grad_update" | "check_grad_overflow" => self.note(&from, "strata keeps fp32 gradients"),
                _ => return Err(self.unknown(&from)),
            }
        }
        if enabled {
            let precision = if name == "fp16" { "fp16" } else { "bf16" };
            if let Some(other) = self
                .out
                .settings
                .iter()
                .find(|s| s.key == "train.precision")
            {
                return Err(self.error(
                    &format!("{name}.enabled"),
                    format!("{} is enabled too: enable one of bf16 and fp16", other.from),
                ));
            }
            self.set(
                "train.precision",
                toml::Value::String(precision.into()),
                &format!("{name}.enabled"),
            );
            self.x_bytes = 2;
        }
        Ok(())
    }

    fn optimizer(&mut self, v: &Value) -> Result<(), ConfigError> {
        let section = self.object(v, "optimizer")?;
        let kind = match section.get("type") {
            Some(t) => self.string(t, "optimizer.type")?.to_string(),
            None => return Err(self.error("optimizer.type", "is required (\"AdamW\" or \"Adam\")")),
        };
        let mut adam_w_mode = true;
        match kind.to_ascii_lowercase().as_str() {
            "adamw" | "adam" | "fusedadam" | "cpuadam" | "deepspeedcpuadam" => {}
            _ => {
                return Err(self.error(
                    "optimizer.type",
                    format!(
                        "\"{kind}\" is not built: strata trains with AdamW (\"AdamW\" or \"Adam\")"
                    ),
                ))
            }
        }
        for (key, value) in section {
            match key.as_str() {
                "type" => {}
                "params" => {
                    for (p, pv) in self.object(value, "optimizer.params")? {
                        let from = format!("optimizer.params.{p}");
                        match p.as_str() {
                            "lr" => {
                                self.lr = self.number(pv, &from)?;
                                self.float(pv, &from, "optim.lr")?;
                            }
                            "betas" => {
                                if self.auto(pv, &from, "optim.betas") {
                                    continue;
                                }
                                let betas: Vec<f64> = pv
                                    .as_array()
                                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                                    .filter(|b: &Vec<f64>| b.len() == 2)
                                    .ok_or_else(|| {
                                        self.error(&from, "must be two numbers, [beta1, beta2]")
                                    })?;
                                self.set(
                                    "optim.betas",
                                    toml::Value::Array(
                                        betas.into_iter().map(toml::Value::Float).collect(),
                                    ),
                                    &from,
                                );
                            }
                            "eps" => self.float(pv, &from, "optim.eps")?,
                            "weight_decay" => self.float(pv, &from, "optim.weight_decay")?,
                            "adam_w_mode" => adam_w_mode = self.boolean(pv, &from)?,
                            "bias_correction" if !self.boolean(pv, &from)? => {
                                return Err(self.error(
                                    &from,
                                    "false is not built: strata's AdamW corrects the moments' bias",
                                ))
                            }
                            "amsgrad" if self.boolean(pv, &from)? => {
                                return Err(self.error(
                                    &from,
                                    "true is not built: strata's AdamW has no AMSGrad variant",
                                ))
                            }
                            "bias_correction" | "amsgrad" => {}
                            "torch_adam" | "fp32_optimizer_states" | "set_grad_none" => {
                                self.note(&from, "strata runs its own fused AdamW (fp32 states)")
                            }
                            _ => return Err(self.unknown(&from)),
                        }
                    }
                }
                _ => return Err(self.unknown(&format!("optimizer.{key}"))),
            }
        }
        if kind.eq_ignore_ascii_case("adam") && !adam_w_mode {
            return Err(self.error(
                "optimizer.params.adam_w_mode",
                "false (L2-regularised Adam) is not built: strata applies decoupled weight decay (AdamW)",
            ));
        }
        Ok(())
    }

    fn scheduler(&mut self, v: &Value) -> Result<(), ConfigError> {
        let section = self.object(v, "scheduler")?;
        let kind = match section.get("type") {
            Some(t) => self.string(t, "scheduler.type")?.to_string(),
            None => return Err(self.error("scheduler.type", "is required")),
        };
        let (schedule, to_zero) = match kind.as_str() {
            "WarmupLR" => ("constant", false),
            "WarmupDecayLR" => ("linear", true),
            "WarmupCosineLR" => ("cosine", false),
            _ => {
                return Err(self.error(
                    "scheduler.type",
                    format!(
                        "\"{kind}\" is not built: use WarmupLR, WarmupDecayLR or WarmupCosineLR"
                    ),
                ))
            }
        };
        self.set(
            "optim.schedule",
            toml::Value::String(schedule.into()),
            "scheduler.type",
        );
        if to_zero {
            self.set("optim.min_lr", toml::Value::Float(0.0), "scheduler.type");
        }
        let empty = Map::new();
        let params = match section.get("params") {
            Some(p) => self.object(p, "scheduler.params")?,
            None => &empty,
        };
        if let Some(key) = section
            .keys()
            .find(|k| !matches!(k.as_str(), "type" | "params"))
        {
            return Err(self.unknown(&format!("scheduler.{key}")));
        }
        for (p, pv) in params {
            let from = format!("scheduler.params.{p}");
            match (kind.as_str(), p.as_str()) {
                (_, "warmup_num_steps") => self.int(pv, &from, "optim.warmup_steps")?,
                (_, "warmup_type") => {
                    if self.string(pv, &from)? != "linear" {
                        self.note(&from, "strata warms up linearly from lr/warmup_steps to lr");
                    }
                }
                ("WarmupLR" | "WarmupDecayLR", "warmup_max_lr") => {
                    self.float(pv, &from, "optim.lr")?
                }
                ("WarmupLR" | "WarmupDecayLR", "warmup_min_lr") => {
                    if self.number(pv, &from)?.is_some_and(|f| f != 0.0) {
                        self.note(&from, "strata's warmup starts at lr/warmup_steps");
                    }
                }
                ("WarmupDecayLR" | "WarmupCosineLR", "total_num_steps") => {
                    self.int(pv, &from, "train.steps")?
                }
                ("WarmupCosineLR", "warmup_min_ratio") => {
                    if self.number(pv, &from)?.is_some_and(|f| f != 0.0) {
                        self.note(&from, "strata's warmup starts at lr/warmup_steps");
                    }
                }
                ("WarmupCosineLR", "cos_min_ratio") => {
                    if let Some(ratio) = self.number(pv, &from)? {
                        let lr = self.lr.ok_or_else(|| {
                            self.error(&from, "needs optimizer.params.lr (the ratio is of the peak learning rate)")
                        })?;
                        self.set("optim.min_lr", toml::Value::Float(ratio * lr), &from);
                    }
                }
                ("WarmupLR" | "WarmupDecayLR", "last_batch_iteration") => {
                    self.note(&from, "strata starts its schedule at step 0")
                }
                _ => return Err(self.unknown(&from)),
            }
        }
        Ok(())
    }

    fn zero(&mut self, v: &Value) -> Result<(), ConfigError> {
        let section = self.object(v, "zero_optimization")?;
        // DeepSpeed's defaults for what the section leaves out: stage 0, nothing offloaded.
        self.set("zero.stage", toml::Value::Integer(0), "zero_optimization");
        for key in ["offload_param.device", "offload_optimizer.device"] {
            self.set(key, toml::Value::String("none".into()), "zero_optimization");
        }
        for (key, value) in section {
            let from = format!("zero_optimization.{key}");
            match key.as_str() {
                "stage" => self.int(value, &from, "zero.stage")?,
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
                        let max = super::offload::SUB_GROUP_SIZE_MAX;
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

    fn aio(&mut self, v: &Value) -> Result<(), ConfigError> {
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

    fn checkpointing(&mut self, v: &Value) -> Result<(), ConfigError> {
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

    fn tensorboard(&mut self, v: &Value) -> Result<(), ConfigError> {
        let (mut enabled, mut path, mut job) = (false, None, None);
        for (key, value) in self.object(v, "tensorboard")? {
            let from = format!("tensorboard.{key}");
            match key.as_str() {
                "enabled" => enabled = self.boolean(value, &from)?,
                "output_path" => path = Some(self.string(value, &from)?.to_string()),
                "job_name" => job = Some(self.string(value, &from)?.to_string()),
                _ => return Err(self.unknown(&from)),
            }
        }
        if enabled {
            let dir = Path::new(path.as_deref().unwrap_or("runs"))
                .join(job.as_deref().unwrap_or("strata"));
            self.set(
                "train.tensorboard_dir",
                toml::Value::String(dir.display().to_string()),
                "tensorboard.output_path",
            );
        }
        Ok(())
    }

    /// DeepSpeed's rule: train_batch_size = micro × accumulation × world; two of them give the third.
    fn batch(&mut self, b: Batch, world: usize) -> Result<(), ConfigError> {
        let world = world.max(1);
        let (micro, accum) = match (b.total, b.micro, b.accum) {
            (Some(t), Some(m), Some(a)) if t != m * a * world => {
                return Err(self.error(
                    "train_batch_size",
                    format!(
                        "{t} is not train_micro_batch_size_per_gpu ({m}) x gradient_accumulation_steps ({a}) x ranks ({world})"
                    ),
                ))
            }
            (Some(t), Some(m), None) => {
                if m == 0 || t % (m * world) != 0 {
                    return Err(self.error(
                        "train_batch_size",
                        format!("{t} is not a multiple of train_micro_batch_size_per_gpu ({m}) x ranks ({world})"),
                    ));
                }
                (Some(m), Some(t / (m * world)))
            }
            (Some(t), None, a) => {
                let a = a.unwrap_or(1);
                if t % (a * world) != 0 {
                    return Err(self.error(
                        "train_batch_size",
                        format!("{t} is not a multiple of gradient_accumulation_steps ({a}) x ranks ({world})"),
                    ));
                }
                (Some(t / (a * world)), Some(a))
            }
            (_, m, a) => (m, a),
        };
        if let Some(m) = micro {
            let from = if b.micro.is_some() {
                "train_micro_batch_size_per_gpu"
            } else {
                "train_batch_size"
            };
            self.set(
                "data.micro_batch_size",
                toml::Value::Integer(m as i64),
                from,
            );
        }
        if let Some(a) = accum {
            let from = if b.accum.is_some() {
                "gradient_accumulation_steps"
            } else {
                "train_batch_size"
            };
            self.set(
                "data.grad_accum_steps",
                toml::Value::Integer(a as i64),
                from,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ds_config.json");
        std::fs::write(&path, json).expect("write");
        Config::load_with_deepspeed(None, Some((&path, world)), &[])
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
            ("{\"stage\": 3,}", &["not valid JSON"]),
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
}
