use super::*;

fn layout(lens: &[usize], world: usize, stage: u8) -> Vec<(Shard, Placement)> {
    lens.iter()
        .map(|&n| (Shard::new(n, world, 0), Placement::for_stage(stage, n, 0)))
        .collect()
}

#[test]
fn sub_groups_tile_each_shard_on_the_norm_grid() {
    let shards: Vec<Shard> = [100_000, 70_000, 5]
        .iter()
        .map(|&n| Shard::new(n, 2, 1))
        .collect();
    let groups = sub_groups(&shards, 40_000);
    for (u, s) in shards.iter().enumerate() {
        let mine: Vec<&SubGroup> = groups.iter().filter(|g| g.unit == u).collect();
        assert_eq!(mine.iter().map(|g| g.len).sum::<usize>(), s.len);
        assert!(mine
            .iter()
            .all(|g| g.start % NORM_CHUNK == 0 && g.len <= 32_768));
    }
}

#[test]
fn bytes_per_tier_follow_the_formulas() {
    let mut config = Config::default();
    config.zero.stage = 3;
    config.offload_optimizer.sub_group_size = 1 << 20;
    config.aio.block_size = crate::config::ByteSize::mib(1);
    let lay = layout(&[4 << 20, 4 << 20], 4, 3);
    let sizes = PlanSizes {
        layout: &lay,
        x_bytes: 2,
        device_bytes: 1 << 20,
    };
    let elems = 2 * (1 << 20) as u64; // two shards of 1M elements
    let nvme = plan(
        &config,
        4,
        Tiers {
            params: Tier::Nvme,
            optimizer: Tier::Nvme,
        },
        &sizes,
    );
    // fp32 master weights, fp32 m and v, bf16 compute weights: 14 bytes per element on
    // NVMe; the fp32 gradients in host memory.
    assert_eq!(nvme.nvme_bytes, 14 * elems);
    // Plus the staging buffers: 4 optimizer sets of 12 MiB, 4 gradient intake and 4 updated
    // parameter slots, 5 parameter fetch slots (90 MiB with the gradients: one slab).
    assert!(nvme.host_bytes >= 4 * elems && nvme.host_bytes < 4 * elems + (128 << 20));
    let cpu = plan(
        &config,
        4,
        Tiers {
            params: Tier::Host,
            optimizer: Tier::Host,
        },
        &sizes,
    );
    assert_eq!(cpu.nvme_bytes, 0);
    assert!(cpu.host_bytes >= 18 * elems && cpu.host_bytes < 18 * elems + (64 << 20));
    let rows: u64 = cpu.rows.iter().map(|r| r.bytes).sum();
    assert_eq!(rows, 18 * elems);
}

#[test]
fn host_fraction_keeps_that_share_of_the_optimizer_in_host_memory() {
    let mut config = Config::default();
    config.zero.stage = 3;
    config.offload_optimizer.sub_group_size = 1 << 16;
    config.aio.block_size = crate::config::ByteSize::mib(1);
    let lay = layout(&[3 << 20, 5 << 20, 1 << 20], 1, 3);
    let sizes = PlanSizes {
        layout: &lay,
        x_bytes: 2,
        device_bytes: 1 << 20,
    };
    let tiers = Tiers {
        params: Tier::Device,
        optimizer: Tier::Nvme,
    };
    let elems = (9u64 << 20) as f64;
    let all_nvme = plan(&config, 1, tiers, &sizes);
    for f in [0.0, 0.3, 0.75, 1.0] {
        config.offload_optimizer.host_fraction = f;
        let p = plan(&config, 1, tiers, &sizes);
        let bytes = |class: &str, tier: Tier| -> f64 {
            p.rows
                .iter()
                .filter(|r| r.class == class && r.tier == tier)
                .map(|r| r.bytes as f64)
                .sum()
        };
        assert_eq!(
            bytes("gradients (f32)", Tier::Host),
            4.0 * elems,
            "gradients stay in host memory"
        );
        for class in ["master params (f32)", "adam m, v"] {
            let (host, nvme) = (bytes(class, Tier::Host), bytes(class, Tier::Nvme));
            let share = host / (host + nvme);
            // Whole sub-groups of 64Ki elements: within one sub-group of the fraction.
            assert!(
                (share - f).abs() <= 65536.0 / elems,
                "{class} at {f}: {share}"
            );
        }
        // The swap files shrink with the share on NVMe (whole blocks of 1 MiB).
        let nvme_share = p.nvme_bytes as f64 / all_nvme.nvme_bytes as f64;
        assert!((nvme_share - (1.0 - f)).abs() < 0.01, "{f}: {nvme_share}");
        let resident = p.optimizer_on_host.iter().filter(|&&h| h).count();
        assert_eq!(resident == 0, f == 0.0);
        assert_eq!(resident == p.sub_groups.len(), f == 1.0);
        if f > 0.0 && f < 1.0 {
            assert!(
                p.optimizer_where().starts_with("nvme ("),
                "{}",
                p.optimizer_where()
            );
        }
    }
}

