//! The files `strata train` reads and writes, checked and locked before the engine is built.

use super::{InputFile, LineFile, OutputError, OutputFile, ReadyOutput};
use crate::config::Config;
use std::path::Path;

/// Bytes a metrics line takes at most in practice (a JSON object of eight numbers is about 200).
pub const METRICS_LINE_BYTES: u64 = 256;
/// Header bytes of an exported safetensors file per tensor (name, dtype, shape, offsets), generously.
const EXPORT_HEADER_BYTES_PER_TENSOR: u64 = 256;

/// The checked, locked outputs of one run; empty on ranks other than 0, which write nothing.
#[derive(Debug, Default)]
pub struct TrainOutputs {
    metrics: Option<ReadyOutput>,
    export: Option<ReadyOutput>,
}

/// Whether this process writes the run's outputs: rank 0, or a process started without a launcher.
pub fn writes_outputs() -> bool {
    strata_collectives::RankInfo::from_env().map_or(true, |info| info.rank == 0)
}

/// The files a run reads: the config file, the token file, the initial weights.
pub fn input_files(config: &Config) -> Vec<InputFile> {
    let mut inputs = Vec::new();
    if let Some(path) = &config.source {
        inputs.push(InputFile {
            key: "the config file".into(),
            path: path.clone(),
        });
    }
    if let Some((path, _)) = &config.deepspeed {
        inputs.push(InputFile {
            key: "--deepspeed".into(),
            path: path.clone(),
        });
    }
    if config.data.train != "synthetic" {
        inputs.push(InputFile {
            key: "data.train".into(),
            path: config.data.train.clone().into(),
        });
    }
    if let Some(path) = &config.model.init_from {
        inputs.push(InputFile {
            key: "model.init_from".into(),
            path: path.clone(),
        });
    }
    inputs
}

/// Bytes of the exported weights: fp32 parameters and the header.
pub fn export_bytes(config: &Config) -> u64 {
    let tensors = config.model.num_tensors() as u64;
    let params = u64::try_from(config.model.num_params()).unwrap_or(u64::MAX);
    params
        .saturating_mul(4)
        .saturating_add(8 + tensors * EXPORT_HEADER_BYTES_PER_TENSOR)
}

/// The files a run writes, with their sizes.
pub fn output_files(config: &Config) -> Vec<OutputFile> {
    let mut outputs = Vec::new();
    if let Some(path) = &config.train.metrics_file {
        let steps = config.train.steps as u64;
        outputs.push(OutputFile {
            key: "train.metrics_file".into(),
            path: path.clone(),
            size_bytes: steps.saturating_mul(METRICS_LINE_BYTES),
            size_detail: format!("{steps} steps × {METRICS_LINE_BYTES} bytes per line"),
        });
    }
    if let Some(path) = &config.train.export_to {
        outputs.push(OutputFile {
            key: "train.export_to".into(),
            path: path.clone(),
            size_bytes: export_bytes(config),
            size_detail: format!(
                "{} fp32 parameters and the safetensors header",
                config.model.num_params()
            ),
        });
    }
    outputs
}

impl TrainOutputs {
    /// On the writing rank: resolves and checks every output against the inputs and each other, checks
    /// the free space and takes the locks. Elsewhere: nothing.
    pub fn prepare(config: &Config) -> Result<TrainOutputs, OutputError> {
        if !writes_outputs() {
            return Ok(TrainOutputs::default());
        }
        super::cleanup::install();
        let mut outputs = TrainOutputs::default();
        for ready in super::prepare(&input_files(config), &output_files(config))? {
            match ready.key.as_str() {
                "train.metrics_file" => outputs.metrics = Some(ready),
                _ => outputs.export = Some(ready),
            }
        }
        Ok(outputs)
    }

    /// The metrics stream, when `train.metrics_file` is set on this rank.
    pub fn metrics_file(&self) -> Result<Option<LineFile>, OutputError> {
        self.metrics
            .as_ref()
            .map(|m| LineFile::create(&m.key, &m.target))
            .transpose()
    }

    /// Where the final weights go, when `train.export_to` is set on this rank.
    pub fn export_target(&self) -> Option<&Path> {
        self.export.as_ref().map(|e| e.target.as_path())
    }
}
