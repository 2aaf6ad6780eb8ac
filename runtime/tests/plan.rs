//! `strata plan`: the bytes per state class and tier it prints for the GPT 1.3B and 13B configs
//! against the closed form (P parameters, world N: compute weights X·P/N, fp32 master 4P/N, Adam
//! moments 8P/N, fp32 gradients 4P/N per rank, up to each unit's padding to N × 64 elements), and
//! its verdict when a tier is too small.

use std::path::Path;
use std::process::Command;

/// `strata plan` from the repository root; (exit success, stdout + stderr).
fn plan(args: &[&str]) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .current_dir(&root)
        .arg("plan")
        .args(args)
        .output()
        .expect("run strata plan");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The bytes column of the row `class` on `tier` (0 when the table has no such row).
fn row(table: &str, class: &str, tier: &str) -> u64 {
    table
        .lines()
        .filter(|l| l.starts_with(class))
        .find_map(|l| {
            let rest = l[class.len()..].split_whitespace().collect::<Vec<_>>();
            (rest.first() == Some(&tier)).then(|| rest[1].parse().expect("bytes"))
        })
        .unwrap_or(0)
}

/// GPT-2's parameters: blocks 12C²+13C each, embeddings (V+T)·C, the final LayerNorm 2C.
fn gpt_params(layers: u64, width: u64, vocab: u64, seq: u64) -> u64 {
    layers * (12 * width * width + 13 * width) + (vocab + seq) * width + 2 * width
}

fn check_offloaded(
    table: &str,
    params: u64,
    layers: u64,
    world: u64,
    x_bytes: u64,
    persistent: u64,
) {
    // Every unit (a block, the embeddings, the final LayerNorm) pads to world × 64 elements.
    let slack = (layers + 2) * world * 64;
    let near = |got: u64, want: u64, per: u64, what: &str| {
        assert!(
            got >= want && got <= want + per * slack.div_ceil(world),
            "{what}: {got} bytes, the formula says {want} (+ at most {} of padding):\n{table}",
            per * slack.div_ceil(world)
        );
    };
    // Persistent units keep whole compute weights on the device; the rest are sharded on NVMe.
    assert_eq!(
        row(table, "compute params", "device"),
        x_bytes * persistent,
        "{table}"
    );
    near(
        row(table, "compute params", "nvme"),
        x_bytes * (params - persistent) / world,
        x_bytes,
        "compute params",
    );
    near(
        row(table, "master params (f32)", "nvme"),
        4 * params / world,
        4,
        "master",
    );
    near(
        row(table, "adam m, v", "nvme"),
        8 * params / world,
        8,
        "adam m, v",
    );
    // The host optimizer takes its gradients in host memory (DeepSpeed's layout).
    near(
        row(table, "gradients (f32)", "cpu"),
        4 * params / world,
        4,
        "gradients",
    );
    // The swap files hold the rest, in whole blocks.
    let states = row(table, "compute params", "nvme")
        + row(table, "master params (f32)", "nvme")
        + row(table, "adam m, v", "nvme");
    let swap = row(table, "swap files", "nvme");
    assert!(swap >= states, "swap {swap} < states {states}:\n{table}");
}

const NVME: [&str; 8] = [
    "--set",
    "offload_param.device=\"nvme\"",
    "--set",
    "offload_optimizer.device=\"nvme\"",
    "--set",
    "offload_param.nvme_path=\"/nvme/a\"",
    "--set",
    "offload_optimizer.nvme_path=\"/nvme/a\"",
];

#[test]
fn gpt_1_3b_at_world_8_on_nvme_matches_the_formula() {
    let mut args = vec![
        "configs/gpt-1.3b-h100.toml",
        "--world-size",
        "8",
        "--set",
        "zero.stage=3",
        "--device-memory",
        "80GiB",
        "--host-memory",
        "64GiB",
        "--nvme-bytes",
        "1TiB",
    ];
    args.extend(NVME);
    let (ok, table) = plan(&args);
    assert!(ok, "{table}");
    let params = gpt_params(24, 2048, 50304, 1024);
    assert!(table.contains(&format!("{params} parameters")), "{table}");
    assert!(
        table.contains("parameters on nvme, optimizer states on nvme"),
        "{table}"
    );
    assert!(table.contains("fits this machine"), "{table}");
    // The final LayerNorm (4096 elements) is below zero.param_persistence_threshold.
    check_offloaded(&table, params, 24, 8, 2, 2 * 2048);
}

