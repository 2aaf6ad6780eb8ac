//! `strata prepare`: text, JSON lines, parquet and chat records to a token file, with GPT-2's BPE, bytes, or
//! a Hugging Face tokenizer.
//!
//! A reader thread streams the inputs as units ([`inputs`]: pieces of text files, lines of JSON-lines files,
//! rows of parquet files as JSON objects) in bounded batches; each batch is tokenized in parallel over the
//! cores, then written in input order, so memory stays bounded whatever the input size and the output does not
//! depend on the thread count.
//!
//! Documents: a text file is one document, a JSONL record (or parquet row) another. Each is
//! `prefix + tokens + suffix` ([`tokenizer`]) followed by the EOS token when it does not already end with it,
//! so documents are packed one after another with EOS between them. Records are, by their fields: `messages`
//! (a chat, rendered with the chat template; the loss mask keeps the assistant's tokens only, and the EOS after
//! it is masked), `prompt` + `completion` (the text is their concatenation; with `--mask-prompt` the prompt's
//! tokens are masked, the completion and the EOS after it are not), else the `--field` (default `text`).

pub mod chat;
pub mod inputs;
pub mod pieces;
pub mod tokenizer;

use super::tokens::{Layout, Sealed, TokenWriter, HEADER_BYTES};
use super::DataError;
use crate::outputs::{InputFile, OutputFile};
use chat::ChatTemplate;
use indicatif::{ProgressBar, ProgressStyle};
use inputs::{Body, Unit};
use rayon::prelude::*;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;
pub use tokenizer::Tokenizer;

/// Batches read ahead of the one being tokenized.
const BATCHES_QUEUED_MAX: usize = 2;
/// The largest chat template file read.
const TEMPLATE_BYTES_MAX: u64 = 16 << 20;

/// `strata prepare`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct PrepareArgs {
    /// Input files, read in order: text files (any name; each is one document), JSON lines (`.jsonl`,
    /// `.ndjson`; one document per line), parquet (`.parquet`; one document per row, its columns as a JSON
    /// line's fields), or a quoted shell pattern such as "data/*.jsonl" (sorted).
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<String>,
    /// The token file to write (created with its directory; replaced only when whole). uint16 tokens, or
    /// uint32 for vocabularies over 65,536; a loss mask when some tokens are not targets.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// `gpt2` (GPT-2's BPE), `bytes` (one token per byte), or a Hugging Face tokenizer: a model directory
    /// with tokenizer.json (its tokenizer_config.json gives the special tokens and chat template), or a
    /// tokenizer.json.
    #[arg(long, default_value = "gpt2", value_name = "gpt2|bytes|DIR|FILE")]
    pub tokenizer: String,
    /// JSON lines and parquet: the field (column) with each record's text [default: text]. Without it, records
    /// with `messages` are chats and records with `prompt` and `completion` are pairs.
    #[arg(long, value_name = "NAME")]
    pub field: Option<String>,
    /// A Jinja chat template for chat records, instead of the tokenizer's (`chat_template`).
    #[arg(long, value_name = "FILE")]
    pub template: Option<PathBuf>,
    /// Prompt/completion records: train on the completion only (the prompt's targets are masked).
    #[arg(long)]
    pub mask_prompt: bool,
    /// Hold out this share (0 to 1) of the documents (of a text file: of its pieces of at most 8 KiB) in a
    /// validation file.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub val_fraction: f64,
    /// The validation file [default: beside OUTPUT, `NAME_val.EXT`].
    #[arg(long, value_name = "FILE")]
    pub val_output: Option<PathBuf>,
    /// Tokenizing threads [default: every core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

impl PrepareArgs {
    /// Arguments for `inputs` → `output` with `tokenizer` and every other option at its default.
    pub fn new(inputs: &[&Path], output: &Path, tokenizer: &str) -> PrepareArgs {
        PrepareArgs {
            inputs: inputs.iter().map(|p| p.display().to_string()).collect(),
            output: output.to_path_buf(),
            tokenizer: tokenizer.to_string(),
            field: None,
            template: None,
            mask_prompt: false,
            val_fraction: 0.0,
            val_output: None,
            threads: None,
        }
    }
}

/// One file written.
#[derive(Clone, Debug)]
pub struct Written {
    pub path: PathBuf,
    pub layout: Layout,
    /// Tokens whose mask byte is 0.
    pub masked: usize,
    pub documents: usize,
}

