use super::tokens::{write_token_file, TokenFile, HEADER_BYTES};
use super::*;
use std::io::Write;

fn write_raw(dir: &Path, name: &str, header: [i32; 3], tokens: &[u16], cut: usize) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = Vec::new();
    let mut h = [0i32; 256];
    h[..3].copy_from_slice(&header);
    h.iter()
        .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    tokens
        .iter()
        .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    bytes.truncate(bytes.len() - cut);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    path
}

#[test]
fn header_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let toks: Vec<u16> = (0..100).collect();
    let bad_magic = write_raw(dir.path(), "magic.bin", [1234, 1, 100], &toks, 0);
    let e = TokenFile::open(&bad_magic, 256).err().unwrap().to_string();
    assert!(
        e.contains("magic.bin") && e.contains("bad magic 1234"),
        "{e}"
    );
    let bad_version = write_raw(dir.path(), "version.bin", [tokens::MAGIC, 7, 100], &toks, 0);
    let e = TokenFile::open(&bad_version, 256)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("version 7"), "{e}");
    let truncated = write_raw(dir.path(), "trunc.bin", [tokens::MAGIC, 1, 100], &toks, 10);
    let e = TokenFile::open(&truncated, 256).err().unwrap().to_string();
    assert!(e.contains("truncated") && e.contains("100 tokens"), "{e}");
    let short = write_raw(dir.path(), "short.bin", [tokens::MAGIC, 1, 100], &[], 1000);
    let e = TokenFile::open(&short, 256).err().unwrap().to_string();
    assert!(e.contains("header"), "{e}");
    let ok = write_raw(dir.path(), "vocab.bin", [tokens::MAGIC, 1, 100], &toks, 0);
    let e = TokenFile::open(&ok, 50).err().unwrap().to_string();
    assert!(
        e.contains("token 50 at index 50")
            && e.contains(&format!("byte offset {}", HEADER_BYTES + 100)),
        "{e}"
    );
    assert_eq!(TokenFile::open(&ok, 100).unwrap().len(), 100);
    let e = TokenFile::open(&dir.path().join("missing.bin"), 10)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing.bin"), "{e}");
}

#[test]
fn sequential_batches_follow_the_llmc_rule_and_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let toks: Vec<u32> = (0..30).collect();
    let path = dir.path().join("seq.bin");
    write_token_file(&path, &toks, None, 64).unwrap();
    // B=2, T=4: 8 tokens per micro-batch; ⌊29/8⌋ = 3 micro-batches fit, then it wraps.
    let mut loader = Loader::new(path.to_str().unwrap(), 64, 2, 4, 0, false).unwrap();
    let mut batch = Batch::zeros(2, 4);
    let mut starts = Vec::new();
    for _ in 0..5 {
        loader.fill(&mut batch).unwrap();
        starts.push(batch.inputs[0]);
        assert_eq!(batch.inputs[4], batch.inputs[0] + 4);
        assert_eq!(
            batch.targets[..4],
            [1, 2, 3, 4].map(|d| batch.inputs[0] + d)
        );
    }
    assert_eq!(starts, vec![0, 8, 16, 0, 8]);
    let e = Loader::from_vec(vec![1; 8], 2, 4, 0, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data.micro_batch_size"), "{e}");
}

#[test]
fn shuffled_batches_are_deterministic_windows() {
    let toks: Vec<u16> = (0..1000).collect();
    let mut a = Loader::from_vec(toks.clone(), 3, 5, 42, true).unwrap();
    let mut b = Loader::from_vec(toks, 3, 5, 42, true).unwrap();
    let (mut x, mut y) = (Batch::zeros(3, 5), Batch::zeros(3, 5));
    for _ in 0..4 {
        a.fill(&mut x).unwrap();
        b.fill(&mut y).unwrap();
        assert_eq!(x.inputs, y.inputs);
        for row in 0..3 {
            let r = &x.inputs[row * 5..row * 5 + 5];
            assert!(r.windows(2).all(|w| w[1] == w[0] + 1));
            assert_eq!(x.targets[row * 5 + 4], r[4] + 1);
        }
    }
}

