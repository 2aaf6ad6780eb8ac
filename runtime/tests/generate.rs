//! `strata generate`: greedy continuations equal transformers' `generate(do_sample=False)` on the
//! same weights (fixtures/generate, made by make_generate.py: a grouped-query LlamaForCausalLM and
//! a GPT2LMHeadModel); a checkpoint and its export continue a prompt alike; text in and out
//! through a tokenizer; bad input refused in one line naming the thing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn generate(model: &Path, prompt: &str, extra: &[&str]) -> Output {
    strata()
        .arg("generate")
        .arg(model)
        .args(["--prompt", prompt, "--device", "cpu"])
        .args(extra)
        .output()
        .expect("run strata")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ids(stdout: &str) -> Vec<u32> {
    stdout
        .split_whitespace()
        .map(|w| w.parse().expect("an id"))
        .collect()
}

fn text(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn greedy_continuations_equal_transformers_generate() {
    let dir = fixtures().join("generate");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).expect("read"))
            .expect("json");
    for name in ["llama", "gpt2"] {
        let model = dir.join(name).join("model.safetensors");
        let case = &expected[name];
        let prompts = case["prompts"].as_array().expect("prompts");
        let generated = case["generated"].as_array().expect("generated");
        for (prompt, want) in prompts.iter().zip(generated) {
            let prompt: Vec<u32> = serde_json::from_value(prompt.clone()).expect("ids");
            let want: Vec<u32> = serde_json::from_value(want.clone()).expect("ids");
            let out = generate(
                &model,
                &text(&prompt),
                &["--max-new-tokens", "20", "--temperature", "0"],
            );
            let got = ids(&ok(&out, name));
            assert_eq!(got, want, "{name}, prompt {prompt:?}");
        }
    }
}

#[test]
fn text_in_and_out_through_a_tokenizer() {
    // GPT-2's tokenizer on the GPT-2 fixture (a vocabulary of 101: ids below 94 are the printable
    // ASCII characters from '!'): the text prompt continues as its ids do, and the text printed
    // is the tokenizer's decoding of the ids.
    let tokenizer = fixtures().join("tokenizers/gpt2");
    let tok = strata::data::prepare::Tokenizer::load(&tokenizer.display().to_string())
        .expect("tokenizer");
    let prompt = "#$%";
    let mut prompt_ids = Vec::new();
    tok.encode(prompt, &mut prompt_ids, None).expect("encode");
    assert!(prompt_ids.iter().all(|&i| i < 101), "{prompt_ids:?}");
    let model = fixtures().join("generate/gpt2/model.safetensors");
    let by_ids = ids(&ok(
        &generate(&model, &text(&prompt_ids), &["--max-new-tokens", "12"]),
        "ids",
    ));
    let out = generate(
        &model,
        prompt,
        &[
            "--max-new-tokens",
            "12",
            "--tokenizer",
            &tokenizer.display().to_string(),
        ],
    );
    let want = tok.decode(&by_ids).expect("decode");
    assert_eq!(ok(&out, "text").trim_end_matches('\n'), want);
}

#[test]
fn sampling_is_seeded_and_differs_from_greedy() {
    let model = fixtures().join("generate/llama/model.safetensors");
    let sample = |seed: &str| {
        ids(&ok(
            &generate(
                &model,
                "1 2 3",
                &[
                    "--max-new-tokens",
                    "20",
                    "--temperature",
                    "1.5",
                    "--top-k",
                    "50",
                    "--top-p",
                    "0.95",
                    "--seed",
                    seed,
                ],
            ),
            "sample",
        ))
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));
    assert_eq!(sample("1").len(), 20);
}

/// A checkpoint and its export (safetensors and config.json) continue a prompt alike.
#[test]
fn a_checkpoint_and_its_export_generate_the_same_tokens() {
    let llama: &[&str] = &[
        "--set",
        "model.arch=\"llama\"",
        "--set",
        "model.intermediate_size=96",
        "--set",
        "model.n_kv_head=2",
    ];
    for (name, arch) in [("gpt2", &[][..]), ("llama", llama)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("ckpt");
        let out = strata()
            .args(["train", "--steps", "3", "--set", "model.n_layer=2"])
            .args([
                "--set",
                &format!("train.checkpoint_dir=\"{}\"", root.display()),
            ])
            .args(["--set", "train.checkpoint_every=0"])
            .args(arch)
            .output()
            .expect("train");
        ok(&out, "train");
        let exported = dir.path().join("hf").join("model.safetensors");
        std::fs::create_dir_all(exported.parent().expect("parent")).expect("mkdir");
        let out = strata()
            .arg("export")
            .arg(&root)
            .arg("-o")
            .arg(&exported)
            .output()
            .expect("export");
        ok(&out, "export");
        let args = ["--max-new-tokens", "16"];
        let from_checkpoint = ids(&ok(&generate(&root, "5 6 7 8", &args), name));
        let from_export = ids(&ok(&generate(&exported, "5 6 7 8", &args), name));
        assert_eq!(from_checkpoint.len(), 16, "{name}");
        assert_eq!(from_checkpoint, from_export, "{name}");
    }
}

/// One line on stderr naming the thing, and a failing status.
fn refused(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
}

#[test]
fn bad_input_is_refused_naming_it() {
    let model = fixtures().join("generate/gpt2/model.safetensors");
    let config = fixtures().join("generate/gpt2/config.json");
    refused(
        &generate(&config, "1 2", &[]),
        &["MODEL", "config.json", "neither a strata checkpoint"],
    );
    let long = text(&(0..65).collect::<Vec<_>>());
    refused(
        &generate(&model, &long, &[]),
        &["--prompt has 65 tokens", "at most 64"],
    );
    refused(
        &generate(&model, "1 101", &[]),
        &["token id 101", "vocabulary of 101"],
    );
    refused(
        &generate(&model, "hello world", &[]),
        &["--prompt is text", "no tokenizer.json", "--tokenizer"],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let lone = dir.path().join("model.safetensors");
    std::fs::copy(&model, &lone).expect("copy");
    refused(
        &generate(&lone, "1 2", &[]),
        &["model.safetensors", "no config.json beside it"],
    );
}
