//! The front door's config and command line, against the real binary: every input an error is about is named
//! (the `--set`, the DeepSpeed JSON key, the rendezvous variable), nothing given is silently dropped (a
//! replaced `--set`, an inner `--nproc`), the DeepSpeed JSON keeps the TOML's values for what it leaves out,
//! the rendezvous store listens only where MASTER_ADDR says, and the config reference's defaults are the
//! code's, for a file and for the embedded default.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use strata::config::Config;

fn strata() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    // A launcher's variables in the test's environment must not turn a run into a rank.
    for var in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        c.env_remove(var);
    }
    c
}

fn run(command: &mut Command) -> (Output, String) {
    let out = command.output().expect("run strata");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Runs `strata ARGS`, expecting exit code 1; returns stdout and stderr.
fn fails(command: &mut Command) -> String {
    let (out, text) = run(command);
    assert_eq!(out.status.code(), Some(1), "{text}");
    text
}

/// A model small enough that a step takes milliseconds.
const SMALL: [&str; 8] = [
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_embd=32",
    "--set",
    "model.n_head=2",
    "--set",
    "model.seq_len=16",
];

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn a_set_is_checked_even_when_replaced_and_a_replaced_set_is_said() {
    // A bad value under a --steps that replaces it is an error naming it, not a silent 2-step run.
    let text =
        fails(
            strata()
                .arg("train")
                .args(SMALL)
                .args(["--steps", "2", "--set", "train.steps=1e3"]),
        );
    assert!(
        text.contains(
            "error: --set train.steps=1e3: key `train.steps`: invalid type: floating point"
        ),
        "{text}"
    );
    // A good value replaced by --steps or a later --set: the run says so and runs the last.
    let (out, text) = run(strata().arg("train").args(SMALL).args([
        "--set",
        "train.steps=5",
        "--set",
        "optim.lr=1e-3",
        "--set",
        "optim.lr=2e-3",
        "--steps",
        "2",
        "--print-config",
    ]));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("steps = 2\n"), "{text}");
    // Once each, the shortcut named as typed.
    assert_eq!(
        text.matches("--set train.steps=5 is replaced").count(),
        1,
        "{text}"
    );
    assert!(
        text.contains("--set train.steps=5 is replaced by --steps 2"),
        "{text}"
    );
    assert!(
        text.contains("--set optim.lr=1e-3 is replaced by the later --set optim.lr=2e-3"),
        "{text}"
    );
}

#[test]
fn set_keys_are_toml_dotted_keys_and_errors_name_the_set() {
    let (out, text) =
        run(strata().args(["train", "--set", "\"model\".n_layer=2", "--print-config"]));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("n_layer = 2\n"), "{text}");
    for (set, says) in [
        (
            "\"model\".n_layr=2",
            "error: --set \"model\".n_layr=2: key `model.n_layr`: unknown field `n_layr`",
        ),
        (
            "mdoel.n_layer=2",
            "error: --set mdoel.n_layer=2: key `mdoel`: unknown field `mdoel`",
        ),
        (
            "train.steps=99999999999999999999",
            "is not a TOML value (an integer beyond TOML's range",
        ),
    ] {
        let text = fails(strata().args(["train", "--set", set]));
        assert!(text.contains(says), "{set}: {text}");
        assert!(!text.contains("embedded default"), "{set}: {text}");
    }
}

#[test]
fn nproc_under_a_launcher_is_an_error_not_dropped() {
    let text = fails(
        strata()
            .args(["launch", "--nproc-per-node", "2", "--grace-s", "1", "--"])
            .args([
                env!("CARGO_BIN_EXE_strata"),
                "train",
                "--nproc",
                "2",
                "--steps",
                "1",
            ]),
    );
    assert!(
        text.contains("--nproc 2: this process is already one of 2 ranks started by a launcher"),
        "{text}"
    );
}

#[test]
fn launch_passes_json_lines_through_unprefixed_with_no_prefix() {
    let (out, text) = run(strata().args([
        "launch",
        "--nproc-per-node",
        "2",
        "--no-prefix",
        "--",
        "sh",
        "-c",
        "echo \"{\\\"rank\\\": $RANK}\"",
    ]));
    assert!(out.status.success(), "{text}");
    let mut ranks: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            v["rank"].as_u64().expect("rank")
        })
        .collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1]);
}

#[test]
fn a_wrong_world_size_is_named_before_master_addr() {
    let text = fails(
        strata()
            .args(["train", "--steps", "1"])
            .env("RANK", "0")
            .env("WORLD_SIZE", "0"),
    );
    assert!(
        text.contains("WORLD_SIZE=0: a job needs at least one rank"),
        "{text}"
    );
    assert!(!text.contains("MASTER_ADDR"), "{text}");
}

