//! `strata prepare` against transformers: token ids of four tokenizer families, chat templates with their
//! assistant masks, packing with EOS, held-out files, bad input, long lines, and the `--help` text; parquet
//! inputs against the same records as JSON lines.
//! Fixtures: tests/fixtures/tokenizers/ (made by make_tokenizer_fixtures.py with tokenizers and transformers),
//! tests/fixtures/parquet/ (made by make_parquet_fixtures.py with pyarrow).

use std::path::{Path, PathBuf};
use std::process::Command;
use strata::data::prepare::{run, PrepareArgs, Tokenizer};
use strata::data::tokens::TokenFile;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("JSON")
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn bytes_of(v: &serde_json::Value) -> Vec<u8> {
    ids_of(v).into_iter().map(|x| x as u8).collect()
}

/// The tokens and mask of a token file.
fn read(path: &Path, vocab: usize) -> (Vec<u32>, Vec<u8>) {
    let f = TokenFile::open(path, vocab).expect("a token file");
    let (mut ids, mut mask) = (vec![0; f.len()], vec![0; f.len()]);
    f.read(0, &mut ids).expect("tokens");
    f.read_mask(0, &mut mask).expect("mask");
    (ids, mask)
}

fn jsonl(dir: &Path, name: &str, records: &[serde_json::Value]) -> PathBuf {
    let path = dir.join(name);
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).expect("write");
    path
}

fn args(inputs: &[&Path], output: &Path, tokenizer: &Path) -> PrepareArgs {
    PrepareArgs::new(inputs, output, tokenizer.to_str().expect("utf-8"))
}

#[test]
fn token_ids_equal_transformers_for_four_tokenizer_families() {
    let e = expected();
    let corpus: Vec<&str> = e["corpus"]
        .as_array()
        .expect("corpus")
        .iter()
        .map(|l| l.as_str().expect("a line"))
        .collect();
    for name in ["gpt2", "llama3", "qwen", "spm"] {
        let t = Tokenizer::load(fixtures().join(name).to_str().expect("utf-8")).expect(name);
        assert_eq!(
            t.vocab_size() as u64,
            e["vocab_size"][name].as_u64().expect("vocab"),
            "{name}"
        );
        for (line, want) in corpus.iter().zip(e["ids"][name].as_array().expect("ids")) {
            let mut ids = t.prefix().to_vec();
            t.encode(line, &mut ids, None).expect("encode");
            ids.extend_from_slice(t.suffix());
            assert_eq!(ids, ids_of(want), "{name}: {line:?}");
        }
    }
}

#[test]
fn text_records_are_packed_with_eos_between_documents() {
    let e = expected();
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = e["corpus"].as_array().expect("corpus");
    let records: Vec<_> = corpus
        .iter()
        .map(|l| serde_json::json!({"text": l, "id": 1}))
        .collect();
    let input = jsonl(dir.path(), "docs.jsonl", &records);
    for (name, eos) in [
        ("gpt2", "<|endoftext|>"),
        ("llama3", "<|eot_id|>"),
        ("spm", "</s>"),
    ] {
        let tok = fixtures().join(name);
        let t = Tokenizer::load(tok.to_str().expect("utf-8")).expect("tokenizer");
        let eos = t.token_id(eos).expect("eos");
        let out = dir.path().join(format!("{name}/train.bin"));
        let report = run(&args(&[&input], &out, &tok)).expect("prepare");
        let mut want = Vec::new();
        for (line, ids) in corpus.iter().zip(e["ids"][name].as_array().expect("ids")) {
            // An empty text is no document; each other ends with EOS.
            if line.as_str() != Some("") {
                want.extend(ids_of(ids));
                want.push(eos);
            }
        }
        let (got, mask) = read(&out, t.vocab_size());
        assert_eq!(got, want, "{name}");
        assert!(mask.iter().all(|&m| m == 1), "text trains on every token");
        assert!(!report.train.layout.masked);
        assert_eq!(report.train.documents, corpus.len() - 1, "{name}");
    }
}

