//! `strata-bench train --json`: the row's step-time median and spread agree with the per-step times it
//! prints, MFU follows `--peak-tflops` (none detected on the CPU), and `--trace` writes a timeline.

use serde_json::Value;
use std::process::Command;

const SMALL: [&str; 12] = [
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_embd=32",
    "--set",
    "model.n_head=2",
    "--set",
    "model.seq_len=32",
    "--set",
    "data.micro_batch_size=4",
    "--set",
    "train.device=\"cpu\"",
];

/// The JSON row and the step times (ms) of the timed steps, as printed on stderr.
fn bench(extra: &[&str]) -> (Value, Vec<f64>) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata-bench"))
        .args(["train", "--steps", "5", "--warmup", "1", "--json"])
        .args(SMALL)
        .args(extra)
        .output()
        .expect("run strata-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let row: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    // "step 3: loss 5.5 2.1 ms 12345.6 tokens/s"; step 0 is the warm-up.
    let times = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter(|l| !l.starts_with("0:"))
        .map(|l| {
            let ms = l.split(" ms").next().and_then(|s| s.rsplit(' ').next());
            ms.and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("step line: {l}"))
        })
        .collect();
    (row, times)
}

#[test]
fn a_row_gives_the_median_and_spread_of_its_steps_and_mfu_against_the_given_peak() {
    let (row, mut times) = bench(&[]);
    assert_eq!(times.len(), 5);
    assert_eq!(row["steps_timed"], 5);
    times.sort_by(f64::total_cmp);
    let get = |key: &str| {
        row[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} in {row}"))
    };
    // The printed times have one decimal: the row's are exact.
    let close = |a: f64, b: f64| (a - b).abs() <= 0.05 + 1e-9;
    assert!(close(get("step_ms_median"), times[2]), "{row} vs {times:?}");
    assert!(close(get("step_ms_min"), times[0]) && close(get("step_ms_max"), times[4]));
    // numpy's linear percentiles of 5 values: p10 = x0 + 0.4 (x1 - x0), p90 = x3 + 0.6 (x4 - x3).
    let (p10, p90) = (get("step_ms_p10"), get("step_ms_p90"));
    assert!(
        get("step_ms_min") <= p10 && p10 <= get("step_ms_median"),
        "{row}"
    );
    assert!(
        get("step_ms_median") <= p90 && p90 <= get("step_ms_max"),
        "{row}"
    );
    assert!(
        close(p10, times[0] + 0.4 * (times[1] - times[0])),
        "{row} vs {times:?}"
    );
    assert!(
        close(p90, times[3] + 0.6 * (times[4] - times[3])),
        "{row} vs {times:?}"
    );
    // No peak on the CPU unless given.
    assert!(
        row["mfu"].is_null() && row["peak_tflops"].is_null(),
        "{row}"
    );

    let (row, _) = bench(&["--peak-tflops", "0.5"]);
    assert_eq!(row["peak_tflops"], 0.5);
    assert_eq!(row["peak_source"], "--peak-tflops");
    let (mfu, tflops) = (
        row["mfu"].as_f64().expect("mfu"),
        row["tflops"].as_f64().expect("tflops"),
    );
    assert!((mfu - tflops / 0.5).abs() < 1e-12, "{row}");
}

#[test]
fn trace_writes_a_timeline_of_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.json");
    let trace = path.to_str().expect("utf-8");
    bench(&["--trace", trace]);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("trace")).expect("JSON");
    let events = json["traceEvents"].as_array().expect("traceEvents");
    let count = |name: &str| {
        events
            .iter()
            .filter(|e| e["ph"] == "X" && e["name"] == name)
            .count()
    };
    assert!(
        count("matmul_forward") > 0 && count("copy_h2d") > 0,
        "{json}"
    );
}

/// Issue 27: the trace is an output checked before the run, not a file truncated at start-up.
#[test]
fn a_trace_path_that_is_an_input_is_refused_and_left_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("run.toml");
    std::fs::write(&config, "[train]\nsteps = 3\n").expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_strata-bench"))
        .args(["train", "--steps", "1", "--warmup", "0", "--config"])
        .arg(&config)
        .args(SMALL)
        .arg("--trace")
        .arg(&config)
        .output()
        .expect("run strata-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--trace = {} is the input the config file",
            config.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).ok().as_deref(),
        Some("[train]\nsteps = 3\n")
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn time_limit_stops_after_the_first_timed_step_past_it_and_says_so() {
    // Past the limit from the start: the warm-up step still runs, then one timed step.
    let (row, times) = bench(&["--time-limit", "0"]);
    assert_eq!(row["steps_timed"], 1, "{row}");
    assert_eq!(row["time_limited"], true, "{row}");
    assert_eq!(times.len(), 1, "{row}");
    assert!(row["tflops"].as_f64().is_some_and(|t| t > 0.0), "{row}");
    // A generous limit changes nothing.
    let (row, times) = bench(&["--time-limit", "600"]);
    assert_eq!((row["steps_timed"].as_u64(), times.len()), (Some(5), 5));
    assert_eq!(row["time_limited"], false, "{row}");
}