/// What `strata prepare` did.
#[derive(Clone, Debug)]
pub struct Report {
    pub train: Written,
    pub val: Option<Written>,
    pub tokenizer: String,
    pub vocab_size: usize,
    pub input_bytes: u64,
    pub seconds: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let describe = |w: &Written| {
            let bits = 8 * w.layout.token_bytes;
            let mask = if w.layout.masked {
                format!(", {} of them masked", w.masked)
            } else {
                String::new()
            };
            format!(
                "{} tokens (uint{bits}{mask}) from {} document{} to {}",
                w.layout.count,
                w.documents,
                if w.documents == 1 { "" } else { "s" },
                w.path.display()
            )
        };
        write!(f, "wrote {}", describe(&self.train))?;
        if let Some(v) = &self.val {
            write!(f, "\nwrote {}", describe(v))?;
        }
        let tokens = self.train.layout.count + self.val.as_ref().map_or(0, |v| v.layout.count);
        let s = self.seconds.max(1e-9);
        write!(
            f,
            "\n{} (vocab {}: set model.vocab_size to at least this); {:.1} MB in {:.2} s: {:.1} MB/s, {:.0} tokens/s",
            self.tokenizer,
            self.vocab_size,
            self.input_bytes as f64 / 1e6,
            self.seconds,
            self.input_bytes as f64 / 1e6 / s,
            tokens as f64 / s
        )
    }
}

/// The tokens of one unit and their mask bytes (`None`: every token is a target).
struct Doc {
    ids: Vec<u32>,
    mask: Option<Vec<u8>>,
}

/// What every unit is tokenized with.
struct Context<'a> {
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    /// Why there is no template, for the error of a chat record.
    no_template: String,
    field: Option<&'a str>,
    mask_prompt: bool,
    paths: &'a [PathBuf],
}

impl Doc {
    /// Appends the separator (EOS) unless the document already ends with it; its mask byte is `mask`.
    fn separate(&mut self, tokenizer: &Tokenizer, mask: u8) {
        let Some(sep) = tokenizer.separator() else {
            return;
        };
        if self.ids.last().is_some_and(|&t| t != sep) {
            self.ids.push(sep);
            if let Some(m) = &mut self.mask {
                m.push(mask);
            }
        }
    }
}