/// A small model on NVMe (GPT-2's vocabulary on 4 layers of width 128: 7.25M parameters,
/// 116 MB of states, 89% of them in the embedding) gets sub-groups of at most a
/// `buffer_count`-th of its elements instead of the 10M-element default, and staging rings
/// no larger than their users: its host pool stays under twice its states (it was six
/// times them). GPT-2 124M's sub-groups stay as configured.
#[test]
fn a_small_models_host_pool_is_sized_to_the_model() {
    let mut config = Config::default();
    config.zero.stage = 3;
    let lay = layout(&[6_455_296, 198_272, 198_272, 198_272, 198_272, 256], 1, 3);
    let elems: u64 = lay.iter().map(|(s, _)| s.len as u64).sum();
    let sizes = PlanSizes {
        layout: &lay,
        x_bytes: 4,
        device_bytes: 1 << 20,
    };
    let nvme = Tiers {
        params: Tier::Nvme,
        optimizer: Tier::Nvme,
    };
    let p = plan(&config, 1, nvme, &sizes);
    let largest = p.sub_groups.iter().map(|g| g.len as u64).max().unwrap();
    assert!(
        largest <= elems.div_ceil(4) + NORM_CHUNK as u64,
        "{largest} of {elems}"
    );
    assert!(
        p.host_bytes < 2 * 16 * elems,
        "a host pool of {} bytes for {} bytes of states",
        p.host_bytes,
        16 * elems
    );
    // Without gradient accumulation the intake ring is one slot (initialisation's scratch).
    assert_eq!(p.staging.intake, 1);
    config.data.grad_accum_steps = 4;
    assert_eq!(plan(&config, 1, nvme, &sizes).staging.intake, 4);
    let gpt2_124m = layout(&[38_633_472, 7_087_872, 7_087_872, 7_087_872, 1536], 1, 3);
    let shards: Vec<Shard> = gpt2_124m.iter().map(|(s, _)| *s).collect();
    // Twelve blocks in the real model; four make the point (still over 4 x 10M elements).
    assert_eq!(
        sub_group_len(&config, &shards),
        config.offload_optimizer.sub_group_size
    );
}

#[test]
fn auto_tries_the_fastest_placement_first() {
    let mut config = Config::default();
    config.zero.stage = 3;
    config.offload_optimizer.device = OffloadDevice::Auto;
    config.offload_param.device = OffloadDevice::Auto;
    let tiers = candidate_tiers(&config);
    assert_eq!(tiers[0].params, Tier::Device);
    assert_eq!(tiers[0].optimizer, Tier::Device);
    assert_eq!(tiers[1].optimizer, Tier::Host);
    assert!(
        tiers.iter().all(|t| t.optimizer != Tier::Nvme),
        "no nvme_path, no NVMe"
    );
}
