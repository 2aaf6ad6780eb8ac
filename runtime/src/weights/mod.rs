//! Weights in and out as safetensors with the model's tensor names (Hugging Face's).
//!
//! This is the one place names are mapped: a file may name tensors with or without the `transformer.` prefix
//! (Hugging Face's GPT-2 hub files omit it); tensors marked `stored_transposed` are Conv1D `[in, out]` on disk;
//! buffers that are not parameters (GPT-2's attention masks `*.attn.bias` / `*.attn.masked_bias`, older Llama
//! files' `*.rotary_emb.inv_freq`) are ignored; a second copy of a tied tensor (`lm_head.weight` for a tied LM
//! head, see `Model::tied_names`) is accepted only when it equals the tensor.

mod out;
mod source;

pub use out::{
    config_json, parse_shard_size, Export, ExportDtype, ExportWriter, PlannedFile,
    MAX_SHARD_BYTES_DEFAULT, TOKENIZER_FILES,
};
pub use source::{WeightSource, INDEX_FILE, SINGLE_FILE};

use safetensors::SafeTensorError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The OS error is in the message, not a `source`, so a chain printed with `{:#}` says it once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    /// A model directory's files do not fit together (the index, its shards).
    #[error("{path}: {message}")]
    Directory { path: PathBuf, message: String },
    #[error("{path}: tensor `{name}` is not a parameter of this model")]
    Unknown { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` is missing")]
    Missing { path: PathBuf, name: String },
    #[error("{path}: tensors `{first}` and `{second}` are one parameter of this model (a name with and without `transformer.`); a file must hold each once")]
    Duplicate {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}; F32, BF16 and F16 are supported")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: `{name}` differs from `{tied_to}`, but this model ties them")]
    UntiedHead {
        path: PathBuf,
        name: String,
        tied_to: String,
    },
    #[error("{path}: tensor `{name}` holds {value} at index {index} (in the file's layout); strata will not start from non-finite weights")]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
        value: f32,
    },
    #[error(transparent)]
    Input(#[from] crate::inputs::InputError),
    #[error(transparent)]
    Output(Box<crate::outputs::OutputError>),
}

impl From<crate::outputs::OutputError> for WeightsError {
    fn from(e: crate::outputs::OutputError) -> Self {
        WeightsError::Output(Box::new(e))
    }
}

/// safetensors' own bound on the JSON header (`safetensors::tensor::MAX_HEADER_SIZE`).
const SAFETENSORS_HEADER_BYTES_MAX: u64 = 100_000_000;

/// A header error in words, with the header length the file declares and the file's length.
fn header_error(path: &Path, bytes: &[u8], e: SafeTensorError) -> WeightsError {
    let file_len = bytes.len() as u64;
    let header_len = bytes
        .first_chunk::<8>()
        .map(|b| u64::from_le_bytes(*b))
        .unwrap_or(0);
    let data_len = file_len.saturating_sub(8).saturating_sub(header_len);
    let what = match &e {
        SafeTensorError::HeaderTooSmall => {
            "the file is shorter than the 8 bytes that give the header length".to_string()
        }
        SafeTensorError::HeaderTooLarge => format!(
            "the first 8 bytes give a header length of {header_len} bytes, above safetensors' limit of \
             {SAFETENSORS_HEADER_BYTES_MAX}"
        ),
        SafeTensorError::InvalidHeaderLength => format!(
            "the first 8 bytes give a header length of {header_len} bytes, which does not fit in the file"
        ),
        SafeTensorError::InvalidHeader => "the header is not UTF-8 text".to_string(),
        SafeTensorError::InvalidHeaderStart => "the header does not start with `{`".to_string(),
        SafeTensorError::InvalidHeaderDeserialization => {
            "the header is not the JSON of a safetensors header".to_string()
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the tensors in the header do not cover the {data_len} bytes of data after it exactly"
        ),
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor `{name}`: its data offsets do not follow the previous tensor's")
        }
        SafeTensorError::TensorInvalidInfo | SafeTensorError::ValidationOverflow => {
            invalid_tensor(bytes).unwrap_or_else(|| format!("{e:?}"))
        }
        other => format!("{other:?}"),
    };
    WeightsError::Format {
        path: path.into(),
        message: format!("{what} (header length {header_len} bytes, file length {file_len} bytes)"),
    }
}

/// The first tensor, in the order of its data, whose shape and dtype do not fit its data offsets (what
/// safetensors reports as `TensorInvalidInfo` or `ValidationOverflow` without a name), in words.
fn invalid_tensor(bytes: &[u8]) -> Option<String> {
    let header_len = usize::try_from(u64::from_le_bytes(*bytes.first_chunk::<8>()?)).ok()?;
    let header = bytes.get(8..8usize.checked_add(header_len)?)?;
    let entries: HashMap<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut tensors: Vec<(String, safetensors::tensor::TensorInfo)> = entries
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .filter_map(|(name, v)| Some((name, serde_json::from_value(v).ok()?)))
        .collect();
    tensors.sort_by(|a, b| (a.1.data_offsets, &a.0).cmp(&(b.1.data_offsets, &b.0)));
    tensors.iter().find_map(|(name, t)| {
        let (start, end) = t.data_offsets;
        let need = t
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(t.dtype.size()));
        match need {
            None => Some(format!(
                "tensor `{name}`: shape {:?} of {:?} has more bytes than can be counted",
                t.shape, t.dtype
            )),
            Some(need) if end.saturating_sub(start) != need => Some(format!(
                "tensor `{name}`: shape {:?} of {:?} is {need} bytes, but its data offsets [{start}, {end}] hold {}",
                t.shape,
                t.dtype,
                end.saturating_sub(start)
            )),
            Some(_) => None,
        }
    })
}

pub(crate) fn canonical(name: &str) -> &str {
    name.strip_prefix("transformer.").unwrap_or(name)
}

pub(crate) fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") && !name.contains("c_attn")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with(".rotary_emb.inv_freq")
}

pub(crate) fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}