impl Context<'_> {
    fn process(&self, unit: &Unit) -> Result<Doc, DataError> {
        let error = |message: String| {
            let path = self.paths[unit.file].clone();
            match unit.body {
                Body::Row { .. } => DataError::Row {
                    path,
                    row: unit.line,
                    message,
                },
                _ => DataError::Record {
                    path,
                    line: unit.line,
                    message,
                },
            }
        };
        match &unit.body {
            Body::Text { text, first, last } => {
                let t = self.tokenizer;
                let mut ids = if *first {
                    t.prefix().to_vec()
                } else {
                    Vec::new()
                };
                t.encode(text, &mut ids, None).map_err(error)?;
                let mut doc = Doc { ids, mask: None };
                if *last {
                    doc.ids.extend_from_slice(t.suffix());
                    doc.separate(t, 1);
                }
                Ok(doc)
            }
            Body::Record(json) | Body::Row { json, .. } => self.record(json).map_err(error),
        }
    }

    fn record(&self, line: &str) -> Result<Doc, String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or("not a JSON object (a record is {\"text\": …}, {\"messages\": […]} or {\"prompt\": …, \"completion\": …})")?;
        let string = |key: &str| -> Result<&str, String> {
            match obj.get(key) {
                Some(serde_json::Value::String(s)) => Ok(s),
                Some(serde_json::Value::Null) => Err(format!("field {key:?} is null")),
                _ => Err(format!("field {key:?} is not a string")),
            }
        };
        if let Some(field) = self.field {
            if !obj.contains_key(field) {
                return Err(missing(field, obj));
            }
            return self.text(string(field)?);
        }
        if let Some(messages) = obj.get("messages") {
            return self.chat(messages);
        }
        if obj.contains_key("prompt") && obj.contains_key("completion") {
            return self.prompt_completion(string("prompt")?, string("completion")?);
        }
        if self.mask_prompt {
            return Err(format!(
                "--mask-prompt needs \"prompt\" and \"completion\" fields (or \"messages\"); this record has {}",
                fields(obj)
            ));
        }
        if !obj.contains_key("text") {
            return Err(missing("text", obj));
        }
        self.text(string("text")?)
    }

    fn text(&self, text: &str) -> Result<Doc, String> {
        let t = self.tokenizer;
        if text.is_empty() {
            return Ok(Doc {
                ids: Vec::new(),
                mask: None,
            });
        }
        let mut ids = t.prefix().to_vec();
        t.encode(text, &mut ids, None)?;
        ids.extend_from_slice(t.suffix());
        let mut doc = Doc { ids, mask: None };
        doc.separate(t, 1);
        Ok(doc)
    }

    fn prompt_completion(&self, prompt: &str, completion: &str) -> Result<Doc, String> {
        if !self.mask_prompt {
            return self.text(&format!("{prompt}{completion}"));
        }
        let t = self.tokenizer;
        let text = format!("{prompt}{completion}");
        let mut ids = t.prefix().to_vec();
        let mut offsets = Vec::new();
        t.encode(&text, &mut ids, Some(&mut offsets))?;
        let mut mask = vec![0u8; t.prefix().len()];
        let completion = prompt.len()..text.len();
        mask.extend(chat::mask_of(&offsets, std::slice::from_ref(&completion)));
        ids.extend_from_slice(t.suffix());
        mask.resize(ids.len(), 1);
        let mut doc = Doc {
            ids,
            mask: Some(mask),
        };
        doc.separate(t, 1);
        Ok(doc)
    }

    fn chat(&self, messages: &serde_json::Value) -> Result<Doc, String> {
        let template = self.template.ok_or_else(|| self.no_template.clone())?;
        let messages = chat::check_messages(messages)?;
        let rendered = template.render(&messages, &self.tokenizer.specials)?;
        let (mut ids, mut offsets) = (Vec::new(), Vec::new());
        self.tokenizer
            .encode(&rendered.text, &mut ids, Some(&mut offsets))?;
        let mask = chat::mask_of(&offsets, &rendered.assistant);
        let mut doc = Doc {
            ids,
            mask: Some(mask),
        };
        doc.separate(self.tokenizer, 0);
        Ok(doc)
    }
}

fn fields(obj: &serde_json::Map<String, serde_json::Value>) -> String {
    if obj.is_empty() {
        return "no fields".into();
    }
    let names: Vec<String> = obj.keys().map(|k| format!("{k:?}")).collect();
    format!("the fields {}", names.join(", "))
}

fn missing(field: &str, obj: &serde_json::Map<String, serde_json::Value>) -> String {
    format!(
        "no field {field:?} (this record has {}); name the text's field with --field",
        fields(obj)
    )
}

/// Directories created for the outputs, removed again (when empty) unless the run completes.
struct CreatedDirs {
    dirs: Vec<PathBuf>,
    _cleanup: Vec<crate::outputs::cleanup::Registration>,
}