#[test]
fn synthetic_set_is_deterministic_and_in_range() {
    let a = synthetic::synthetic_tokens(97, 5);
    assert_eq!(a, synthetic::synthetic_tokens(97, 5));
    assert!(a.iter().all(|&t| t < 97));
    assert_ne!(a[..100], synthetic::synthetic_tokens(97, 6)[..100]);
    // Qwen's vocabulary needs ids past 65,535.
    let wide = synthetic::synthetic_tokens(151_936, 5);
    assert!(wide.iter().all(|&t| t < 151_936));
    assert!(wide.iter().any(|&t| t > u16::MAX as u32));
}

#[test]
fn prepare_writes_bytes_and_gpt2_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "Hello world").unwrap();
    let out = dir.path().join("bytes.bin");
    let report = prepare::run(&prepare::PrepareArgs::new(&[&input], &out, "bytes")).unwrap();
    // No separator: the bytes tokenizer has no EOS.
    assert_eq!(report.train.layout.count, 11);
    let f = TokenFile::open(&out, 256).unwrap();
    assert_eq!(f.token(0).unwrap(), u32::from(b'H'));
    let out = dir.path().join("gpt2.bin");
    let report = prepare::run(&prepare::PrepareArgs::new(&[&input], &out, "gpt2")).unwrap();
    assert_eq!(report.train.layout.count, 3);
    let f = TokenFile::open(&out, 50257).unwrap();
    // GPT-2 BPE: "Hello" = 15496, " world" = 995, then <|endoftext|> after the document.
    let mut ids = [0u32; 3];
    f.read(0, &mut ids).unwrap();
    assert_eq!(ids, [15496, 995, 50256]);
}

#[test]
fn a_token_file_changed_under_a_loader_is_an_error_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shrinks.bin");
    write_token_file(&path, &(0..100).collect::<Vec<u32>>(), None, 100).unwrap();
    let mut loader = Loader::new(path.to_str().unwrap(), 100, 2, 4, 0, false).unwrap();
    let mut batch = Batch::zeros(2, 4);
    loader.fill(&mut batch).unwrap();
    // Another program cuts the file to 5 tokens: micro-batch 1 starts at token 8, byte offset 1040.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(HEADER_BYTES as u64 + 10))
        .unwrap();
    let e = loader.fill(&mut batch).err().unwrap().to_string();
    assert!(
        e.starts_with(&path.display().to_string())
            && e.contains("cannot read 10 bytes at byte offset 1040: the file is now 1034 bytes long, but its header says 100 tokens (1224 bytes)")
            && e.contains("truncated or replaced while in use"),
        "{e}"
    );
    // Rewritten in place with a token the model cannot embed.
    write_token_file(&path, &[7; 100], None, 100).unwrap();
    let mut loader = Loader::new(path.to_str().unwrap(), 100, 2, 4, 0, false).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[HEADER_BYTES + 2 * 3] = 200;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(&bytes))
        .unwrap();
    let e = loader.fill(&mut batch).err().unwrap().to_string();
    assert!(
        e.contains("token 200 at index 3 (byte offset 1030) is not below model.vocab_size = 100"),
        "{e}"
    );
}

#[test]
fn a_directory_or_fifo_as_token_file_says_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let e = TokenFile::open(dir.path(), 10).err().unwrap().to_string();
    assert_eq!(
        e,
        format!(
            "{} is a directory, not a regular file",
            dir.path().display()
        )
    );
}

#[test]
fn synthetic_validation_stream_is_held_out_from_the_same_chain() {
    let (vocab, seed) = (64, 1337);
    let train = synthetic::synthetic_tokens(vocab, seed);
    let val = synthetic::synthetic_val_tokens(vocab, seed);
    assert_eq!(val, synthetic::synthetic_val_tokens(vocab, seed));
    assert_eq!(val.len(), train.len());
    // Another walk: the streams differ from the start…
    assert_ne!(train[..1000], val[..1000]);
    // …over the same chain: every transition of the validation stream is one of the training stream's
    // (each token has 3 successors; a million training tokens show every one of them).
    let mut seen = vec![false; vocab * vocab];
    train
        .windows(2)
        .for_each(|w| seen[w[0] as usize * vocab + w[1] as usize] = true);
    assert!(val
        .windows(2)
        .all(|w| seen[w[0] as usize * vocab + w[1] as usize]));
    assert!(seen.iter().filter(|&&s| s).count() <= 3 * vocab);
    // A different seed is a different chain: its transitions are not all in this one.
    let other = synthetic::synthetic_val_tokens(vocab, seed + 1);
    assert!(!other
        .windows(2)
        .all(|w| seen[w[0] as usize * vocab + w[1] as usize]));
}

