//! `strata export CHECKPOINT -o model.safetensors [--dtype bf16|fp32]`: a checkpoint's weights
//! as one safetensors file with the model's Hugging Face tensor names, and a `config.json`
//! beside it, so that the transformers class of the model (`GPT2LMHeadModel`,
//! `LlamaForCausalLM`, …) loads it with `from_pretrained(DIR)` (and `model.init_from` reads it
//! back). The file is written unit by unit: the header first (every tensor's shape is
//! known from the model), then each unit's tensors as the checkpoint's rank files give them, so
//! the host holds about one unit, not the model.
//!
//! Both files are outputs like `strata train`'s: checked before anything is written (not inside the
//! checkpoint read or a checkpoint beside it, regular files or absent, room for them, locked), written
//! under temporary names and renamed into place only when both are whole.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::engine::checkpoint::{self, CheckpointReader};
use crate::engine::EngineError;
use crate::outputs::{InputFile, OutputFile};

/// Element type of the exported tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    Fp32,
    Bf16,
}

/// The arguments of `strata export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// A checkpoint (`step-NNNNNNNN`), or a checkpoint directory (its newest checkpoint).
    pub checkpoint: PathBuf,
    /// The safetensors file to write (config.json goes beside it).
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportDtype::Fp32)]
    pub dtype: ExportDtype,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Engine(#[from] EngineError),
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
    let hf = crate::model::hf_config(&manifest.model)
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
    let (dtype, elem) = match args.dtype {
        ExportDtype::Fp32 => ("F32", 4),
        ExportDtype::Bf16 => ("BF16", 2),
    };
    // The header: every tensor, in unit order, contiguous.
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for spec in units.iter().flat_map(|u| &u.tensors) {
        let shape = if spec.stored_transposed {
            vec![spec.shape[1], spec.shape[0]]
        } else {
            spec.shape.clone()
        };
        let bytes = spec.numel() * elem;
        header.insert(
            spec.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + bytes]}),
        );
        at += bytes;
    }
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "strata_step": manifest.step.to_string()}),
    );
    let mut text =
        serde_json::to_string(&header).map_err(|e| EngineError::Checkpoint(e.to_string()))?;
    // Data starts 8-byte aligned.
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let config_path = hf_config_path(&args.output);
    let config_text = hf_config_text(hf, args.dtype)?;
    // The output's directory is made, as `strata prepare` makes its own (and removed again if the
    // export fails before writing into it).
    crate::outputs::cleanup::install();
    let inputs = export_inputs(&dir);
    let _made = crate::outputs::make_parent(OUTPUT_KEY, &args.output, &inputs)?;
    let ready = crate::outputs::prepare(
        &inputs,
        &[
            OutputFile {
                key: OUTPUT_KEY.into(),
                path: args.output.clone(),
                size_bytes: (8 + text.len() + at) as u64,
                size_detail: format!("{} tensors in {dtype}", header.len() - 1),
            },
            OutputFile {
                key: format!("{OUTPUT_KEY}'s config.json"),
                path: config_path.clone(),
                size_bytes: config_text.len() as u64,
                size_detail: "the model's config".into(),
            },
        ],
    )?;
    let mut file = crate::outputs::AtomicFile::create(&ready[0].target)?;
    let target = args.output.clone();
    let fail = |e: std::io::Error| EngineError::Checkpoint(format!("{}: {e}", target.display()));
    {
        let mut out = std::io::BufWriter::with_capacity(8 << 20, file.file());
        out.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(fail)?;
        out.write_all(text.as_bytes()).map_err(fail)?;
        for (u, unit) in units.iter().enumerate() {
            let master = reader.master(u)?;
            for (spec, range) in unit.tensors.iter().zip(unit.ranges()) {
                let values = &master[range.start..range.start + spec.numel()];
                let values = if spec.stored_transposed {
                    crate::weights::transpose(values, spec.shape[0], spec.shape[1])
                } else {
                    values.to_vec()
                };
                match args.dtype {
                    ExportDtype::Fp32 => out.write_all(bytemuck::cast_slice(&values)),
                    ExportDtype::Bf16 => {
                        let b: Vec<half::bf16> =
                            values.iter().map(|&v| half::bf16::from_f32(v)).collect();
                        out.write_all(bytemuck::cast_slice(&b))
                    }
                }
                .map_err(fail)?;
            }
        }
        out.flush().map_err(fail)?;
    }
    let mut config = crate::outputs::AtomicFile::create(&ready[1].target)?;
    config
        .file()
        .write_all(config_text.as_bytes())
        .map_err(|e| config.error("writing", e))?;
    // Both are whole: into place, the weights first.
    file.commit()?;
    config.commit()?;
    Ok(format!(
        "wrote {} ({} tensors, {}, step {}) and {}",
        args.output.display(),
        units.iter().map(|u| u.tensors.len()).sum::<usize>(),
        dtype,
        manifest.step,
        config_path.display()
    ))
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

/// The text of `config.json` for the model's transformers class: its fields and `torch_dtype`.
fn hf_config_text(
    mut config: serde_json::Value,
    dtype: ExportDtype,
) -> Result<String, ExportError> {
    if let Some(fields) = config.as_object_mut() {
        let torch_dtype = match dtype {
            ExportDtype::Fp32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
        };
        fields.insert("torch_dtype".into(), torch_dtype.into());
    }
    Ok(
        serde_json::to_string_pretty(&config)
            .map_err(|e| EngineError::Checkpoint(e.to_string()))?,
    )
}
