//! `strata prepare`: text to an llm.c token file, with GPT-2 BPE (tiktoken's r50k_base) or raw bytes.

use super::{tokens::write_token_file, DataError};
use std::path::Path;

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

/// Tokenizes `input` and writes `output`, creating its directory if needed; returns the number of tokens.
pub fn prepare(input: &Path, output: &Path, tokenizer: Tokenizer) -> Result<usize, DataError> {
    let text = std::fs::read_to_string(input).map_err(|source| DataError::Io {
        path: input.to_path_buf(),
        source,
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
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| DataError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    write_token_file(output, &tokens)?;
    Ok(tokens.len())
}