#[test]
fn deepspeed_errors_name_the_json_and_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("{\"stage\": 3,}", "not valid JSON: trailing comma at line 1 column 13"),
        (
            r#"{"train_micro_batch_size_per_gpu": 18446744073709551615}"#,
            "key `train_micro_batch_size_per_gpu`: 18446744073709551615 is beyond the largest integer",
        ),
        (r#"{"zero_optimization": {"stage": 3, "offload_prm": {}}}"#, "the README's table \"DeepSpeed JSON keys\""),
    ];
    for (i, (json, says)) in cases.iter().enumerate() {
        let ds = write(dir.path(), &format!("ds{i}.json"), json);
        let text = fails(strata().args(["train", "--deepspeed"]).arg(&ds));
        assert!(
            text.contains(&format!("{}: ", ds.display())) && text.contains(says),
            "{json}: {text}"
        );
        assert!(!text.contains("not valid TOML"), "{json}: {text}");
    }
    // A value the JSON left out that a rule needs: the JSON key of that name.
    let toml = write(dir.path(), "model.toml", "[model]\nn_layer = 1\n");
    let ds = write(
        dir.path(),
        "nvme.json",
        r#"{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}, "offload_optimizer": {"device": "cpu"}}}"#,
    );
    let text = fails(strata().arg("train").arg(&toml).arg("--deepspeed").arg(&ds));
    assert!(
        text.contains("`zero_optimization.offload_param.nvme_path` (strata's offload_param.nvme_path): is required"),
        "{text}"
    );
    // bf16 where train.device resolves to the CPU, found by the engine: the JSON key too.
    if !strata::backend::cuda::gpu_available() {
        let ds = write(dir.path(), "bf16.json", r#"{"bf16": {"enabled": true}}"#);
        for command in ["train", "plan"] {
            let text = fails(
                strata()
                    .arg(command)
                    .args(SMALL)
                    .arg("--deepspeed")
                    .arg(&ds),
            );
            assert!(
                text.contains(&format!(
                    "{}: `bf16.enabled` (strata's train.precision): Bf16 needs a GPU",
                    ds.display()
                )),
                "{command}: {text}"
            );
        }
    }
}

#[test]
fn deepspeed_keeps_the_toml_for_what_it_leaves_out_or_calls_auto() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = write(
        dir.path(),
        "model.toml",
        "[zero]\nstage = 3\n[offload_param]\ndevice = \"cpu\"\n[offload_optimizer]\ndevice = \"cpu\"\n",
    );
    for json in [
        r#"{"zero_optimization": {"stage": "auto"}}"#,
        r#"{"zero_optimization": {"overlap_comm": true, "reduce_bucket_size": "auto"}}"#,
    ] {
        let ds = write(dir.path(), "ds.json", json);
        let (out, text) = run(strata()
            .arg("train")
            .arg(&toml)
            .arg("--deepspeed")
            .arg(&ds)
            .arg("--print-config"));
        assert!(out.status.success(), "{json}: {text}");
        let printed: toml::Table =
            toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("TOML");
        assert_eq!(printed["zero"]["stage"].as_integer(), Some(3), "{json}");
        assert_eq!(
            printed["offload_param"]["device"].as_str(),
            Some("cpu"),
            "{json}"
        );
        assert_eq!(
            printed["offload_optimizer"]["device"].as_str(),
            Some("cpu"),
            "{json}"
        );
    }
}

/// The rows of the README's config reference: (keys, default, no CONFIG) with the backticks removed.
fn reference_rows() -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README");
    let mut lines = readme
        .lines()
        .skip_while(|l| !l.starts_with("## Config reference"));
    let header = lines
        .find(|l| l.starts_with("| key |"))
        .expect("the reference table");
    assert_eq!(header, "| key | default | no CONFIG | meaning |");
    let split = |cell: &str| -> Vec<String> {
        if cell.trim().is_empty() {
            return Vec::new();
        }
        cell.split(" / ")
            .map(|p| p.trim().trim_matches('`').to_string())
            .collect()
    };
    lines
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.trim_matches('|').split(" | ").collect();
            let mut keys = split(cells[0]);
            let section = keys[0].split('.').next().expect("section").to_string();
            for k in keys.iter_mut().skip(1) {
                if !k.contains('.') {
                    *k = format!("{section}.{k}");
                }
            }
            (keys, split(cells[1]), split(cells[2]))
        })
        .collect()
}

