//! The tokenizers `strata prepare` knows: GPT-2's BPE (tiktoken's r50k_base, shipped inside the crate), one
//! token per byte, and any Hugging Face `tokenizer.json` (with the special tokens and chat template of the
//! `tokenizer_config.json` beside it).
//!
//! A document becomes `prefix + tokens(text) + suffix`, then the separator (EOS) when it does not already end
//! with it. The prefix and suffix are what transformers' `tokenizer(text)` adds around the text: what
//! `tokenizer.json`'s post-processor adds (BOS for Llama 2 and 3, nothing for GPT-2 and Qwen). As in
//! transformers 5, `add_bos_token` / `add_eos_token` in `tokenizer_config.json` do not change it.

use super::pieces::{pieces, PIECE_BYTES_MAX};
use crate::data::DataError;
use std::path::{Path, PathBuf};

/// GPT-2's end-of-text token.
const GPT2_EOT: u32 = 50256;
/// The largest tokenizer_config.json or template read.
const CONFIG_BYTES_MAX: u64 = 64 << 20;
/// The largest tokenizer.json read.
const TOKENIZER_BYTES_MAX: u64 = 1 << 30;

enum Engine {
    Gpt2(Box<tiktoken_rs::CoreBPE>),
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

/// The special tokens a chat template sees (`bos_token`, …), as text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Specials {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
    pub pad: Option<String>,
}

pub struct Tokenizer {
    engine: Engine,
    /// What the user named (`gpt2`, `bytes`, a path).
    name: String,
    vocab_size: usize,
    pub specials: Specials,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    separator: Option<u32>,
    /// The chat template of the tokenizer's directory, if any, and where it came from.
    pub chat_template: Option<(String, String)>,
    /// The files read (outputs may not overwrite them).
    pub files: Vec<PathBuf>,
}

impl Tokenizer {
    /// `gpt2`, `bytes`, a directory with `tokenizer.json` (and `tokenizer_config.json`), or a `tokenizer.json`.
    pub fn load(spec: &str) -> Result<Tokenizer, DataError> {
        match spec {
            "gpt2" => {
                let bpe =
                    tiktoken_rs::r50k_base().map_err(|e| DataError::Tokenizer(e.to_string()))?;
                let eot = "<|endoftext|>".to_string();
                Ok(Tokenizer {
                    engine: Engine::Gpt2(Box::new(bpe)),
                    name: "gpt2".into(),
                    vocab_size: 50257,
                    specials: Specials {
                        bos: Some(eot.clone()),
                        eos: Some(eot.clone()),
                        unk: Some(eot),
                        pad: None,
                    },
                    prefix: Vec::new(),
                    suffix: Vec::new(),
                    separator: Some(GPT2_EOT),
                    chat_template: None,
                    files: Vec::new(),
                })
            }
            "bytes" => Ok(Tokenizer {
                engine: Engine::Bytes,
                name: "bytes".into(),
                vocab_size: 256,
                specials: Specials::default(),
                prefix: Vec::new(),
                suffix: Vec::new(),
                separator: None,
                chat_template: None,
                files: Vec::new(),
            }),
            path => load_hf(Path::new(path)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One more than the largest id.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// What goes before a document's tokens (BOS, when the tokenizer adds one).
    pub fn prefix(&self) -> &[u32] {
        &self.prefix
    }

    /// What goes after a document's tokens (EOS, when the tokenizer adds one).
    pub fn suffix(&self) -> &[u32] {
        &self.suffix
    }

    /// The token between documents (EOS), if the tokenizer has one.
    pub fn separator(&self) -> Option<u32> {
        self.separator
    }

    /// The id of a special token's text.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.engine {
            Engine::Hf(t) => t.token_to_id(token),
            Engine::Gpt2(_) => (token == "<|endoftext|>").then_some(GPT2_EOT),
            Engine::Bytes => None,
        }
    }

    /// The ids of `text` without the prefix and suffix, tokenized in pieces of at most [`PIECE_BYTES_MAX`]
    /// bytes; with `offsets`, each token's byte range in `text` is pushed there. Special tokens written in
    /// the text (`<|endoftext|>`, `<|im_start|>`) are recognised, as transformers does by default.
    pub fn encode(
        &self,
        text: &str,
        ids: &mut Vec<u32>,
        mut offsets: Option<&mut Vec<(usize, usize)>>,
    ) -> Result<(), String> {
        for (at, piece) in pieces(text, PIECE_BYTES_MAX) {
            let first = ids.len();
            match &self.engine {
                Engine::Bytes => ids.extend(piece.bytes().map(u32::from)),
                Engine::Gpt2(bpe) => ids.extend(bpe.encode_with_special_tokens(piece)),
                Engine::Hf(t) => {
                    let enc = t.encode(piece, false).map_err(|e| e.to_string())?;
                    ids.extend_from_slice(enc.get_ids());
                    if let Some(o) = offsets.as_deref_mut() {
                        o.extend(enc.get_offsets().iter().map(|&(s, e)| (at + s, at + e)));
                    }
                }
            }
            let Some(o) = offsets.as_deref_mut() else {
                continue;
            };
            match &self.engine {
                Engine::Bytes => o.extend((at..at + piece.len()).map(|i| (i, i + 1))),
                Engine::Gpt2(bpe) => {
                    let mut pos = at;
                    for &id in &ids[first..] {
                        let n = bpe.decode_bytes(&[id]).map_or(0, |b| b.len());
                        o.push((pos, pos + n));
                        pos += n;
                    }
                }
                Engine::Hf(_) => {}
            }
        }
        Ok(())
    }

    /// The text of `ids` (special tokens written out; bytes that are not UTF-8 as U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        match &self.engine {
            Engine::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Engine::Gpt2(bpe) => bpe
                .decode_bytes(ids)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(|e| e.to_string()),
            Engine::Hf(t) => t.decode(ids, false).map_err(|e| e.to_string()),
        }
    }
}