#[test]
fn a_missing_token_file_names_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.bin");
    let mut config = crate::config::Config::default();
    config.data.train = path.display().to_string();
    let e = Loader::from_config(&config).err().unwrap().to_string();
    assert!(
        e.starts_with(&format!(
            "data.train: token file {} does not exist",
            path.display()
        )) && e.contains("strata prepare"),
        "{e}"
    );
    config.data.train = "synthetic".into();
    config.data.val = Some(path.display().to_string());
    let e = Loader::val_from_config(&config).err().unwrap().to_string();
    assert!(e.starts_with("data.val: "), "{e}");
    // Loader::new knows no key.
    let e = Loader::new(&path.display().to_string(), 256, 1, 8, 0, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("token file "), "{e}");
}

fn header_words(path: &Path) -> Vec<i32> {
    let bytes = std::fs::read(path).unwrap();
    bytes[..20]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn wide_and_masked_token_files_round_trip_and_llmc_files_still_read() {
    let dir = tempfile::tempdir().unwrap();
    // Ids past 65,535 (Llama 3's vocabulary): version 2, four bytes per token.
    let wide: Vec<u32> = (0..50).map(|i| 128_200 + i).collect();
    let path = dir.path().join("wide.bin");
    let layout = write_token_file(&path, &wide, None, 128_256).unwrap();
    assert_eq!((layout.token_bytes, layout.masked), (4, false));
    assert_eq!(header_words(&path), [tokens::MAGIC, 2, 50, 4, 0]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024 + 200);
    let f = TokenFile::open(&path, 128_256).unwrap();
    let mut back = vec![0u32; 50];
    f.read(0, &mut back).unwrap();
    assert_eq!(back, wide);
    let e = TokenFile::open(&path, 128_210).err().unwrap().to_string();
    assert!(
        e.contains(
            "token 128210 at index 10 (byte offset 1064) is not below model.vocab_size = 128210"
        ),
        "{e}"
    );

    // A mask: version 2, flag 1, one byte per token after the tokens.
    let ids: Vec<u32> = (0..50).collect();
    let mask: Vec<u8> = (0..50).map(|i| u8::from(i % 3 != 0)).collect();
    let path = dir.path().join("masked.bin");
    let layout = write_token_file(&path, &ids, Some(&mask), 256).unwrap();
    assert_eq!((layout.token_bytes, layout.masked), (2, true));
    assert_eq!(header_words(&path), [tokens::MAGIC, 2, 50, 2, 1]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024 + 100 + 50);
    let f = TokenFile::open(&path, 256).unwrap();
    let mut m = vec![9u8; 50];
    f.read_mask(0, &mut m).unwrap();
    assert_eq!(m, mask);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1024 + 100 + 7] = 2;
    std::fs::write(&path, &bytes).unwrap();
    let e = TokenFile::open(&path, 256).err().unwrap().to_string();
    assert!(
        e.contains("mask byte 2 at index 7 (byte offset 1131) is not 0 or 1"),
        "{e}"
    );

    // An all-ones mask is left out: llm.c's version 1, readable by llm.c.
    let path = dir.path().join("plain.bin");
    let layout = write_token_file(&path, &ids, Some(&[1; 50]), 256).unwrap();
    assert!(!layout.masked);
    assert_eq!(header_words(&path)[..3], [tokens::MAGIC, 1, 50]);

    // llm.c's Llama 3 files: magic 20240801, version 7, uint32 tokens.
    let path = dir.path().join("llmc-llama3.bin");
    let mut bytes = Vec::new();
    let mut h = [0i32; 256];
    h[..3].copy_from_slice(&[tokens::LLMC_LLAMA3_MAGIC, tokens::LLMC_LLAMA3_VERSION, 3]);
    h.iter()
        .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    [128_000u32, 5, 128_001]
        .iter()
        .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    std::fs::write(&path, &bytes).unwrap();
    let f = TokenFile::open(&path, 128_256).unwrap();
    assert_eq!(
        (f.token(0).unwrap(), f.token(2).unwrap()),
        (128_000, 128_001)
    );

    // A version-2 header with an unknown width or flag is refused, naming the word.
    for (words, needle) in [
        (
            [tokens::MAGIC, 2, 3, 3, 0],
            "3 bytes per token at offset 12",
        ),
        (
            [tokens::MAGIC, 2, 3, 2, 6],
            "unknown flags 0x6 at offset 16",
        ),
    ] {
        let path = dir.path().join("bad.bin");
        let mut bytes = vec![0u8; 1024 + 6];
        for (i, w) in words.iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = TokenFile::open(&path, 256).err().unwrap().to_string();
        assert!(e.contains(needle), "{e}");
    }
}

