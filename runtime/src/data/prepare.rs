//! `strata prepare`: text to an llm.c token file, with GPT-2 BPE (tiktoken's r50k_base) or raw bytes.

use super::{tokens::write_token_file, DataError};
use crate::outputs::{InputFile, OutputFile};
use std::path::Path;

/// The largest text `strata prepare` reads (it holds the text and its tokens in memory at once).
pub const PREPARE_INPUT_BYTES_MAX: u64 = 8 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Tokenizer {
    /// GPT-2's byte-pair encoding (vocabulary 50,257).
    Gpt2,
    /// One token per byte (vocabulary 256).
    Bytes,
}

impl Tokenizer {
    pub fn vocab_size(self) -> usize {
        match self {
            Tokenizer::Gpt2 => 50257,
            Tokenizer::Bytes => 256,
        }
    }
}

/// Tokenizes `input` and writes `output`, creating its directory if needed; returns the number of tokens. The
/// output may not be the input (or a link to it), is locked while written, and replaces an older file only
/// when whole.
pub fn prepare(input: &Path, output: &Path, tokenizer: Tokenizer) -> Result<usize, DataError> {
    let (_, input_bytes) = crate::inputs::open_regular(input)?;
    // Two bytes per token; GPT-2 BPE averages about four bytes of English text per token.
    let size_bytes = super::tokens::HEADER_BYTES as u64
        + match tokenizer {
            Tokenizer::Bytes => 2 * input_bytes,
            Tokenizer::Gpt2 => input_bytes,
        };
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| DataError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    crate::outputs::cleanup::install();
    let ready = crate::outputs::prepare(
        &[InputFile {
            key: "INPUT".into(),
            path: input.to_path_buf(),
        }],
        &[OutputFile {
            key: "output (-o)".into(),
            path: output.to_path_buf(),
            size_bytes,
            size_detail: format!("the tokens of {input_bytes} bytes of text"),
        }],
    )?;
    let bytes = crate::inputs::read_bounded(input, PREPARE_INPUT_BYTES_MAX, "a text to prepare")?;
    let text = String::from_utf8(bytes).map_err(|e| DataError::Format {
        path: input.to_path_buf(),
        message: format!(
            "not UTF-8 text: invalid byte at offset {}",
            e.utf8_error().valid_up_to()
        ),
    })?;
    let tokens: Vec<u16> = match tokenizer {
        Tokenizer::Bytes => text.bytes().map(u16::from).collect(),
        Tokenizer::Gpt2 => {
            let bpe = tiktoken_rs::r50k_base().map_err(|e| DataError::Tokenizer(e.to_string()))?;
            let ids = bpe.encode_with_special_tokens(&text);
            ids.into_iter()
                .map(|t| {
                    u16::try_from(t)
                        .map_err(|_| DataError::Tokenizer(format!("token id {t} exceeds uint16")))
                })
                .collect::<Result<_, _>>()?
        }
    };
    write_token_file(&ready[0].target, &tokens)?;
    Ok(tokens.len())
}