#[test]
fn gpt_13b_config_at_world_8_matches_the_formula_and_says_what_does_not_fit() {
    let base = [
        "configs/gpt-13b-nvme.toml",
        "--world-size",
        "8",
        "--device-memory",
        "80GiB",
        "--host-memory",
        "100GiB",
    ];
    let (ok, table) = plan(&[&base[..], &["--nvme-bytes", "2TiB"]].concat());
    assert!(ok, "{table}");
    let params = gpt_params(40, 5120, 50304, 2048);
    check_offloaded(&table, params, 40, 8, 2, 2 * 5120);

    // 1 GiB of disk: the NVMe path is named, with what the plan needs there.
    let (ok, text) = plan(&[&base[..], &["--nvme-bytes", "1GiB"]].concat());
    assert!(!ok, "{text}");
    assert!(
        text.contains("does not fit: NVMe: /local_nvme/strata has 1.00 GiB free")
            && text.contains("(offload_param.nvme_path and offload_optimizer.nvme_path)"),
        "{text}"
    );
    // Too little host memory for the pool of staging buffers.
    let (ok, text) = plan(
        &[
            &base[..5],
            &["--host-memory", "1GiB", "--nvme-bytes", "2TiB"],
        ]
        .concat(),
    );
    assert!(
        !ok && text.contains("host memory: the plan needs"),
        "{text}"
    );
    // The device: at world 1 the arena (7.4 GiB: two gathered blocks, a gradient buffer,
    // activations) does not fit 4 GiB.
    let (ok, text) = plan(&[
        "configs/gpt-13b-nvme.toml",
        "--device-memory",
        "4GiB",
        "--host-memory",
        "100GiB",
        "--nvme-bytes",
        "2TiB",
    ]);
    assert!(
        !ok && text.contains("does not fit: device memory: the arena needs"),
        "{text}"
    );
}

#[test]
fn auto_picks_the_fastest_placement_that_fits() {
    // 1.3B on one rank: everything on an 80 GiB device fits only without activations to spare;
    // with 24 GiB the optimizer (and then the parameters) move to the host.
    let run = |device: &str, host: &str| {
        plan(&[
            "configs/gpt-1.3b-h100.toml",
            "--set",
            "zero.stage=3",
            "--set",
            "train.activation_checkpointing=true",
            "--set",
            "offload_param.device=\"auto\"",
            "--set",
            "offload_optimizer.device=\"auto\"",
            "--device-memory",
            device,
            "--host-memory",
            host,
        ])
    };
    let (ok, text) = run("80GiB", "64GiB");
    assert!(
        ok && text.contains("parameters on device, optimizer states on device"),
        "{text}"
    );
    let (ok, text) = run("12GiB", "64GiB");
    assert!(ok, "{text}");
    assert!(
        text.contains("does not fit: parameters on device, optimizer states on device")
            && text.contains("placement for ZeRO stage 3 at world size 1: parameters on device, optimizer states on cpu"),
        "{text}"
    );
}

#[test]
fn auto_keeps_as_much_of_an_nvme_optimizer_in_host_memory_as_fits() {
    // 13B at world 8 with 20 GiB of host memory per rank: the optimizer on the host needs 29 GiB,
    // so auto puts it on NVMe — keeping the largest share of its sub-groups in host memory that
    // leaves a tenth of the host free.
    let (ok, text) = plan(&[
        "configs/gpt-13b-nvme.toml",
        "--world-size",
        "8",
        "--set",
        "offload_optimizer.device=\"auto\"",
        "--set",
        "offload_optimizer.nvme_path=\"/nvme/a\"",
        "--set",
        "offload_param.nvme_path=\"/nvme/a\"",
        "--device-memory",
        "80GiB",
        "--host-memory",
        "20GiB",
        "--nvme-bytes",
        "1TiB",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("does not fit: parameters on nvme, optimizer states on cpu"),
        "{text}"
    );
    let at = text
        .find("optimizer states on nvme (")
        .unwrap_or_else(|| panic!("no split:\n{text}"));
    let share: f64 = text[at + "optimizer states on nvme (".len()..]
        .split('%')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a percentage");
    assert!(share > 20.0 && share < 60.0, "{share}%:\n{text}");
    let table = &text[at..];
    let pool = row(table, "host pool", "cpu");
    assert!(
        pool <= 18 << 30 && pool > 15 << 30,
        "the pool fills 90% of 20 GiB: {pool}\n{text}"
    );
    assert!(row(table, "master params (f32)", "cpu") > 0, "{text}");
}