impl CreatedDirs {
    /// Creates the missing ancestors of `path`, remembering which.
    fn create_parent(path: &Path) -> Result<CreatedDirs, DataError> {
        let mut missing = Vec::new();
        let mut dir = path.parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            missing.push(d.to_path_buf());
            dir = d.parent();
        }
        if let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
            return Err(DataError::CreateDir {
                path: d.to_path_buf(),
                source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        let mut created = CreatedDirs {
            dirs: Vec::new(),
            _cleanup: Vec::new(),
        };
        // The deepest registered first: a signal's cleanup removes directories in registration order.
        created._cleanup = missing
            .iter()
            .map(|d| crate::outputs::cleanup::register(d))
            .collect();
        for d in missing.into_iter().rev() {
            std::fs::create_dir(&d).map_err(|source| DataError::CreateDir {
                path: d.clone(),
                source,
            })?;
            created.dirs.push(d);
        }
        Ok(created)
    }

    /// The run is complete: the directories stay.
    fn keep(mut self) {
        self.dirs.clear();
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            // Only an empty directory is removed; one another program wrote into stays.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// `OUT.bin` → `OUT_val.bin`.
fn default_val_path(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or("tokens".into(), |s| s.to_string_lossy().into_owned());
    let name = match output.extension() {
        Some(ext) => format!("{stem}_val.{}", ext.to_string_lossy()),
        None => format!("{stem}_val"),
    };
    output.with_file_name(name)
}

/// Whether unit `k` is held out: exactly ⌊k·F⌋ of the first k units are, spread evenly.
fn held_out(k: u64, fraction: f64) -> bool {
    ((k + 1) as f64 * fraction).floor() > (k as f64 * fraction).floor()
}

/// One output being written and what went into it.
struct Sink {
    writer: TokenWriter,
    masked: usize,
    documents: usize,
    /// The text file whose pieces came last.
    last_text_file: Option<usize>,
}

impl Sink {
    fn push(&mut self, doc: &Doc) -> Result<(), DataError> {
        self.writer.push(&doc.ids, doc.mask.as_deref())?;
        self.masked += doc
            .mask
            .as_ref()
            .map_or(0, |m| m.iter().filter(|&&b| b == 0).count());
        Ok(())
    }

    /// Completes the file under its temporary name; an empty one is an error (`what` names it).
    fn seal(self, what: &str) -> Result<(Sealed, Written), DataError> {
        let path = self.writer.path().to_path_buf();
        if self.writer.count() == 0 {
            return Err(DataError::Usage(format!(
                "no tokens for the {what} file {}: the inputs hold no text{}",
                path.display(),
                if what == "validation" {
                    " for it (raise --val-fraction, or give more documents)"
                } else {
                    ""
                }
            )));
        }
        let sealed = self.writer.seal()?;
        let written = Written {
            path,
            layout: sealed.layout,
            masked: self.masked,
            documents: self.documents,
        };
        Ok((sealed, written))
    }
}

fn progress_bar(total_bytes: u64) -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(total_bytes);
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec}  {msg}  [{elapsed_precise} < {eta}]",
        ) {
            bar.set_style(style);
        }
        bar
    })
}

