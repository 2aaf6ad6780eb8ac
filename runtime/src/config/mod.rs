//! The configuration tree: one serde structure read from TOML, `--set` overrides, and `validate()`.
//!
//! Every section rejects unknown keys; every field has a default (`impl Default`), so a config file names
//! only what differs from the embedded default (a tiny GPT on the synthetic data set, see `configs/tiny.toml`).

pub mod bounds;
pub mod deepspeed;
pub mod hf_dir;
mod model;
mod offload;
mod overrides;
mod size;

pub use model::{Arch, ModelConfig, RopeKind, RopeScaling};
pub use offload::{
    AioBackend, AioSection, MomentsDtype, NvmePaths, OffloadDevice, OffloadOptimizerConfig,
    OffloadParamConfig, TEMP_NVME_PATH,
};
pub use overrides::{override_key, Override};
pub use size::{ByteSize, SizeOrAuto};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How attention keeps what its backward pass needs (`train.attention`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AttentionMode {
    /// FlashAttention-2: scores are computed tile by tile and never stored; the forward keeps
    /// one logsumexp per query row and the backward recomputes the scores.
    #[default]
    Fused,
    /// llm.c's: the (B,NH,T,T) probabilities are stored by the forward and read by the backward.
    Materialized,
}

impl AttentionMode {
    pub fn name(self) -> &'static str {
        match self {
            AttentionMode::Fused => "fused",
            AttentionMode::Materialized => "materialized",
        }
    }
}

/// A configuration error; the message names the key (`optim.lr`) or the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not TOML (or JSON, for `--deepspeed`); the message says which and where.
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Key {
        origin: String,
        key: String,
        message: String,
    },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("{origin}: `{json_key}` (strata's {key}): {message}")]
    DeepSpeed {
        origin: String,
        json_key: String,
        key: String,
        message: String,
    },
    /// Not a `source`: the message holds it, so a chain printed with `{:#}` says it once.
    #[error("cannot read config: {0}")]
    Input(crate::inputs::InputError),
}

impl From<crate::inputs::InputError> for ConfigError {
    fn from(e: crate::inputs::InputError) -> Self {
        ConfigError::Input(e)
    }
}

/// `configs/tiny.toml`, the config of `strata train` without CONFIG.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../configs/tiny.toml");

fn embedded_default_table() -> toml::Table {
    // Checked by a test: the file parses and validates.
    toml::from_str(EMBEDDED_DEFAULT).unwrap_or_default()
}

/// Reads a TOML config file (bounded in size) into its tree.
fn read_toml_file(p: &Path) -> Result<toml::Table, ConfigError> {
    let origin = p.display().to_string();
    let bytes = crate::inputs::read_bounded(p, CONFIG_FILE_BYTES_MAX, "a config file")?;
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::Syntax {
        origin: origin.clone(),
        message: format!(
            "not UTF-8 text (byte offset {})",
            e.utf8_error().valid_up_to()
        ),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Syntax {
        origin,
        message: format!("not valid TOML: {e}"),
    })
}

impl ConfigError {
    /// A rule's error (`validate`) named by the input that broke it.
    fn named_by(self, origin: &str) -> ConfigError {
        match self {
            ConfigError::Invalid { key, message } => ConfigError::Key {
                origin: origin.to_string(),
                key: key.to_string(),
                message,
            },
            other => other,
        }
    }
}

/// The largest config file read (a config is a few hundred bytes; this bounds a mistaken path).
pub const CONFIG_FILE_BYTES_MAX: u64 = 1 << 20;