fn config_error(path: &Path, message: impl std::fmt::Display) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// A special token in tokenizer_config.json: a string, or an object with its `content`.
fn special(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// The chat template of tokenizer_config.json: a string, or a list of named templates (`default` taken).
fn config_template(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(String::from)),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, DataError> {
    let bytes = crate::inputs::read_bounded(path, CONFIG_BYTES_MAX, "a tokenizer config")?;
    serde_json::from_slice(&bytes).map_err(|e| config_error(path, format!("not JSON: {e}")))
}

fn load_hf(spec: &Path) -> Result<Tokenizer, DataError> {
    let (dir, json) = if spec.is_dir() {
        (spec.to_path_buf(), spec.join("tokenizer.json"))
    } else {
        let dir = spec.parent().unwrap_or(Path::new(".")).to_path_buf();
        (dir, spec.to_path_buf())
    };
    if !json.exists() {
        return Err(DataError::Tokenizer(format!(
            "{} does not exist: --tokenizer takes gpt2, bytes, a directory with a tokenizer.json, or a tokenizer.json",
            json.display()
        )));
    }
    let bytes = crate::inputs::read_bounded(&json, TOKENIZER_BYTES_MAX, "a tokenizer.json")?;
    let hf = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
        config_error(
            &json,
            format!("not a tokenizer.json this version reads: {e}"),
        )
    })?;
    let mut files = vec![json.clone()];
    // tokenizer_config.json beside it: special tokens, add_bos/eos_token, the chat template.
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        files.push(config_path.clone());
        read_json(&config_path)?
    } else {
        serde_json::Value::Null
    };
    let specials = Specials {
        bos: special(&config, "bos_token"),
        eos: special(&config, "eos_token"),
        unk: special(&config, "unk_token"),
        pad: special(&config, "pad_token"),
    };
    let id_of = |key: &str, token: &Option<String>| -> Result<Option<u32>, DataError> {
        token
            .as_deref()
            .map(|t| {
                hf.token_to_id(t).ok_or_else(|| {
                    config_error(
                        &config_path,
                        format!("{key} {t:?} is not in the vocabulary of {}", json.display()),
                    )
                })
            })
            .transpose()
    };
    id_of("bos_token", &specials.bos)?;
    let eos = id_of("eos_token", &specials.eos)?;
    // As transformers 5 reads a tokenizer.json: its post-processor decides what goes around a text
    // (tokenizer_config.json's add_bos_token / add_eos_token are ignored then).
    let (prefix, suffix) = match hf.get_post_processor() {
        Some(_) => probe_post_processor(&hf).map_err(|e| config_error(&json, e))?,
        None => (Vec::new(), Vec::new()),
    };
    let template_file = dir.join("chat_template.jinja");
    let chat_template = if template_file.is_file() {
        files.push(template_file.clone());
        let bytes =
            crate::inputs::read_bounded(&template_file, CONFIG_BYTES_MAX, "a chat template")?;
        let text =
            String::from_utf8(bytes).map_err(|_| config_error(&template_file, "not UTF-8"))?;
        Some((text, template_file.display().to_string()))
    } else {
        config_template(&config).map(|t| (t, format!("{} (chat_template)", config_path.display())))
    };
    let vocab_size = hf
        .get_vocab(true)
        .values()
        .max()
        .map_or(0, |&m| m as usize + 1);
    Ok(Tokenizer {
        engine: Engine::Hf(Box::new(hf)),
        name: spec.display().to_string(),
        vocab_size,
        specials,
        prefix,
        suffix,
        separator: eos,
        chat_template,
        files,
    })
}

/// What the post-processor adds around a text: the ids before and after the text's own.
fn probe_post_processor(hf: &tokenizers::Tokenizer) -> Result<(Vec<u32>, Vec<u32>), String> {
    let encode = |special| {
        hf.encode("a", special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    };
    let (plain, full) = (encode(false)?, encode(true)?);
    let at = (0..=full.len().saturating_sub(plain.len()))
        .find(|&i| full[i..].starts_with(&plain))
        .ok_or("the post-processor changes the text's own tokens, not only around them")?;
    Ok((full[..at].to_vec(), full[at + plain.len()..].to_vec()))
}