#[test]
fn chat_records_equal_apply_chat_template_and_its_assistant_mask() {
    let e = expected();
    let dir = tempfile::tempdir().expect("tempdir");
    let convs = e["conversations"].as_array().expect("conversations");
    let records: Vec<_> = convs
        .iter()
        .map(|c| serde_json::json!({"messages": c}))
        .collect();
    let input = jsonl(dir.path(), "chat.jsonl", &records);
    let plain = fixtures().join("llama3_plain.jinja");
    for (case, tokenizer, eos, template) in [
        ("llama3", "llama3", "<|eot_id|>", None),
        ("qwen", "qwen", "<|im_end|>", None),
        ("llama3_plain", "llama3", "<|eot_id|>", Some(&plain)),
    ] {
        let tok = fixtures().join(tokenizer);
        let t = Tokenizer::load(tok.to_str().expect("utf-8")).expect("tokenizer");
        let eos = t.token_id(eos).expect("eos");
        let out = dir.path().join(format!("{case}.bin"));
        let mut a = args(&[&input], &out, &tok);
        a.template = template.cloned();
        let report = run(&a).expect("prepare");
        let (mut want_ids, mut want_mask) = (Vec::new(), Vec::new());
        for c in e["chats"][case].as_array().expect("chats") {
            let ids = ids_of(&c["ids"]);
            want_mask.extend(bytes_of(&c["mask"]));
            // The separator after a conversation that does not end with EOS is not a target.
            if ids.last() != Some(&eos) {
                want_mask.push(0);
            }
            let ends_with_eos = ids.last() == Some(&eos);
            want_ids.extend(ids);
            if !ends_with_eos {
                want_ids.push(eos);
            }
        }
        let (ids, mask) = read(&out, t.vocab_size());
        assert_eq!(ids, want_ids, "{case}");
        assert_eq!(mask, want_mask, "{case}");
        assert!(report.train.layout.masked);
        assert_eq!(
            report.train.masked,
            want_mask.iter().filter(|&&m| m == 0).count()
        );
    }
}

#[test]
fn mask_prompt_trains_on_the_completion_and_its_eos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = fixtures().join("gpt2");
    let t = Tokenizer::load(tok.to_str().expect("utf-8")).expect("tokenizer");
    let (prompt, completion) = (
        "Question: what is the capital of France? Answer:",
        " Paris.",
    );
    let input = jsonl(
        dir.path(),
        "pc.jsonl",
        &[serde_json::json!({"prompt": prompt, "completion": completion})],
    );
    let out = dir.path().join("pc.bin");
    let mut a = args(&[&input], &out, &tok);
    a.mask_prompt = true;
    run(&a).expect("prepare");
    let (ids, mask) = read(&out, t.vocab_size());
    let (mut p, mut whole) = (Vec::new(), Vec::new());
    t.encode(prompt, &mut p, None).expect("encode");
    t.encode(&format!("{prompt}{completion}"), &mut whole, None)
        .expect("encode");
    assert_eq!(ids[..whole.len()], whole[..]);
    assert_eq!(ids.len(), whole.len() + 1, "EOS after the completion");
    // The prompt's tokens (the ones its own encoding shares with the whole) are not targets; the rest are.
    let shared = p.iter().zip(&whole).take_while(|(a, b)| a == b).count();
    assert!(shared > 3);
    assert!(mask[..shared].iter().all(|&m| m == 0), "{mask:?}");
    assert!(mask[shared..].iter().all(|&m| m == 1), "{mask:?}");
    // Without --mask-prompt the pair is one text, every token a target.
    a.mask_prompt = false;
    run(&a).expect("prepare");
    let (plain, mask) = read(&out, t.vocab_size());
    assert_eq!(plain, ids);
    assert!(mask.iter().all(|&m| m == 1));
}