#[test]
fn masked_tokens_become_ignored_targets_and_inputs_stay() {
    let ids: Vec<u32> = (0..33).collect();
    // Tokens 3..6 and 20 are not targets (a prompt, a separator).
    let mask: Vec<u8> = (0..33)
        .map(|i| u8::from(!((3..6).contains(&i) || i == 20)))
        .collect();
    let mut loader = Loader::from_masked(ids, mask.clone(), 2, 8, 0, false).unwrap();
    assert!(loader.masked());
    let mut batch = Batch::zeros(2, 8);
    for _ in 0..2 {
        loader.fill(&mut batch).unwrap();
        for (k, (&x, &y)) in batch.inputs.iter().zip(&batch.targets).enumerate() {
            let next = x as usize + 1;
            assert_eq!(x as usize % 16, k, "inputs are never masked");
            let want = if mask[next] == 0 {
                IGNORE_TARGET
            } else {
                next as u32
            };
            assert_eq!(y, want, "target {k}");
        }
    }
    assert!(batch.targets.contains(&IGNORE_TARGET));
    // Unmasked data has no ignored target.
    let mut plain = Loader::from_vec((0..40).collect(), 2, 8, 0, false).unwrap();
    assert!(!plain.masked());
    plain.fill(&mut batch).unwrap();
    assert!(!batch.targets.contains(&IGNORE_TARGET));
}

#[test]
fn the_rank_loader_reads_every_world_th_micro_batch() {
    let config = crate::config::Config::default();
    let mut whole = Loader::for_rank(&config, 0, 1).unwrap();
    let mut rank1 = Loader::for_rank(&config, 1, 2).unwrap();
    assert_eq!(rank1.rank_and_world(), (1, 2));
    let b = config.data.micro_batch_size;
    let (mut x, mut y) = (
        Batch::zeros(b, config.model.seq_len),
        Batch::zeros(b, config.model.seq_len),
    );
    for _ in 0..3 {
        whole.fill(&mut x).unwrap();
        whole.fill(&mut x).unwrap();
        rank1.fill(&mut y).unwrap();
        assert_eq!(x.inputs, y.inputs);
    }
}

/// A batch of another shape and a rank outside the world are errors that say what to do, not
/// panics (the engine refuses the same mistakes with errors).
#[test]
fn a_batch_of_another_shape_or_a_rank_outside_the_world_is_an_error() {
    let config = crate::config::Config::default();
    let mut loader = Loader::for_rank(&config, 0, 1).unwrap();
    let (b, t) = (config.data.micro_batch_size, config.model.seq_len);
    let mut batch = Batch::zeros(b + 1, t);
    let err = loader.fill(&mut batch).unwrap_err().to_string();
    assert!(err.contains(&format!("Batch::zeros({b}, {t})")), "{err}");
    batch.b = b;
    let err = loader.fill(&mut batch).unwrap_err().to_string();
    assert!(err.contains("targets"), "{err}");
    let Err(err) = Loader::for_rank(&config, 2, 2) else {
        panic!("rank 2 of 2 accepted");
    };
    assert!(
        err.to_string()
            .contains("rank 2 is not below the world size 2"),
        "{err}"
    );
    let Err(err) = Loader::from_masked(vec![1, 2, 3], vec![1, 1], 1, 1, 0, false) else {
        panic!("3 tokens with 2 mask bytes accepted");
    };
    assert!(
        err.to_string().contains("3 tokens but 2 mask bytes"),
        "{err}"
    );
}