pub(crate) fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub dist: DistConfig,
    pub zero: ZeroConfig,
    pub offload_param: OffloadParamConfig,
    pub offload_optimizer: OffloadOptimizerConfig,
    pub aio: AioSection,
    /// The file this config was read from (None: the embedded default, or built in code). Not part of the
    /// TOML tree: it is an input that no output may overwrite.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// The DeepSpeed JSON applied over the file (`--deepspeed`), and its notes: the keys it
    /// accepted without using them as DeepSpeed does.
    #[serde(skip)]
    pub deepspeed: Option<(PathBuf, Vec<String>)>,
    /// Each strata key the DeepSpeed JSON set and the JSON key that set it, so that an error found
    /// after loading (by the engine) names the JSON key ([`Config::blame_deepspeed`]).
    #[serde(skip)]
    pub deepspeed_keys: Vec<(String, String)>,
    /// Each `--set` that a later `--set` of the same key replaced with another value, and that later
    /// one (the last is in effect), for a line at the start of the run.
    #[serde(skip)]
    pub replaced_sets: Vec<(String, String)>,
}

/// `[zero]`: how states are partitioned across the data-parallel ranks (DeepSpeed's ZeRO stages).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZeroConfig {
    /// 0: plain data parallelism (every rank holds every state); 1: optimizer states (fp32
    /// master weights, Adam m and v) partitioned; 2: gradients too; 3: parameters too.
    pub stage: u8,
    /// Units with fewer elements stay whole on every rank at stage 3 (DeepSpeed's
    /// stage3_param_persistence_threshold).
    pub param_persistence_threshold: usize,
    /// Bytes of parameters gathered ahead of the unit computing now (DeepSpeed's
    /// stage3_prefetch_bucket_size); the next unit is always gathered ahead unless it is 0.
    pub prefetch_bytes_max: ByteSize,
    /// Bytes of gathered parameters alive at once, the current units included (DeepSpeed's
    /// stage3_max_live_parameters).
    pub live_params_bytes_max: ByteSize,
}

impl Default for ZeroConfig {
    fn default() -> Self {
        ZeroConfig {
            stage: 0,
            param_persistence_threshold: 100_000,
            prefetch_bytes_max: ByteSize::mib(64),
            live_params_bytes_max: ByteSize::gib(1),
        }
    }
}

/// `[dist]`: how ranks started by `strata launch` (or torchrun, srun, mpirun) talk to each other.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// `auto` (shm when all ranks share a host, else tcp; nccl on GPUs), `shm`, `tcp`, `nccl`.
    pub backend: strata_collectives::Backend,
    /// Bound on every wait for a peer; a rank that does not answer in time is named in the error.
    pub timeout_s: u64,
    /// Per-rank staging slot of the shm backend.
    pub shm_slot_bytes: ByteSize,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            backend: strata_collectives::Backend::Auto,
            timeout_s: 300,
            shm_slot_bytes: ByteSize::mib(4),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A token file in the llm.c format, or `"synthetic"` for the built-in learnable data set.
    pub train: String,
    pub micro_batch_size: usize,
    pub grad_accum_steps: usize,
    pub seed: u64,
    /// false: read the file in order, as llm.c does; true: windows at random offsets drawn from `seed`.
    pub shuffle: bool,
    /// Held-out data for the validation loss: a token file, or `"synthetic"` (a stream of the synthetic set's
    /// Markov chain from another seed). Unset: no validation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val: Option<String>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: "synthetic".to_string(),
            micro_batch_size: 8,
            grad_accum_steps: 1,
            seed: 1337,
            shuffle: false,
            val: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    /// Linear decay from `lr` to `min_lr` (DeepSpeed's WarmupDecayLR).
    Linear,
    Constant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    #[serde(serialize_with = "short_f32::one")]
    pub lr: f32,
    #[serde(serialize_with = "short_f32::pair")]
    pub betas: [f32; 2],
    #[serde(serialize_with = "short_f32::one")]
    pub eps: f32,
    #[serde(serialize_with = "short_f32::one")]
    pub weight_decay: f32,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    #[serde(serialize_with = "short_f32::one")]
    pub min_lr: f32,
    /// Global-norm gradient clipping threshold; 0 turns clipping off.
    #[serde(serialize_with = "short_f32::one")]
    pub grad_clip: f32,
}