#[test]
fn val_fraction_holds_out_every_nth_document_beside_the_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let records: Vec<_> = (0..10)
        .map(|i| serde_json::json!({"text": format!("document number {i}")}))
        .collect();
    let input = jsonl(dir.path(), "docs.jsonl", &records);
    let out = dir.path().join("out/train.bin");
    let mut a = PrepareArgs::new(&[&input], &out, "gpt2");
    a.val_fraction = 0.2;
    let report = run(&a).expect("prepare");
    let val = report.val.expect("a validation file");
    assert_eq!(
        val.path,
        dir.path()
            .join("out/train_val.bin")
            .canonicalize()
            .expect("exists")
    );
    assert_eq!((report.train.documents, val.documents), (8, 2));
    let (train_ids, _) = read(&out, 50257);
    let (val_ids, _) = read(&val.path, 50257);
    let doc = |i: usize| {
        let t = Tokenizer::load("gpt2").expect("gpt2");
        let mut ids = Vec::new();
        t.encode(&format!("document number {i}"), &mut ids, None)
            .expect("encode");
        ids.push(50256);
        ids
    };
    // Documents 4 and 9 (k with ⌊0.2(k+1)⌋ > ⌊0.2k⌋) are held out.
    assert_eq!(val_ids, [doc(4), doc(9)].concat());
    let kept: Vec<u32> = [0, 1, 2, 3, 5, 6, 7, 8]
        .iter()
        .flat_map(|&i| doc(i))
        .collect();
    assert_eq!(train_ids, kept);
    // The same with 1 thread: the output does not depend on the thread count.
    a.threads = Some(1);
    run(&a).expect("prepare");
    assert_eq!(read(&out, 50257).0, kept);
    // Too few documents for one to be held out: an error, and no training file is left either.
    let lone = jsonl(dir.path(), "lone.jsonl", &records[..2]);
    let lone_out = dir.path().join("lone/train.bin");
    let mut b = PrepareArgs::new(&[&lone], &lone_out, "gpt2");
    b.val_fraction = 0.2;
    let e = run(&b).expect_err("no held-out document").to_string();
    assert!(e.contains("no tokens for the validation file"), "{e}");
    assert!(!dir.path().join("lone").exists());
}

/// What is left in `dir` besides `keep`.
fn leftovers(dir: &Path, keep: &[&Path]) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| !keep.contains(&p.as_path()))
        .collect()
}

