//! `train.tensorboard_dir`: the event file of a real 2-rank run, read back by a decoder written here from the
//! formats' specifications — TFRecord framing with masked CRC32C (TensorFlow's record_writer.cc, crc32c.h)
//! and the `Event`/`Summary` protobufs (event.proto, summary.proto) — against the run's metrics file.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// TensorFlow's masked CRC: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
#[allow(clippy::manual_rotate)]
fn masked(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// The records of a TFRecord file, after checking both CRCs of each.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        assert!(
            at + 12 <= bytes.len(),
            "a record header cut off at byte {at}"
        );
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        assert_eq!(
            u32_at(bytes, at + 8),
            masked(len_bytes),
            "length CRC of the record at byte {at}"
        );
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(
            u32_at(bytes, at + 12 + len),
            masked(data),
            "data CRC of the record at byte {at}"
        );
        out.push(data);
        at += 12 + len + 4;
    }
    assert_eq!(at, bytes.len());
    out
}

/// A protobuf field's value.
#[derive(Debug, Clone)]
enum Wire<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = bytes[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return v;
        }
    }
    panic!("varint longer than 10 bytes");
}

/// Every (field number, value) of a message, in order.
fn fields(bytes: &[u8]) -> Vec<(u64, Wire<'_>)> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        let key = varint(bytes, &mut at);
        let value = match key & 7 {
            0 => Wire::Varint(varint(bytes, &mut at)),
            1 => {
                at += 8;
                Wire::Fixed64(bytes[at - 8..at].try_into().expect("8"))
            }
            2 => {
                let len = varint(bytes, &mut at) as usize;
                at += len;
                Wire::Bytes(&bytes[at - len..at])
            }
            5 => {
                at += 4;
                Wire::Fixed32(bytes[at - 4..at].try_into().expect("4"))
            }
            wire => panic!("wire type {wire}"),
        };
        out.push((key >> 3, value));
    }
    out
}

struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    scalars: BTreeMap<String, f32>,
}

fn decode(data: &[u8]) -> Event {
    let mut event = Event {
        wall_time: f64::NAN,
        step: 0,
        file_version: None,
        scalars: BTreeMap::new(),
    };
    for (field, value) in fields(data) {
        match (field, value) {
            (1, Wire::Fixed64(b)) => event.wall_time = f64::from_le_bytes(b),
            (2, Wire::Varint(v)) => event.step = v as i64,
            (3, Wire::Bytes(b)) => {
                event.file_version = Some(String::from_utf8(b.to_vec()).expect("utf-8"))
            }
            (5, Wire::Bytes(summary)) => {
                for (field, value) in fields(summary) {
                    let (1, Wire::Bytes(v)) = (field, value) else {
                        panic!("Summary field {field}");
                    };
                    let (mut tag, mut simple) = (None, None);
                    for (field, value) in fields(v) {
                        match (field, value) {
                            (1, Wire::Bytes(t)) => {
                                tag = Some(String::from_utf8(t.to_vec()).expect("utf-8"))
                            }
                            (2, Wire::Fixed32(f)) => simple = Some(f32::from_le_bytes(f)),
                            other => panic!("Summary.Value field {other:?}"),
                        }
                    }
                    event
                        .scalars
                        .insert(tag.expect("tag"), simple.expect("simple_value"));
                }
            }
            other => panic!("Event field {other:?}"),
        }
    }
    event
}

fn read_metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("metrics file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[test]
fn rank_0_writes_one_event_file_of_the_runs_scalars() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("tb/run1");
    let metrics = dir.path().join("metrics.jsonl");
    let set = |kv: String| ["--set".to_string(), kv];
    let mut args: Vec<String> = ["train", "--nproc", "2", "--steps", "5"]
        .map(String::from)
        .to_vec();
    for kv in [
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "model.seq_len=32",
        "data.micro_batch_size=4",
        "dist.backend=\"shm\"",
        "data.val=\"synthetic\"",
        "train.eval_every=2",
        "train.eval_batches=2",
    ] {
        args.extend(set(kv.to_string()));
    }
    args.extend(set(format!("train.tensorboard_dir={}", logdir.display())));
    args.extend(set(format!("train.metrics_file={}", metrics.display())));
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(&args)
        .output()
        .expect("run strata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // One file (rank 0's), named as TensorBoard looks for it.
    let files: Vec<_> = std::fs::read_dir(&logdir)
        .expect("logdir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");

    let bytes = std::fs::read(&files[0]).expect("event file");
    let events: Vec<Event> = records(&bytes).into_iter().map(decode).collect();
    assert_eq!(events.len(), 6, "file_version, then one event per step");
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    let wall: Vec<f64> = events.iter().map(|e| e.wall_time).collect();
    assert!(wall.windows(2).all(|w| w[0] <= w[1]), "{wall:?}");
    assert!(
        wall[0] >= started.floor() - 1.0 && wall[5] < started + 600.0,
        "{wall:?} vs {started}"
    );

    let lines = read_metrics(&metrics);
    assert_eq!(lines.len(), 5);
    for (event, line) in events[1..].iter().zip(&lines) {
        assert_eq!(event.step, line["step"].as_i64().expect("step"));
        let as_f32 = |key: &str| line[key].as_f64().map(|v| v as f32);
        let mut expected = BTreeMap::from([
            ("train/loss", as_f32("loss")),
            ("train/lr", as_f32("lr")),
            ("train/grad_norm", as_f32("grad_norm")),
            ("perf/tokens_per_s", as_f32("tokens_per_s")),
            ("perf/tflops", as_f32("tflops")),
            ("perf/step_ms", as_f32("step_ms")),
        ]);
        // The validation loss at steps 2 and 4 (eval_every) and 5 (the last).
        if [2, 4, 5].contains(&event.step) {
            expected.insert("val/loss", as_f32("val_loss"));
        }
        let expected: BTreeMap<String, f32> = expected
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.unwrap_or_else(|| panic!("step {}: no {k} in {line}", event.step)),
                )
            })
            .collect();
        // Rank 0's tiers and I/O: every step, beside the metrics' scalars.
        let (metrics_part, io): (BTreeMap<String, f32>, BTreeMap<String, f32>) = event
            .scalars
            .clone()
            .into_iter()
            .partition(|(k, _)| expected.contains_key(k));
        assert_eq!(metrics_part, expected, "step {}", event.step);
        let io_keys: Vec<&str> = io.keys().map(String::as_str).collect();
        assert_eq!(
            io_keys,
            [
                "io/d2h_gbps",
                "io/h2d_gbps",
                "io/nvme_read_gbps",
                "io/nvme_write_gbps",
                "perf/compute_wait_fraction",
                "tiers/device_bytes",
                "tiers/host_bytes",
                "tiers/nvme_bytes",
            ],
            "step {}",
            event.step
        );
        // The embedded default keeps its states on NVMe: every step reads and writes there.
        assert!(
            io["tiers/nvme_bytes"] > 0.0 && io["io/nvme_read_gbps"] > 0.0,
            "{io:?}"
        );
        assert!(
            (0.0..=1.0).contains(&io["perf/compute_wait_fraction"]),
            "{io:?}"
        );
    }
}

#[test]
fn an_unwritable_tensorboard_dir_names_the_key_and_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "not a directory").expect("write");
    let logdir = blocker.join("tb");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["train", "--steps", "1", "--set"])
        .arg(format!("train.tensorboard_dir={}", logdir.display()))
        .output()
        .expect("run strata");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "error: train.tensorboard_dir: cannot create the TensorBoard directory {}: ",
        logdir.display()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
}