/// f32 settings print as written (`lr = 0.003`, not `0.003000000026077032`): TOML has only f64,
/// so each value is widened through its shortest decimal form, which reads back as the same f32.
mod short_f32 {
    use serde::ser::{SerializeTuple, Serializer};

    fn widen(v: f32) -> f64 {
        format!("{v}").parse().unwrap_or(f64::from(v))
    }

    pub fn one<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(widen(*v))
    }

    pub fn pair<S: Serializer>(v: &[f32; 2], s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(2)?;
        for x in v {
            t.serialize_element(&widen(*x))?;
        }
        t.end()
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 3e-3,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.1,
            warmup_steps: 20,
            schedule: Schedule::Cosine,
            min_lr: 3e-4,
            grad_clip: 1.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on a GPU, fp32 on the CPU.
    Auto,
    Fp32,
    Bf16,
    Fp16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub steps: usize,
    pub log_every: usize,
    pub precision: Precision,
    pub device: DeviceKind,
    /// Keep only each unit's input in the forward pass and recompute the unit in the backward pass.
    pub activation_checkpointing: bool,
    /// `"fused"`: flash attention, no (T,T) scores in memory; `"materialized"`: the scores are
    /// stored by the forward pass and read by the backward pass.
    pub attention: AttentionMode,
    /// CPU threads for compute per rank; 0 shares this host's cores among its local ranks.
    pub threads: usize,
    /// Device memory the engine may use: `"auto"` (no limit on the CPU, the card's free memory
    /// on a GPU) or a size. The CPU backend enforces it exactly as a GPU's memory.
    pub device_memory: SizeOrAuto,
    /// With `data.val` set: the validation loss every this many steps and after the last; 0: after the last only.
    pub eval_every: usize,
    /// Micro-batches of `data.val` per validation loss, over all ranks together.
    pub eval_batches: usize,
    /// One JSON object per step is appended here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_file: Option<PathBuf>,
    /// Write the trained weights here at the end (safetensors, Hugging Face GPT-2 names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_to: Option<PathBuf>,
    /// Rank 0 writes TensorBoard scalars (loss, lr, grad norm, tokens/s, …) into an event file here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensorboard_dir: Option<PathBuf>,
    /// Sharded checkpoints go here (`step-NNNNNNNN/`): every `checkpoint_every` steps, at the
    /// end, and when SIGINT or SIGTERM stops the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Steps between checkpoints (0: only at the end and on a signal).
    pub checkpoint_every: usize,
    /// Checkpoints kept (older ones are removed after a save); 0 keeps all.
    pub keep_last: usize,
    /// Continue from a checkpoint: `"latest"` (the newest under `checkpoint_dir`) or its directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 300,
            log_every: 25,
            precision: Precision::Auto,
            device: DeviceKind::Auto,
            activation_checkpointing: true,
            attention: AttentionMode::Fused,
            threads: 0,
            device_memory: SizeOrAuto::Auto,
            eval_every: 100,
            eval_batches: 20,
            metrics_file: None,
            checkpoint_dir: None,
            checkpoint_every: 0,
            keep_last: 2,
            resume: None,
            export_to: None,
            tensorboard_dir: None,
        }
    }
}