#[test]
fn bad_input_is_one_error_naming_file_and_line_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = fixtures().join("llama3");
    let good = serde_json::json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}).to_string();
    let bad_template = dir.path().join("bad.jinja");
    std::fs::write(
        &bad_template,
        "{{ raise_exception('no system messages here') }}",
    )
    .expect("write");
    let broken_tokenizer = dir.path().join("broken");
    std::fs::create_dir(&broken_tokenizer).expect("mkdir");
    std::fs::write(broken_tokenizer.join("tokenizer.json"), "{\"model\": 3}").expect("write");
    let cases: Vec<(&str, String, Option<&Path>, PathBuf, &str)> = vec![
        (
            "not-json",
            format!("{good}\n{{\"messages\": [\n"),
            None,
            tok.clone(),
            ":2: not JSON",
        ),
        (
            "no-field",
            format!("{good}\n\n{{\"body\": \"x\"}}\n"),
            None,
            tok.clone(),
            ":3: no field \"text\" (this record has the fields \"body\")",
        ),
        (
            "role",
            "{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}\n".to_string(),
            None,
            tok.clone(),
            ":1: message 0 has the unknown role \"wizard\"",
        ),
        (
            "template",
            format!("{good}\n"),
            Some(bad_template.as_path()),
            tok.clone(),
            ":1: the chat template",
        ),
        (
            "tokenizer",
            format!("{good}\n"),
            None,
            broken_tokenizer.clone(),
            "not a tokenizer.json this version reads",
        ),
    ];
    let keep = [bad_template.as_path(), broken_tokenizer.as_path()];
    for (name, text, template, tokenizer, needle) in cases {
        let input = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&input, text).expect("write");
        let out = dir.path().join(format!("made/{name}/out.bin"));
        let mut a = args(&[&input], &out, &tokenizer);
        a.template = template.map(Path::to_path_buf);
        a.val_fraction = 0.5;
        let e = run(&a).expect_err("an error").to_string();
        assert!(e.contains(needle), "{name}: {e}");
        if name != "tokenizer" {
            assert!(e.starts_with(&input.display().to_string()), "{name}: {e}");
        }
        if name == "template" {
            assert!(e.contains("no system messages here"), "{e}");
        }
        assert_eq!(e.lines().count(), 1, "{name}: {e}");
        std::fs::remove_file(&input).expect("rm");
        // Neither a token file, nor a temporary one, nor the directories it created.
        assert_eq!(
            leftovers(dir.path(), &keep),
            Vec::<PathBuf>::new(),
            "{name}"
        );
    }
    // A binary file as text: the line and offset of the first invalid byte.
    let binary = dir.path().join("image.png");
    std::fs::write(&binary, b"line one\nline two\n\x89PNG\x00\xff").expect("write");
    let out = dir.path().join("made/out.bin");
    let e = run(&PrepareArgs::new(&[&binary], &out, "bytes"))
        .expect_err("an error")
        .to_string();
    assert!(
        e.starts_with(&format!(
            "{}:3: not UTF-8 text: invalid byte at offset 18",
            binary.display()
        )),
        "{e}"
    );
    std::fs::remove_file(&binary).expect("rm");
    assert_eq!(leftovers(dir.path(), &keep), Vec::<PathBuf>::new());
}

#[test]
fn several_inputs_and_a_pattern_are_read_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in [("b.txt", "bb"), ("a.txt", "aa"), ("c.md", "cc")] {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    let out = dir.path().join("out.bin");
    let pattern = dir.path().join("*.txt");
    let c = dir.path().join("c.md");
    let mut a = PrepareArgs::new(&[&c], &out, "bytes");
    a.inputs.insert(0, pattern.display().to_string());
    run(&a).expect("prepare");
    assert_eq!(read(&out, 256).0, b"aabbcc".map(u32::from));
    a.inputs = vec![dir.path().join("*.none").display().to_string()];
    let e = run(&a).expect_err("an error").to_string();
    assert!(e.contains("matches no file"), "{e}");
}

fn parquet_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parquet")
}

#[test]
fn parquet_rows_make_the_tokens_of_the_same_records_as_json_lines() {
    // Each parquet file (several row groups) and the JSON lines pyarrow reads back from it must make
    // byte-identical token files (ids and mask): text, another column by --field, chats, prompt/completion.
    let dir = tempfile::tempdir().expect("tempdir");
    // (table, compressions, tokenizer, --field, --mask-prompt)
    type Case<'a> = (&'a str, &'a [&'a str], &'a str, Option<&'a str>, bool);
    let cases: [Case; 7] = [
        ("text", &["snappy", "zstd", "gzip"], "gpt2", None, false),
        ("text", &["snappy", "zstd"], "spm", Some("body"), false),
        ("chat", &["snappy", "zstd"], "llama3", None, false),
        ("chat", &["snappy", "zstd"], "qwen", None, false),
        ("pc", &["snappy", "zstd"], "gpt2", None, true),
        ("pc", &["zstd"], "gpt2", None, false),
        ("pc", &["snappy"], "llama3", Some("completion"), false),
    ];
    for (table, compressions, tokenizer, field, mask_prompt) in cases {
        let tok = fixtures().join(tokenizer);
        let run_on = |input: &Path, out: &Path| {
            let mut a = args(&[input], out, &tok);
            a.field = field.map(str::to_string);
            a.mask_prompt = mask_prompt;
            let report = run(&a).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
            let bytes = std::fs::read(out).expect("the token file");
            (report.train.documents, report.train.masked, bytes)
        };
        let case = format!("{table} {tokenizer} {field:?} mask_prompt={mask_prompt}");
        let want = run_on(
            &parquet_fixtures().join(format!("{table}.jsonl")),
            &dir.path().join("jsonl.bin"),
        );
        assert!(want.0 > 2 && want.2.len() > 100, "{case}");
        for compression in compressions {
            let input = parquet_fixtures().join(format!("{table}.{compression}.parquet"));
            let got = run_on(&input, &dir.path().join(format!("{compression}.bin")));
            assert_eq!(got, want, "{case}: {compression}");
        }
    }
}

