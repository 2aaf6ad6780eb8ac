//! `strata export CHECKPOINT -o OUT [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]`: a
//! checkpoint's weights with the model's Hugging Face tensor names, so that the transformers class
//! of the model (`GPT2LMHeadModel`, `LlamaForCausalLM`, …) loads them with `from_pretrained(DIR)`
//! (and `model.init_from` reads them back). OUT ending in `.safetensors` is one file with a
//! `config.json` beside it; any other OUT is a model directory ([`weights::Export::dir`]: config,
//! generation config, shards and their index, the tokenizer files of `--tokenizer-from`). The
//! weights are written unit by unit: each shard's header first (every tensor's shape is known from
//! the model), then each unit's tensors as the checkpoint's rank files give them, so the host holds
//! about one unit, not the model.
//!
//! Every file is an output like `strata train`'s: checked before anything is written (not inside the
//! checkpoint read or a checkpoint beside it, regular files or absent, room for them, locked), written
//! under temporary names and renamed into place only when all are whole.

use std::path::{Path, PathBuf};

use crate::engine::checkpoint::{self, CheckpointReader};
use crate::engine::EngineError;
use crate::outputs::InputFile;
use crate::weights::{self, Export};

pub use crate::weights::ExportDtype;

/// The arguments of `strata export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// A checkpoint (`step-NNNNNNNN`), or a checkpoint directory (its newest checkpoint).
    pub checkpoint: PathBuf,
    /// A safetensors file (ending in `.safetensors`; config.json goes beside it), or the model
    /// directory to write.
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportDtype::Fp32)]
    pub dtype: ExportDtype,
    /// A model directory's largest shard (5GB, 500MB, 2GiB, bytes); a larger tensor has its own.
    #[arg(long, default_value = "5GB", value_parser = weights::parse_shard_size)]
    pub max_shard_size: u64,
    /// Copy the tokenizer files (tokenizer.json, tokenizer_config.json, …) and
    /// generation_config.json of this model directory into the exported one.
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    #[error(transparent)]
    Output(Box<crate::outputs::OutputError>),
}

impl From<crate::outputs::OutputError> for ExportError {
    fn from(e: crate::outputs::OutputError) -> Self {
        ExportError::Output(Box::new(e))
    }
}

/// The checkpoint `CHECKPOINT` names: itself, or the newest save in a directory of checkpoints.
pub(crate) fn checkpoint_of(arg: &Path) -> Result<PathBuf, EngineError> {
    let name = arg.file_name().map(|n| n.to_string_lossy().into_owned());
    if arg.join("manifest.json").is_file() || name.is_some_and(|n| n.ends_with(".tmp")) {
        return Ok(arg.to_path_buf());
    }
    let saved = checkpoint::list(arg)?;
    saved.last().map(|s| s.path.clone()).ok_or_else(|| {
        EngineError::Checkpoint(format!(
            "{}: neither a checkpoint (manifest.json) nor a directory of checkpoints",
            arg.display()
        ))
    })
}

/// The files an export reads: the checkpoint, and the checkpoints beside it (none is written into).
fn export_inputs(dir: &Path) -> Vec<InputFile> {
    let mut inputs = vec![InputFile {
        key: "CHECKPOINT".into(),
        path: dir.to_path_buf(),
    }];
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        inputs.extend(
            checkpoint::dirs(parent)
                .into_iter()
                .filter(|d| d.as_path() != dir)
                .map(|path| InputFile {
                    key: "a checkpoint beside it".into(),
                    path,
                }),
        );
    }
    inputs
}