/// `key`'s value in `config` as TOML, `None` where it is unset.
fn value_of(config: &Config, key: &str) -> Option<toml::Value> {
    let table: toml::Table = toml::from_str(&config.to_toml()).expect("printable");
    let (section, leaf) = key.split_once('.').expect("section.key");
    table.get(section)?.get(leaf).cloned()
}

/// A default as the README writes it, as TOML reads it (`—`: unset).
fn written(text: &str) -> Option<toml::Value> {
    if text == "—" {
        return None;
    }
    let parsed: toml::Table =
        toml::from_str(&format!("v = {text}")).unwrap_or_else(|e| panic!("{text}: {e}"));
    parsed.get("v").cloned()
}

fn same(a: &Option<toml::Value>, b: &Option<toml::Value>) -> bool {
    let number = |v: &toml::Value| v.as_float().or(v.as_integer().map(|i| i as f64));
    match (a, b) {
        (Some(toml::Value::Array(x)), Some(toml::Value::Array(y))) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|(x, y)| same(&Some(x.clone()), &Some(y.clone())))
        }
        (Some(x), Some(y)) => match (number(x), number(y)) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()),
            _ => x == y,
        },
        (None, None) => true,
        _ => false,
    }
}

#[test]
fn the_config_reference_gives_the_defaults_a_file_gets_and_the_embedded_default_s() {
    let library = Config::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = write(dir.path(), "empty.toml", "");
    let from_file = Config::load(Some(&empty), &[]).expect("an empty file loads");
    assert_eq!(
        from_file,
        Config {
            source: from_file.source.clone(),
            ..library.clone()
        }
    );
    let embedded = Config::load(None, &[]).expect("the embedded default loads");
    let rows = reference_rows();
    assert!(rows.len() >= 40, "{} rows", rows.len());
    let mut listed = 0;
    for (keys, defaults, embedded_defaults) in &rows {
        assert_eq!(keys.len(), defaults.len(), "{keys:?}: {defaults:?}");
        for (i, key) in keys.iter().enumerate() {
            let default = written(&defaults[i]);
            assert!(
                same(&value_of(&library, key), &default),
                "{key}: the README says {default:?}"
            );
            let expected = match embedded_defaults.get(i) {
                Some(e) => written(e),
                None => default,
            };
            assert!(
                same(&value_of(&embedded, key), &expected),
                "{key} with no CONFIG: the README says {expected:?}"
            );
            listed += 1;
        }
    }
    // Every key of the tree has a row.
    let table: toml::Table = toml::from_str(&embedded.to_toml()).expect("printable");
    let keys: usize = table
        .values()
        .filter_map(|s| s.as_table())
        .map(|s| s.len())
        .sum();
    assert!(
        listed >= keys,
        "the reference lists {listed} keys, the tree has {keys}"
    );
}

/// The local addresses of the listening TCP sockets of process `pid` (from /proc), as `ip:port`.
fn listening(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    Some(
                        l.to_str()?
                            .strip_prefix("socket:[")?
                            .strip_suffix(']')?
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 0A: LISTEN; the inode is the tenth field.
            (f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9])).then(|| {
                let (ip, port) = f[1].split_once(':').expect("ip:port");
                let ip = u32::from_str_radix(ip, 16).expect("hex").to_le_bytes();
                let port = u16::from_str_radix(port, 16).expect("hex");
                format!("{}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3])
            })
        })
        .collect()
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // The parent is the second field after the command name, which ends at the last ')'.
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

#[test]
fn the_store_and_the_tcp_ring_listen_on_loopback_when_master_addr_is_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = dir.path().join("m.jsonl");
    let mut launcher = strata()
        .args(["train", "--nproc", "2", "--steps", "100000"])
        .args(SMALL)
        .args(["--set", "dist.backend=\"tcp\"", "--set"])
        .arg(format!("train.metrics_file=\"{}\"", metrics.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    // Once rank 0 writes metrics, the store and the ring are up.
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(&metrics).map_or(true, |m| m.len() == 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let children = children_of(launcher.id());
    let addrs: Vec<String> = children.iter().flat_map(|&pid| listening(pid)).collect();
    let _ = launcher.kill();
    let _ = launcher.wait();
    assert_eq!(children.len(), 2, "the ranks of the launcher");
    // Rank 0's store (the ring's listeners close once their peer has connected).
    assert!(!addrs.is_empty(), "{addrs:?}");
    assert!(
        addrs.iter().all(|a| a.starts_with("127.0.0.1:")),
        "{addrs:?}"
    );
}
