//! The files `strata train` reads and writes, checked and locked before the engine is built: the metrics
//! file, the exported weights, the directory of checkpoints and the trace (`--trace`), against the config
//! file, the DeepSpeed JSON, the token file, the initial weights and the checkpoint resumed from.

use super::{
    InputFile, LineFile, MadeDirs, OutputError, OutputFile, ReadyDir, ReadyOutput, RunFiles,
};
use crate::config::Config;
use std::path::Path;

/// Bytes a metrics line takes at most in practice (a JSON object of eight numbers is about 200).
pub const METRICS_LINE_BYTES: u64 = 256;

/// Bytes per parameter of a checkpoint: fp32 master weights, Adam m and v.
const CHECKPOINT_BYTES_PER_PARAM: u64 = 12;
/// Bytes of a checkpoint's manifest and rank indexes, generously.
const CHECKPOINT_INDEX_BYTES: u64 = 1 << 20;

const METRICS_KEY: &str = "train.metrics_file";
/// The key that names the export's files (the first is `train.export_to` itself, the others
/// `train.export_to's NAME`).
pub const EXPORT_KEY: &str = "train.export_to";
const CHECKPOINTS_KEY: &str = "train.checkpoint_dir";

/// The checked, locked outputs of one run. Ranks other than 0 write only their own trace file.
#[derive(Debug, Default)]
pub struct TrainOutputs {
    metrics: Option<ReadyOutput>,
    /// The export's files, in the order the export plan lists them.
    export: Vec<ReadyOutput>,
    /// The directories made for a model-directory export.
    _export_made: Option<MadeDirs>,
    checkpoints: Option<ReadyDir>,
    /// This rank's trace files and the directories made for them, until [`TrainOutputs::take_trace`].
    trace: TraceFiles,
}

/// A rank's trace files after the run's checks, locked, and the directories made for them (the
/// trace's directory is made, as it always was); both stay with the trace until it ends.
#[derive(Debug, Default)]
pub struct TraceFiles {
    pub files: Vec<ReadyOutput>,
    pub made: Vec<MadeDirs>,
}

/// Whether this process writes the run's outputs: rank 0, or a process started without a launcher.
pub fn writes_outputs() -> bool {
    strata_collectives::RankInfo::from_env().map_or(true, |info| info.rank == 0)
}

/// The files a run reads: the config file, the DeepSpeed JSON, the token file, the initial weights (and,
/// beside these, the checkpoint resumed from).
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

/// Bytes of one checkpoint of the model: its states, the manifest and the indexes.
pub fn checkpoint_bytes(params: u64) -> u64 {
    params
        .saturating_mul(CHECKPOINT_BYTES_PER_PARAM)
        .saturating_add(CHECKPOINT_INDEX_BYTES)
}

/// The directory of checkpoints a run writes, with the bytes of one checkpoint.
fn checkpoint_dir(config: &Config, params: u64) -> Option<OutputFile> {
    let path = config.train.checkpoint_dir.as_ref()?;
    Some(OutputFile {
        key: CHECKPOINTS_KEY.into(),
        path: path.clone(),
        size_bytes: checkpoint_bytes(params),
        size_detail: format!(
            "one checkpoint: {params} parameters × {CHECKPOINT_BYTES_PER_PARAM} bytes (fp32 weights, Adam m and v)"
        ),
    })
}

/// The files a run's rank 0 writes, with their sizes (the trace's aside): the metrics, and the
/// `export`'s files (`weights::Export::outputs`).
pub fn output_files(config: &Config, export: &[OutputFile]) -> Vec<OutputFile> {
    let mut outputs = Vec::new();
    if let Some(path) = &config.train.metrics_file {
        let steps = config.train.steps as u64;
        outputs.push(OutputFile {
            key: METRICS_KEY.into(),
            path: path.clone(),
            size_bytes: steps.saturating_mul(METRICS_LINE_BYTES),
            size_detail: format!("{steps} steps × {METRICS_LINE_BYTES} bytes per line"),
        });
    }
    outputs.extend_from_slice(export);
    outputs
}