/// Runs `strata prepare`: tokenizes the inputs into the output (and validation) file; on any error nothing
/// is left behind (no partial file, no directory it created).
pub fn run(args: &PrepareArgs) -> Result<Report, DataError> {
    let started = Instant::now();
    if !(0.0..1.0).contains(&args.val_fraction) {
        return Err(DataError::Usage(format!(
            "--val-fraction {} is not in [0, 1)",
            args.val_fraction
        )));
    }
    let paths = inputs::expand(&args.inputs)?;
    let mut input_bytes = 0;
    for p in &paths {
        input_bytes += crate::inputs::open_regular(p)?.1;
    }
    let tokenizer = Tokenizer::load(&args.tokenizer)?;
    let (template, no_template) = load_template(args, &tokenizer)?;
    let vocab_size = tokenizer.vocab_size();
    let val_path = (args.val_fraction > 0.0).then(|| {
        args.val_output
            .clone()
            .unwrap_or_else(|| default_val_path(&args.output))
    });

    // Outputs: checked against every input (texts, tokenizer files, template), for space, and locked.
    let mut input_files: Vec<InputFile> = paths
        .iter()
        .map(|p| InputFile {
            key: "INPUT".into(),
            path: p.clone(),
        })
        .collect();
    input_files.extend(
        tokenizer
            .files
            .iter()
            .chain(&args.template)
            .map(|p| InputFile {
                key: "tokenizer or template".into(),
                path: p.clone(),
            }),
    );
    let token_bytes = Layout::for_vocab(vocab_size, false).token_bytes as u64;
    // At most one token per byte (the bytes tokenizer), a mask byte each; BPE averages ~4 bytes a token.
    let per_byte = if tokenizer.name() == "bytes" {
        token_bytes
    } else {
        token_bytes.div_ceil(2)
    };
    let mut outputs = vec![(&args.output, "output (-o)")];
    outputs.extend(val_path.as_ref().map(|p| (p, "--val-output")));
    let mut dirs = Vec::new();
    for (path, _) in &outputs {
        dirs.push(CreatedDirs::create_parent(path)?);
    }
    crate::outputs::cleanup::install();
    let ready = crate::outputs::prepare(
        &input_files,
        &outputs
            .iter()
            .map(|(path, key)| OutputFile {
                key: key.to_string(),
                path: path.to_path_buf(),
                size_bytes: HEADER_BYTES as u64 + input_bytes * per_byte,
                size_detail: format!("the tokens of {input_bytes} bytes of input"),
            })
            .collect::<Vec<_>>(),
    )?;
    let sink = |path: &Path| -> Result<Sink, DataError> {
        Ok(Sink {
            writer: TokenWriter::create(path, vocab_size)?,
            masked: 0,
            documents: 0,
            last_text_file: None,
        })
    };
    let mut train = sink(&ready[0].target)?;
    let mut val = ready.get(1).map(|r| sink(&r.target)).transpose()?;

    let ctx = Context {
        tokenizer: &tokenizer,
        template: template.as_ref(),
        no_template,
        field: args.field.as_deref(),
        mask_prompt: args.mask_prompt,
        paths: &paths,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads.unwrap_or(0))
        .build()
        .map_err(|e| DataError::Usage(format!("--threads: {e}")))?;
    let bar = progress_bar(input_bytes);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Unit>>(BATCHES_QUEUED_MAX);
    let reader_paths = paths.clone();
    let reader = std::thread::Builder::new()
        .name("prepare-read".into())
        .spawn(move || inputs::read_all(&reader_paths, |batch| tx.send(batch).is_ok()))
        .map_err(|error| DataError::Io {
            path: PathBuf::from("(reader thread)"),
            error,
        })?;
    let mut unit_index = 0u64;
    let mut done_bytes = 0u64;
    let mut tokenize = || -> Result<(), DataError> {
        for batch in &rx {
            let docs: Vec<Result<Doc, DataError>> =
                pool.install(|| batch.par_iter().map(|u| ctx.process(u)).collect());
            for (unit, doc) in batch.iter().zip(docs) {
                let doc = doc?;
                let to = match &mut val {
                    Some(v) if held_out(unit_index, args.val_fraction) => v,
                    _ => &mut train,
                };
                to.push(&doc)?;
                // A text file split between the files counts as a document in each.
                let new_document = match &unit.body {
                    Body::Text { .. } => to.last_text_file.replace(unit.file) != Some(unit.file),
                    Body::Record(_) | Body::Row { .. } => !doc.ids.is_empty(),
                };
                to.documents += usize::from(new_document);
                unit_index += 1;
                done_bytes += unit.input_bytes();
            }
            if let Some(bar) = &bar {
                let tokens = train.writer.count() + val.as_ref().map_or(0, |v| v.writer.count());
                bar.set_position(done_bytes);
                let rate = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!("{tokens} tokens, {rate:.0} tokens/s"));
            }
        }
        Ok(())
    };
    let tokenized = tokenize();
    // Ends the reader early after an error (its next send fails).
    drop(rx);
    let read = reader
        .join()
        .unwrap_or_else(|_| Err(DataError::Usage("the input reader panicked".into())));
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    tokenized?;
    read?;
    // Both files complete before either replaces its target: an empty validation file leaves no training file.
    let (train_file, train) = train.seal("training")?;
    let val = val.map(|v| v.seal("validation")).transpose()?;
    train_file.commit()?;
    let val = match val {
        Some((file, written)) => file.commit().map(|_| Some(written))?,
        None => None,
    };
    dirs.into_iter().for_each(CreatedDirs::keep);
    drop(ready);
    Ok(Report {
        train,
        val,
        tokenizer: tokenizer.name().to_string(),
        vocab_size,
        input_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The chat template: `--template FILE`, else the tokenizer's; or why there is none.
fn load_template(
    args: &PrepareArgs,
    tokenizer: &Tokenizer,
) -> Result<(Option<ChatTemplate>, String), DataError> {
    let (source, origin) = match (&args.template, &tokenizer.chat_template) {
        (Some(path), _) => {
            let bytes = crate::inputs::read_bounded(path, TEMPLATE_BYTES_MAX, "a chat template")?;
            let text = String::from_utf8(bytes).map_err(|_| DataError::Format {
                path: path.clone(),
                message: "not UTF-8 text".into(),
            })?;
            (text, path.display().to_string())
        }
        (None, Some((text, origin))) => (text.clone(), origin.clone()),
        (None, None) => {
            let why = format!(
                "a chat record (\"messages\") needs a chat template: the tokenizer {} has none \
                 (tokenizer_config.json's chat_template or chat_template.jinja); give one with --template FILE",
                tokenizer.name()
            );
            return Ok((None, why));
        }
    };
    let template = ChatTemplate::new(&source, origin).map_err(DataError::Usage)?;
    Ok((Some(template), String::new()))
}