impl Config {
    /// Reads a TOML file (or the embedded default when `path` is `None`), applies `key.path=value` overrides,
    /// and validates the result.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        Config::load_with_deepspeed(path, None, overrides)
    }

    /// [`Config::load`] with a DeepSpeed JSON config (`--deepspeed`, for `world` ranks) applied
    /// over the file, before the overrides.
    ///
    /// An error names the input it is about: the file (or the embedded default), then the JSON, then each
    /// `--set` in turn is checked as it is applied, so a bad value is reported even where a later `--set`
    /// replaces it; a rule across keys (`validate`) names the `--set`, the JSON key or the file that broke it.
    pub fn load_with_deepspeed(
        path: Option<&Path>,
        deepspeed: Option<(&Path, usize)>,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let (origin, mut table) = match path {
            None => ("embedded default".to_string(), embedded_default_table()),
            Some(p) => (p.display().to_string(), read_toml_file(p)?),
        };
        let file_config = Config::from_table(table.clone(), &origin)?;
        let ds = deepspeed
            .map(|(p, world)| deepspeed::read(p, world).map(|ds| (p, ds)))
            .transpose()?;
        let mut changed_by_ds = Vec::new();
        if let Some((_, ds)) = &ds {
            changed_by_ds = ds.apply(&mut table);
            Config::from_table(table.clone(), &origin).map_err(|e| ds.blame(e))?;
        }
        let before_sets = table.clone();
        let sets = overrides
            .iter()
            .map(|arg| Override::parse(arg))
            .collect::<Result<Vec<_>, _>>()?;
        for set in &sets {
            set.apply(&mut table)?;
            Config::from_table(table.clone(), &origin).map_err(|e| set.blame(e))?;
        }
        let user_keys = hf_dir::keys_set(&table, path.is_some(), &origin, &sets);
        let mut config = Config::from_table(table, &origin)?;
        hf_dir::resolve(&mut config.model, &user_keys)?;
        if let Err(err) = config.validate() {
            let err = match overrides::blame_override(err, &sets) {
                Ok(named) => named,
                Err(err) => {
                    let file_ok = file_config.validate().is_ok();
                    match &ds {
                        Some((_, ds))
                            if file_ok
                                && Config::from_table(before_sets, &origin)
                                    .is_ok_and(|c| c.validate().is_err()) =>
                        {
                            ds.blame(err)
                        }
                        _ if !file_ok && path.is_some() => err.named_by(&origin),
                        _ => err,
                    }
                }
            };
            return Err(err);
        }
        config.source = path.map(Path::to_path_buf);
        config.replaced_sets = overrides::replaced(&sets);
        if let Some((p, ds)) = ds {
            config.deepspeed_keys = ds
                .settings
                .iter()
                .map(|s| (s.key.to_string(), s.from.clone()))
                .collect();
            let notes = ds.notes.into_iter().chain(changed_by_ds).collect();
            config.deepspeed = Some((p.to_path_buf(), notes));
        }
        Ok(config)
    }

    /// An error about `key` found after loading (by the engine: `bf16` on a machine without a GPU), named by
    /// the DeepSpeed JSON key that set it; `None` when the JSON did not set it.
    pub fn blame_deepspeed(&self, key: &str, message: &str) -> Option<ConfigError> {
        let (path, _) = self.deepspeed.as_ref()?;
        let (_, json_key) = self.deepspeed_keys.iter().rev().find(|(k, _)| k == key)?;
        Some(ConfigError::DeepSpeed {
            origin: path.display().to_string(),
            json_key: json_key.clone(),
            key: key.to_string(),
            message: message.to_string(),
        })
    }

    /// Parses a TOML string (used by tests and the library API).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: "config".into(),
            message: format!("not valid TOML: {e}"),
        })?;
        let user_keys = hf_dir::keys_set(&table, true, "config", &[]);
        let mut config = Config::from_table(table, "config")?;
        hf_dir::resolve(&mut config.model, &user_keys)?;
        config.validate()?;
        Ok(config)
    }

    fn from_table(table: toml::Table, origin: &str) -> Result<Config, ConfigError> {
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().to_string();
            // toml ends its message with "\nin `key`": the key is named once, before the message.
            let message = match message.find("\nin `") {
                Some(end) => message[..end].to_string(),
                None => message.trim_end().to_string(),
            };
            ConfigError::Key {
                origin: origin.to_string(),
                key,
                message,
            }
        })
    }

    /// `[model]` filled from `model.init_from` when it names a Hugging Face model directory (see
    /// [`hf_dir`]), for a config built in code: each key that differs from the library's default
    /// counts as set by the user. A config loaded from TOML is filled when loaded.
    pub fn resolve_model_dir(&mut self) -> Result<(), ConfigError> {
        let default = toml::Table::try_from(ModelConfig::default()).unwrap_or_default();
        let ours = toml::Table::try_from(&self.model).unwrap_or_default();
        let user: Vec<hf_dir::SetKey> = ours
            .iter()
            .filter(|(k, v)| default.get(k.as_str()) != Some(v))
            .map(|(k, _)| hf_dir::SetKey {
                key: format!("model.{k}"),
                origin: "config".into(),
            })
            .collect();
        hf_dir::resolve(&mut self.model, &user)
    }

    /// The effective configuration as TOML, for the start-of-run log.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("<config not printable: {e}>"))
    }

    /// Cross-field rules; every message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        for (key, value) in [
            ("data.micro_batch_size", self.data.micro_batch_size),
            ("data.grad_accum_steps", self.data.grad_accum_steps),
            ("train.steps", self.train.steps),
            ("train.log_every", self.train.log_every),
            ("train.eval_batches", self.train.eval_batches),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        bounds::check_counts(self)?;
        let o = &self.optim;
        if !o.lr.is_finite() || o.lr <= 0.0 {
            return Err(invalid(
                "optim.lr",
                format!("{} must be a positive number", o.lr),
            ));
        }
        if !(0.0..=o.lr).contains(&o.min_lr) {
            return Err(invalid(
                "optim.min_lr",
                format!("{} must lie in [0, optim.lr = {}]", o.min_lr, o.lr),
            ));
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(invalid(
                "optim.betas",
                format!("{:?}: each must lie in [0, 1)", o.betas),
            ));
        }
        if !o.eps.is_finite() || o.eps <= 0.0 {
            return Err(invalid("optim.eps", "must be positive"));
        }
        if !o.weight_decay.is_finite() || o.weight_decay < 0.0 {
            return Err(invalid("optim.weight_decay", "must be zero or positive"));
        }
        if !o.grad_clip.is_finite() || o.grad_clip < 0.0 {
            return Err(invalid("optim.grad_clip", "must be zero (off) or positive"));
        }
        let gpu_only = !matches!(self.train.precision, Precision::Auto | Precision::Fp32);
        if self.train.device == DeviceKind::Cpu && gpu_only {
            return Err(invalid(
                "train.precision",
                format!(
                    "{:?}: the CPU backend computes in fp32 only; set train.precision = \"fp32\" or \"auto\"",
                    self.train.precision
                ),
            ));
        }
        if self.train.resume.as_deref() == Some("latest") && self.train.checkpoint_dir.is_none() {
            return Err(invalid(
                "train.resume",
                "\"latest\" looks in train.checkpoint_dir, which is not set (or give the checkpoint's directory)",
            ));
        }
        if self.dist.timeout_s == 0 {
            return Err(invalid("dist.timeout_s", "must be at least 1 (seconds)"));
        }
        if self.zero.stage > 3 {
            return Err(invalid(
                "zero.stage",
                format!("{} is not a ZeRO stage: use 0, 1, 2 or 3", self.zero.stage),
            ));
        }
        offload::validate(
            self.zero.stage,
            &self.offload_param,
            &self.offload_optimizer,
            &self.aio,
        )?;
        if self.data.train.trim().is_empty() {
            return Err(invalid(
                "data.train",
                "must be \"synthetic\" or the path of a token file",
            ));
        }
        if self
            .data
            .val
            .as_deref()
            .is_some_and(|v| v.trim().is_empty())
        {
            return Err(invalid(
                "data.val",
                "must be \"synthetic\" or the path of a token file (leave it out for no validation)",
            ));
        }
        bounds::check_memory(self, bounds::memory_total_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_configs_tiny_and_lists_every_key() {
        let parsed = Config::from_toml_str(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(Config::load(None, &[]).unwrap(), parsed);
        // It differs from the library's default only in ZeRO-Infinity's keys.
        let library = Config::default();
        let mut expected = library.clone();
        expected.zero.stage = 3;
        expected.offload_param.device = OffloadDevice::Nvme;
        expected.offload_optimizer.device = OffloadDevice::Nvme;
        let tmp = Some(NvmePaths::One(TEMP_NVME_PATH.into()));
        expected.offload_param.nvme_path = tmp.clone();
        expected.offload_optimizer.nvme_path = tmp;
        assert_eq!(parsed, expected);
        // Every key of the library's config appears in the file (set, or commented out).
        let table: toml::Table = toml::from_str(&library.to_toml()).unwrap();
        for (section, keys) in &table {
            let toml::Value::Table(keys) = keys else {
                continue;
            };
            assert!(
                EMBEDDED_DEFAULT.contains(&format!("[{section}]")),
                "[{section}]"
            );
            for key in keys.keys() {
                assert!(
                    EMBEDDED_DEFAULT.contains(&format!("\n{key} ="))
                        || EMBEDDED_DEFAULT.contains(&format!("# {key} =")),
                    "{section}.{key} is not in configs/tiny.toml"
                );
            }
        }
    }

    #[test]
    fn printed_config_reads_back_and_shows_f32_as_written() {
        let mut config = Config::default();
        config.optim.lr = 6e-4;
        config.optim.eps = 1e-8;
        let text = config.to_toml();
        assert!(text.contains("lr = 0.0006\n"), "{text}");
        assert!(text.contains("betas = [0.9, 0.95]"), "{text}");
        assert_eq!(Config::from_toml_str(&text).unwrap(), config);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml_str("[optim]\nlearning_rate = 1e-3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("optim") && err.contains("learning_rate"),
            "{err}"
        );
        assert!(err.contains("expected one of"), "{err}");
        let err = Config::from_toml_str("[trainer]\nsteps = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("trainer"), "{err}");
    }

    #[test]
    fn wrong_type_and_bad_enum_name_the_key() {
        let err = Config::from_toml_str("[model]\nn_layer = \"twelve\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.n_layer"), "{err}");
        let err = Config::from_toml_str("[optim]\nschedule = \"exponential\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("optim.schedule") && err.contains("cosine"),
            "{err}"
        );
    }

    #[test]
    fn cross_field_rules_name_keys() {
        let err = Config::from_toml_str("[model]\nn_embd = 100\nn_head = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.n_embd") && err.contains("model.n_head"),
            "{err}"
        );
        let err = Config::from_toml_str("[optim]\nlr = 1e-3\nmin_lr = 1e-2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("optim.min_lr"), "{err}");
        let err = Config::from_toml_str("[train]\nprecision = \"bf16\"\ndevice = \"cpu\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.precision"), "{err}");
        for (toml, says) in [
            (
                "host_fraction = 1.5\ndevice = \"nvme\"",
                "must lie in [0, 1]",
            ),
            ("host_fraction = 0.5\ndevice = \"cpu\"", "device = \"nvme\""),
        ] {
            let err = Config::from_toml_str(&format!(
                "[zero]\nstage = 3\n[offload_optimizer]\nnvme_path = \"/tmp\"\n{toml}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("offload_optimizer.host_fraction") && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let sets = vec![
            "optim.lr=0.01".to_string(),
            "data.train=\"synthetic\"".to_string(),
            "model.n_layer=2".to_string(),
            "train.metrics_file=/tmp/m.jsonl".to_string(),
        ];
        let c = Config::load(None, &sets).unwrap();
        assert_eq!(c.optim.lr, 0.01);
        assert_eq!(c.model.n_layer, 2);
        assert_eq!(
            c.train.metrics_file.as_deref(),
            Some(Path::new("/tmp/m.jsonl"))
        );
        let err = Config::load(None, &["optim.lrr=1".to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lrr"), "{err}");
        let err = Config::load(None, &["optim.lr".to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("key.path=value"), "{err}");
    }
}
