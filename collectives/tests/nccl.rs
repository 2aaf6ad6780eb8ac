//! NCCL with one rank. It needs a GPU and libnccl.so, so it is `#[ignore]`d (a plain `cargo test` reports it
//! as ignored, not passed); on a GPU machine: `cargo test -p strata-collectives --test nccl -- --ignored`.

use strata_collectives::{init, nccl, Backend, DistConfig, EnvSource, RankInfo};

#[test]
#[ignore = "needs a GPU and libnccl: cargo test -p strata-collectives --test nccl -- --ignored on a GPU machine"]
fn nccl_one_rank_all_reduce() -> strata_collectives::Result<()> {
    if let Some(why) = nccl::unavailable_reason() {
        panic!("NCCL is not usable here: {why}");
    }
    let info = RankInfo {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        local_world_size: Some(1),
        master_addr: "127.0.0.1".into(),
        master_port: 0,
        source: EnvSource::Torchrun,
    };
    let config = DistConfig {
        backend: Backend::Nccl,
        ..DistConfig::default()
    };
    let comm = init(&config, &info)?;
    assert_eq!(comm.backend(), Backend::Nccl);
    // Host slices, staged through the device.
    let mut host: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    comm.all_reduce(&mut host)?;
    assert!(host.iter().enumerate().all(|(i, v)| *v == i as f32));
    let mut gathered = vec![0f32; 1000];
    comm.all_gather(&host, &mut gathered)?;
    assert_eq!(gathered, host);
    // Device buffers on a caller's stream, as the engine's communication queue uses them.
    let Some(dev) = comm.as_nccl() else {
        panic!("nccl backend without a device API")
    };
    let stream = dev.stream().clone();
    let buf = stream
        .clone_htod(&host)
        .map_err(|e| strata_collectives::CommError::Nccl {
            rank: 0,
            op: "test",
            detail: format!("{e:?}"),
        })?;
    {
        use cudarc::driver::DevicePtr;
        let (ptr, _synced) = buf.device_ptr(&stream);
        // SAFETY: `buf` is a live allocation of `host.len()` f32 on `stream`'s context, kept
        // alive (and `stream` too) past the synchronize below.
        unsafe {
            dev.all_reduce_on_stream(
                ptr,
                host.len(),
                strata_collectives::DType::F32,
                stream.cu_stream(),
            )?
        };
    }
    dev.synchronize("test")?;
    let back = stream
        .clone_dtoh(&buf)
        .map_err(|e| strata_collectives::CommError::Nccl {
            rank: 0,
            op: "test",
            detail: format!("{e:?}"),
        })?;
    assert_eq!(back, host);
    eprintln!("nccl one-rank all_reduce ok on {:?}", comm.backend());
    Ok(())
}
