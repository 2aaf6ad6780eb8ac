//! `strata train model.toml --deepspeed ds_config.json`: the JSON DeepSpeed users already have,
//! mapped onto the TOML tree. Each key either sets a strata key, is accepted with one note saying
//! what strata does instead (keys that tune DeepSpeed's own machinery), or is an error naming it.
//!
//! The JSON is applied over the TOML: what it leaves out, or gives as `"auto"`, keeps the TOML's value
//! (or strata's default). The exceptions are the ends of DeepSpeed's decaying schedules, which its
//! scheduler type defines (see `schedule.rs`); where such a default replaces the TOML's value, a note says so.
//! DeepSpeed counts some sizes in elements (`stage3_prefetch_bucket_size`, `stage3_max_live_parameters`,
//! `offload_param.buffer_size`): they become bytes at the compute precision the JSON selects (2 bytes
//! with bf16 or fp16 enabled, else 4).
//!
//! - `schedule.rs`: `bf16` / `fp16`, `optimizer`, `scheduler`.
//! - `zero.rs`: `zero_optimization` (stages, offload), `aio`, `activation_checkpointing`.

mod schedule;
mod zero;

use std::path::Path;

use serde_json::{Map, Value};

use super::ConfigError;

/// What a setting takes from the JSON.
#[derive(Clone, Debug, PartialEq)]
pub enum SettingValue {
    /// This TOML value.
    Toml(toml::Value),
    /// This fraction of the learning rate (`optim.lr` after the JSON is applied over the TOML).
    FractionOfLr(f64),
}

/// One strata key set from the JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting {
    /// The TOML key (`optim.lr`).
    pub key: &'static str,
    pub value: SettingValue,
    /// The JSON key it came from (`optimizer.params.lr`).
    pub from: String,
    /// The JSON does not write the value: it is DeepSpeed's default for what the JSON does write (the
    /// end of a decaying schedule). A note says so where it replaces the TOML's value.
    pub assumed: bool,
}

/// What a DeepSpeed config says, in strata's terms.
#[derive(Clone, Debug, Default)]
pub struct DeepSpeed {
    pub origin: String,
    pub settings: Vec<Setting>,
    /// One line per accepted key that strata does not use as DeepSpeed does.
    pub notes: Vec<String>,
}

/// The README's section that lists the JSON keys strata reads (an unknown key's error points there).
pub const README_TABLE: &str = "DeepSpeed JSON keys";

/// The largest integer a config holds (TOML's integers are i64).
const INTEGER_MAX: u64 = i64::MAX as u64;

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

impl DeepSpeed {
    /// Sets every key the JSON says in `table` (the TOML file's tree); returns a note for each value the
    /// JSON does not write (DeepSpeed's default) that replaced a different value of the TOML's.
    pub fn apply(&self, table: &mut toml::Table) -> Vec<String> {
        let mut notes = Vec::new();
        // Fractions of the learning rate last: of the learning rate the JSON and the TOML give.
        let (fixed, fractions): (Vec<&Setting>, Vec<&Setting>) = self
            .settings
            .iter()
            .partition(|s| matches!(s.value, SettingValue::Toml(_)));
        for s in fixed.into_iter().chain(fractions) {
            let value = match &s.value {
                SettingValue::Toml(v) => v.clone(),
                SettingValue::FractionOfLr(f) => {
                    let lr = super::overrides::get_key(table, "optim.lr")
                        .and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
                        .unwrap_or(f64::from(super::OptimConfig::default().lr));
                    toml::Value::Float(f * lr)
                }
            };
            let old = super::overrides::get_key(table, s.key).cloned();
            if s.assumed && old.as_ref().is_some_and(|old| *old != value) {
                notes.push(format!(
                    "{}: as in DeepSpeed, {} = {value} (the TOML had {})",
                    s.from,
                    s.key,
                    old.map(|v| v.to_string()).unwrap_or_default()
                ));
            }
            super::overrides::set_key(table, s.key, value);
        }
        notes
    }

    /// The JSON key that set the strata `key`, if the JSON set it.
    pub fn json_key(&self, key: &str) -> Option<&str> {
        self.settings
            .iter()
            .rev()
            .find(|s| s.key == key)
            .map(|s| s.from.as_str())
    }