#[test]
fn a_pattern_mixes_json_lines_and_parquet_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = fixtures().join("llama3");
    let t = Tokenizer::load(tok.to_str().expect("utf-8")).expect("tokenizer");
    let inputs = [
        ("a.jsonl", "text.jsonl"),
        ("b.parquet", "chat.zstd.parquet"),
        ("c.parquet", "pc.snappy.parquet"),
    ];
    let (mut want_ids, mut want_mask) = (Vec::new(), Vec::new());
    for (name, fixture) in inputs {
        let input = dir.path().join(name);
        std::fs::copy(parquet_fixtures().join(fixture), &input).expect("copy");
        let out = dir.path().join(format!("{name}.bin"));
        run(&args(&[&input], &out, &tok)).expect("prepare");
        let (ids, mask) = read(&out, t.vocab_size());
        want_ids.extend(ids);
        want_mask.extend(mask);
    }
    let out = dir.path().join("all.bin");
    let pattern = dir.path().join("*.*[lt]");
    let report = run(&args(&[&pattern], &out, &tok)).expect("prepare");
    assert_eq!(report.train.documents, 13 + 4 + 5);
    assert_eq!(read(&out, t.vocab_size()), (want_ids, want_mask));
}

#[test]
fn bad_parquet_is_one_error_naming_file_and_row_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = fixtures().join("gpt2");
    let text = std::fs::read(parquet_fixtures().join("text.snappy.parquet")).expect("fixture");
    // The first data page's bytes (after the magic and the page header) scrambled: its row group cannot be
    // decoded. The footer still reads, so the error names the first row of that row group.
    let mut scrambled = text.clone();
    scrambled[40..120].iter_mut().for_each(|b| *b = !*b);
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        (
            "truncated",
            text[..text.len() / 2].to_vec(),
            None,
            ": not a parquet file, or a truncated one: ",
        ),
        (
            "not-parquet",
            b"{\"text\": \"a JSON line\"}\n".to_vec(),
            None,
            ": not a parquet file, or a truncated one: ",
        ),
        (
            "scrambled",
            scrambled,
            None,
            ": row 1: cannot read it (row group 0)",
        ),
        (
            "no-column",
            text.clone(),
            Some("title"),
            ": row 1: no field \"title\" (this record has the fields \"body\", \"id\", \"text\")",
        ),
        (
            "not-a-string",
            text.clone(),
            Some("id"),
            ": row 1: field \"id\" is not a string",
        ),
        // Row 5, the second row group's second row, has a null `text`; its JSON line says the same.
        (
            "null-text",
            std::fs::read(parquet_fixtures().join("holes.snappy.parquet")).expect("fixture"),
            None,
            ": row 5: field \"text\" is null",
        ),
        (
            "lz4",
            std::fs::read(parquet_fixtures().join("pc.lz4.parquet")).expect("fixture"),
            None,
            ": column \"prompt\" is compressed with LZ4, which strata does not read",
        ),
        (
            "brotli",
            std::fs::read(parquet_fixtures().join("pc.brotli.parquet")).expect("fixture"),
            None,
            ": column \"prompt\" is compressed with Brotli, which strata does not read",
        ),
    ];
    for (name, bytes, field, needle) in cases {
        let input = dir.path().join(format!("{name}.parquet"));
        std::fs::write(&input, bytes).expect("write");
        let out = dir.path().join(format!("made/{name}/out.bin"));
        let mut a = args(&[&input], &out, &tok);
        a.field = field.map(str::to_string);
        a.val_fraction = 0.5;
        let e = run(&a).expect_err("an error").to_string();
        assert!(
            e.starts_with(&format!("{}{needle}", input.display())),
            "{name}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "{name}: {e}");
        std::fs::remove_file(&input).expect("rm");
        // Neither a token file, nor a temporary one, nor the directories it created.
        assert_eq!(leftovers(dir.path(), &[]), Vec::<PathBuf>::new(), "{name}");
    }
    // The JSON line of the null row says the same, by its line number.
    let input = parquet_fixtures().join("holes.jsonl");
    let e = run(&args(&[&input], &dir.path().join("out.bin"), &tok))
        .expect_err("an error")
        .to_string();
    assert_eq!(e, format!("{}:5: field \"text\" is null", input.display()));
}

