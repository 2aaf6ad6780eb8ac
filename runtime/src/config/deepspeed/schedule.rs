//! The JSON's training settings: `bf16` / `fp16` (the compute precision), `optimizer` (AdamW and its
//! parameters) and `scheduler` (DeepSpeed's WarmupLR, WarmupDecayLR and WarmupCosineLR).
//!
//! DeepSpeed's schedulers, as `deepspeed/runtime/lr_schedules.py` defines them: each warms up from
//! `warmup_min_lr` (a ratio `warmup_min_ratio` of the rate for WarmupCosineLR) to the peak over
//! `warmup_num_steps` steps, by default on a log curve (`warmup_type = "log"`); WarmupLR then holds the
//! peak, WarmupDecayLR decays linearly to `warmup_min_lr` at `total_num_steps`, WarmupCosineLR along a
//! cosine to `cos_min_ratio` × the peak (default 0.0001). strata warms up linearly from lr/warmup_steps
//! (a note says so where the JSON's warmup differs) and takes the ends of the decays as DeepSpeed does,
//! their defaults included.

use serde_json::{Map, Value};

use super::{ConfigError, Mapper, SettingValue};

/// DeepSpeed's WarmupCosineLR `cos_min_ratio` when the JSON leaves it out.
const COS_MIN_RATIO_DEFAULT: f64 = 0.0001;

impl Mapper {
    pub(super) fn precision(&mut self, name: &str, v: &Value) -> Result<(), ConfigError> {
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

    pub(super) fn optimizer(&mut self, v: &Value) -> Result<(), ConfigError> {
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

    pub(super) fn scheduler(&mut self, v: &Value) -> Result<(), ConfigError> {
        let section = self.object(v, "scheduler")?;
        let kind = match section.get("type") {
            Some(t) => self.string(t, "scheduler.type")?.to_string(),
            None => return Err(self.error("scheduler.type", "is required")),
        };
        let schedule = match kind.as_str() {
            "WarmupLR" => "constant",
            "WarmupDecayLR" => "linear",
            "WarmupCosineLR" => "cosine",
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
        if let Some(key) = section
            .keys()
            .find(|k| !matches!(k.as_str(), "type" | "params"))
        {
            return Err(self.unknown(&format!("scheduler.{key}")));
        }
        let empty = Map::new();
        let params = match section.get("params") {
            Some(p) => self.object(p, "scheduler.params")?,
            None => &empty,
        };
        // The end of a decay, as DeepSpeed defines it when the JSON leaves it out.
        match kind.as_str() {
            "WarmupDecayLR" => self.put(
                "optim.min_lr",
                SettingValue::Toml(toml::Value::Float(0.0)),
                "scheduler.params.warmup_min_lr",
                true,
            ),
            "WarmupCosineLR" => self.put(
                "optim.min_lr",
                SettingValue::FractionOfLr(COS_MIN_RATIO_DEFAULT),
                "scheduler.params.cos_min_ratio",
                true,
            ),
            _ => {}
        }
        for (p, pv) in params {
            let from = format!("scheduler.params.{p}");
            match (kind.as_str(), p.as_str()) {
                (_, "warmup_num_steps") => self.int(pv, &from, "optim.warmup_steps")?,
                (_, "warmup_type") => {
                    if !self.auto(pv, &from, "its linear warmup")
                        && self.string(pv, &from)? != "linear"
                    {
                        self.note(&from, "strata warms up linearly from lr/warmup_steps to lr");
                    }
                }
                ("WarmupLR" | "WarmupDecayLR", "warmup_max_lr") => {
                    self.float(pv, &from, "optim.lr")?
                }
                ("WarmupLR", "warmup_min_lr") => {
                    if self.number(pv, &from)?.is_some_and(|f| f != 0.0) {
                        self.note(&from, "strata's warmup starts at lr/warmup_steps");
                    }
                }
                ("WarmupDecayLR", "warmup_min_lr") => {
                    if let Some(f) = self.number(pv, &from)? {
                        if f != 0.0 {
                            self.note(&from, "strata's warmup starts at lr/warmup_steps (the decay ends at warmup_min_lr, as DeepSpeed's)");
                        }
                        self.set("optim.min_lr", toml::Value::Float(f), &from);
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
                        self.put(
                            "optim.min_lr",
                            SettingValue::FractionOfLr(ratio),
                            &from,
                            false,
                        );
                    }
                }
                ("WarmupLR" | "WarmupDecayLR", "last_batch_iteration") => {
                    self.note(&from, "strata starts its schedule at step 0")
                }
                _ => return Err(self.unknown(&from)),
            }
        }
        // DeepSpeed warms up on a log curve unless the JSON says "linear".
        if !params.contains_key("warmup_type") {
            self.out.notes.push(
                "scheduler.params.warmup_type: not given, so DeepSpeed would warm up on a log curve; \
                 strata warms up linearly from lr/warmup_steps to lr"
                    .into(),
            );
        }
        if !params.contains_key("warmup_num_steps") {
            self.out.notes.push(
                "scheduler.params.warmup_num_steps: not given (DeepSpeed's default is 1000 steps); \
                 strata keeps optim.warmup_steps from the TOML (or its default)"
                    .into(),
            );
        }
        Ok(())
    }
}