impl TrainOutputs {
    /// Resolves and checks every output of this rank against the inputs (with `resume`, the checkpoint
    /// resumed from), each other and the other ranks' trace files, checks the free space (for a model of `params` parameters), makes the
    /// directory of checkpoints (and of a model-directory `export`) and takes the locks. Rank 0 writes the metrics, the export and the
    /// checkpoints' manifests; every rank its own trace file.
    pub fn prepare(
        config: &Config,
        params: u64,
        resume: Option<&Path>,
        trace: Option<&crate::trace::Trace>,
        export: &[OutputFile],
    ) -> Result<TrainOutputs, OutputError> {
        super::cleanup::install();
        let mut files = RunFiles {
            inputs: input_files(config),
            ..RunFiles::default()
        };
        files.inputs.extend(resume.map(|path| InputFile {
            key: "train.resume".into(),
            path: path.into(),
        }));
        if writes_outputs() {
            files.outputs = output_files(config, export);
            files.checkpoints = checkpoint_dir(config, params);
        }
        let export_made = match export.first() {
            Some(first) if files.outputs.iter().any(|f| f.key == first.key) && export.len() > 1 => {
                Some(super::make_parent(EXPORT_KEY, &first.path, &files.inputs)?)
            }
            _ => None,
        };
        let mut made = Vec::new();
        if let Some(trace) = trace {
            let (here, elsewhere) = trace.files();
            for file in &here {
                made.push(super::make_parent(&file.key, &file.path, &files.inputs)?);
            }
            files.outputs.extend(here);
            files.elsewhere = elsewhere;
        }
        let ready = super::prepare_run(&files)?;
        let mut outputs = TrainOutputs {
            checkpoints: ready.checkpoints,
            _export_made: export_made,
            trace: TraceFiles {
                files: Vec::new(),
                made,
            },
            ..TrainOutputs::default()
        };
        for file in ready.files {
            match file.key.as_str() {
                METRICS_KEY => outputs.metrics = Some(file),
                key if key.starts_with(EXPORT_KEY) => outputs.export.push(file),
                _ => outputs.trace.files.push(file),
            }
        }
        Ok(outputs)
    }

    /// The metrics stream, when `train.metrics_file` is set on this rank; a resumed run continues the
    /// file after its lines up to step `resumed_at` (dropping later ones, of a run that went further).
    pub fn metrics_file(&self, resumed_at: Option<usize>) -> Result<Option<LineFile>, OutputError> {
        let Some(m) = &self.metrics else {
            return Ok(None);
        };
        let Some(step) = resumed_at else {
            return LineFile::create(&m.key, &m.target).map(Some);
        };
        let (lines, kept, dropped) = LineFile::continuing(&m.key, &m.target, step)?;
        if kept + dropped > 0 {
            tracing::info!(
                "{} = {}: continued after its {kept} lines up to step {step}{}",
                m.key,
                m.path.display(),
                match dropped {
                    0 => String::new(),
                    n => format!(" ({n} later line{} dropped)", if n == 1 { "" } else { "s" }),
                }
            );
        }
        Ok(Some(lines))
    }

    /// Where the export's files go (resolved), when `train.export_to` is set on this rank.
    pub fn export_targets(&self) -> Vec<std::path::PathBuf> {
        self.export.iter().map(|e| e.target.clone()).collect()
    }

    /// The directory of checkpoints, made and locked, when `train.checkpoint_dir` is set on this rank.
    pub fn checkpoint_dir(&self) -> Option<&Path> {
        self.checkpoints.as_ref().map(|d| d.target.as_path())
    }

    /// This rank's trace files, checked and locked, for [`crate::trace::Trace::open`].
    pub fn take_trace(&mut self) -> TraceFiles {
        std::mem::take(&mut self.trace)
    }
}