/// Runs `strata ARGS` and returns its peak resident memory in MiB (from `wait4`'s rusage of that child).
fn peak_rss_mib(args: &[&std::ffi::OsStr]) -> f64 {
    // Reaped by wait4 below, which also gives its rusage.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("strata starts");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 writes it and the status for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet waited for; the pointers are to live locals.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "strata prepare failed"
    );
    usage.ru_maxrss as f64 / 1024.0
}

#[test]
fn a_long_line_without_whitespace_is_tokenized_in_bounded_memory() {
    // 12 MB of one letter. Whole, tiktoken holds ~90 bytes per byte of a word (a 4 MB word: 370 MB; 16 MB:
    // 800 MB and 14 s); in pieces of at most 64 KiB, a few MiB per thread.
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("long.txt");
    let size = 12 << 20;
    std::fs::write(&input, "a".repeat(size)).expect("write");
    let out = dir.path().join("long.bin");
    let peak = peak_rss_mib(&[
        "prepare".as_ref(),
        input.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert!(peak < 300.0, "strata prepare peaked at {peak:.0} MiB");
    // The tokens spell the line, then EOS.
    let (ids, _) = read(&out, 50257);
    assert_eq!(ids.last(), Some(&50256));
    let bpe = tiktoken_rs::r50k_base().expect("GPT-2 BPE");
    let text = bpe.decode_bytes(&ids[..ids.len() - 1]).expect("decodes");
    assert!(text.len() == size && text.iter().all(|&b| b == b'a'));
}

#[test]
fn prepare_help_describes_every_argument() {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["prepare", "--help"])
        .output()
        .expect("strata runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for arg in [
        "<INPUT>...",
        "--output <FILE>",
        "--tokenizer <gpt2|bytes|DIR|FILE>",
        "--field <NAME>",
        "--template <FILE>",
        "--mask-prompt",
        "--val-fraction <F>",
        "--val-output <FILE>",
        "--threads <N>",
    ] {
        // The argument's own line (not the usage line), and the description on it or on the next.
        let is_arg = |l: &&str| l.starts_with("  ") && l.contains(arg);
        let line = help
            .lines()
            .find(is_arg)
            .unwrap_or_else(|| panic!("{arg} is not in:\n{help}"));
        let after = line.split(arg).nth(1).unwrap_or_default().trim();
        let next = help
            .lines()
            .skip_while(|l| !is_arg(l))
            .nth(1)
            .unwrap_or_default()
            .trim();
        assert!(
            after.len() > 10 || (next.len() > 10 && !next.starts_with('-')),
            "{arg} is not described:\n{help}"
        );
    }
}