/// Writes the export; returns a one-line report.
pub fn run(args: &ExportArgs) -> Result<String, ExportError> {
    let dir = checkpoint_of(&args.checkpoint)?;
    let manifest = checkpoint::read_manifest(&dir)?;
    // Before anything is written: a model no transformers class computes is refused.
    crate::model::hf_config(&manifest.model)
        .map_err(|e| EngineError::Checkpoint(format!("{}: cannot export: {e}", dir.display())))?;
    let reader = CheckpointReader::open(&dir, &manifest)?;
    let model = crate::model::build(&manifest.model);
    let units = model.units();
    if units.len() != reader.units().len()
        || units
            .iter()
            .zip(reader.units())
            .any(|(u, e)| u.numel() != e.numel)
    {
        return Err(EngineError::Checkpoint(format!(
            "{}: its units do not match the model of its own manifest",
            dir.display()
        ))
        .into());
    }
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("strata_step".to_string(), manifest.step.to_string());
    let single = is_single_file(&args.output);
    let export = if single {
        let mut export = Export::file(&args.output, units, args.dtype, &metadata)?;
        let config = weights::config_json(&manifest.model, args.dtype)?;
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| EngineError::Checkpoint(e.to_string()))?;
        export.text(hf_config_path(&args.output), text, "the model's config");
        export
    } else {
        Export::dir(
            &args.output,
            units,
            &manifest.model,
            args.dtype,
            args.max_shard_size,
            args.tokenizer_from.as_deref(),
            &metadata,
        )?
    };
    // The output's directory is made, as `strata prepare` makes its own (and removed again if the
    // export fails before writing into it).
    crate::outputs::cleanup::install();
    let mut inputs = export_inputs(&dir);
    inputs.extend(export.sources().map(|path| InputFile {
        key: "--tokenizer-from".into(),
        path: path.to_path_buf(),
    }));
    let outputs = export.outputs(OUTPUT_KEY);
    let _made = crate::outputs::make_parent(OUTPUT_KEY, &outputs[0].path, &inputs)?;
    let ready = crate::outputs::prepare(&inputs, &outputs)?;
    let targets: Vec<PathBuf> = ready.iter().map(|r| r.target.clone()).collect();
    let mut writer = export.writer(&targets)?;
    for u in 0..units.len() {
        writer.unit(&reader.master(u)?)?;
    }
    writer.finish()?;
    let files = export.files();
    Ok(format!(
        "wrote {} ({} tensors, {}, step {}: {})",
        args.output.display(),
        units.iter().map(|u| u.tensors.len()).sum::<usize>(),
        args.dtype.name(),
        manifest.step,
        files
            .iter()
            .map(|f| f
                .path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Whether an export's output is one safetensors file: a name ending in `.safetensors`, or
/// something that exists and is not a directory (refused by the output checks unless it is a
/// regular file); else a model directory.
pub fn is_single_file(output: &Path) -> bool {
    output.extension().is_some_and(|e| e == "safetensors")
        || std::fs::metadata(output).is_ok_and(|m| !m.is_dir())
}

/// The key that names the export's output in errors.
const OUTPUT_KEY: &str = "--output";

/// `config.json` beside `output`.
fn hf_config_path(output: &Path) -> PathBuf {
    output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("config.json")
}

/// What `train.export_to` writes for a model of `units` (fp32): one safetensors file when it ends
/// in `.safetensors` (the weights alone, as before), else a model directory of shards of at most
/// 5GB with config.json, generation_config.json and the tokenizer files of the `model.init_from`
/// directory.
pub fn train_export(
    config: &crate::config::Config,
    units: &[crate::model::UnitSpec],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<Option<Export>, weights::WeightsError> {
    let Some(path) = &config.train.export_to else {
        return Ok(None);
    };
    let export = if is_single_file(path) {
        Export::file(path, units, ExportDtype::Fp32, metadata)?
    } else {
        let source = crate::config::hf_dir::model_dir(&config.model);
        Export::dir(
            path,
            units,
            &config.model,
            ExportDtype::Fp32,
            weights::MAX_SHARD_BYTES_DEFAULT,
            source.as_deref(),
            metadata,
        )?
    };
    Ok(Some(export))
}