    /// `err`, which the JSON caused (the TOML alone is valid), named by its JSON key: the one that set the
    /// key the error is about; else one that set a key the message names (a rule across keys: the TOML's
    /// key is named in the message); else the DeepSpeed key of the same name, which the JSON left out
    /// (`zero_optimization.offload_param.nvme_path`).
    pub(super) fn blame(&self, err: ConfigError) -> ConfigError {
        let (key, message) = match err {
            ConfigError::Key { key, message, .. } => (key, message),
            ConfigError::Invalid { key, message } => (key.to_string(), message),
            other => return other,
        };
        let named =
            |json_key: String, strata_key: String, message: String| ConfigError::DeepSpeed {
                origin: self.origin.clone(),
                json_key,
                key: strata_key,
                message,
            };
        if let Some(json_key) = self.json_key(&key) {
            return named(json_key.to_string(), key, message);
        }
        let mentioned = self.settings.iter().rev().find(|s| message.contains(s.key));
        if let Some(s) = mentioned {
            let message = format!("config key `{key}`: {message}");
            return named(s.from.clone(), s.key.to_string(), message);
        }
        match zero::json_name(&key) {
            Some(json_key) => named(json_key, key, message),
            None => ConfigError::Key {
                origin: self.origin.clone(),
                key,
                message,
            },
        }
    }
}

#[derive(Default)]
struct Batch {
    total: Option<u64>,
    micro: Option<u64>,
    accum: Option<u64>,
}

struct Mapper {
    out: DeepSpeed,
    /// Bytes per compute element (2 with bf16/fp16 enabled).
    x_bytes: u64,
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
            format!(
                "not a DeepSpeed key strata knows (the README's table \"{README_TABLE}\" lists them); remove it or set the TOML key"
            ),
        )
    }

    fn note(&mut self, key: &str, what: &str) {
        self.out
            .notes
            .push(format!("{key}: accepted, not used: {what}"));
    }

    fn put(&mut self, key: &'static str, value: SettingValue, from: &str, assumed: bool) {
        self.out.settings.retain(|s| s.key != key);
        self.out.settings.push(Setting {
            key,
            value,
            from: from.to_string(),
            assumed,
        });
    }

    fn set(&mut self, key: &'static str, value: toml::Value, from: &str) {
        self.put(key, SettingValue::Toml(value), from, false);
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

    /// A whole number from 0 to the largest integer a config holds; `None` for `"auto"`.
    fn count(&mut self, v: &Value, from: &str) -> Result<Option<u64>, ConfigError> {
        if self.auto(v, from, "its value") {
            return Ok(None);
        }
        let whole = v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| {
                    if f > INTEGER_MAX as f64 {
                        u64::MAX
                    } else {
                        f as u64
                    }
                })
        });
        match whole {
            Some(n) if n <= INTEGER_MAX => Ok(Some(n)),
            Some(_) => Err(self.error(
                from,
                format!("{v} is beyond the largest integer a config holds ({INTEGER_MAX})"),
            )),
            None => Err(self.error(from, format!("{v} must be a whole number, 0 or more"))),
        }
    }

    fn int(&mut self, v: &Value, from: &str, key: &'static str) -> Result<(), ConfigError> {
        if let Some(n) = self.count(v, from)? {
            // count() keeps n within i64.
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
            let bytes = n
                .checked_mul(self.x_bytes)
                .filter(|b| *b <= INTEGER_MAX)
                .ok_or_else(|| {
                    self.error(
                        from,
                        format!(
                            "{n} elements of {} bytes are beyond the largest size a config holds ({INTEGER_MAX} bytes)",
                            self.x_bytes
                        ),
                    )
                })?;
            self.set(key, toml::Value::Integer(bytes as i64), from);
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
        for (n, key) in [
            (b.total, "train_batch_size"),
            (b.micro, "train_micro_batch_size_per_gpu"),
            (b.accum, "gradient_accumulation_steps"),
        ] {
            if n == Some(0) {
                return Err(self.error(key, "must be at least 1"));
            }
        }
        let world = world.max(1) as u64;
        // Products beyond u64 cannot equal a count that fits one.
        let times = |a: u64, b: u64| a.saturating_mul(b);
        let (micro, accum) = match (b.total, b.micro, b.accum) {
            (Some(t), Some(m), Some(a)) if t != times(times(m, a), world) => {
                return Err(self.error(
                    "train_batch_size",
                    format!(
                        "{t} is not train_micro_batch_size_per_gpu ({m}) x gradient_accumulation_steps ({a}) x ranks ({world})"
                    ),
                ))
            }
            (Some(t), Some(m), None) => {
                if t % times(m, world) != 0 {
                    return Err(self.error(
                        "train_batch_size",
                        format!("{t} is not a multiple of train_micro_batch_size_per_gpu ({m}) x ranks ({world})"),
                    ));
                }
                (Some(m), Some(t / times(m, world)))
            }
            (Some(t), None, a) => {
                let a = a.unwrap_or(1);
                if t % times(a, world) != 0 {
                    return Err(self.error(
                        "train_batch_size",
                        format!("{t} is not a multiple of gradient_accumulation_steps ({a}) x ranks ({world})"),
                    ));
                }
                (Some(t / times(a, world)), Some(a))
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
mod tests;
