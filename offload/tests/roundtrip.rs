//! Round trips of random data, bitwise, through real io_uring against real files.

mod common;

use std::sync::Arc;

use common::{dirs, pool, random_bytes, small_cfg, tempdir, WAIT};
use strata_offload::{AioConfig, BackendKind, EngineKind, SwapStore};

fn write_then_read(
    store: &SwapStore,
    pool: &strata_offload::HostPool,
    key: &str,
    data: &[u8],
) -> Vec<u8> {
    let mut buf = pool.alloc(data.len()).unwrap();
    buf.as_mut_slice().copy_from_slice(data);
    let buf = store.write(key, buf).unwrap().wait(WAIT).unwrap();
    drop(buf);
    let empty = pool.alloc(data.len()).unwrap();
    let back = store.read(key, empty).unwrap().wait(WAIT).unwrap();
    back.as_slice().to_vec()
}

#[test]
fn sizes_on_and_off_block_boundaries_round_trip_bitwise() {
    let root = tempdir();
    let pool = pool(8 << 20);
    let cfg = small_cfg();
    let bs = cfg.block_size;
    let store = SwapStore::open_with_pool(&dirs(&root, 2), cfg, &pool).unwrap();
    assert_eq!(store.engine_kind(), EngineKind::Uring);
    assert!(store.direct(), "ext4 under /tmp should accept O_DIRECT");
    assert!(store.fixed_buffers());
    let sizes = [
        1,
        7,
        4095,
        4096,
        4097,
        bs - 1,
        bs,
        bs + 1,
        3 * bs + 12345,
        16 * bs,
    ];
    for (i, &len) in sizes.iter().enumerate() {
        let data = random_bytes(i as u64 + 1, len);
        let key = format!("unit{i}.master.rank0");
        let back = write_then_read(&store, &pool, &key, &data);
        assert_eq!(back.len(), len, "length of {key}");
        assert!(back == data, "bytes of {key} ({len} bytes) differ");
    }
    // Striping: a 16-block key has blocks in both files, alternating.
    let extents = store.extents("unit9.master.rank0").unwrap();
    assert_eq!(extents.len(), 16);
    let paths = store.file_paths();
    for pair in extents.windows(2) {
        assert_ne!(pair[0].path, pair[1].path);
    }
    assert!(extents.iter().all(|e| paths.contains(&e.path)));
    drop(store);
    assert_eq!(
        pool.bytes_free(),
        pool.bytes_total(),
        "every buffer returned to the pool"
    );
}

#[test]
fn many_threads_three_striped_paths_round_trip() {
    let root = tempdir();
    let pool = pool(32 << 20);
    let cfg = AioConfig {
        rings: 2,
        ..small_cfg()
    };
    let store = Arc::new(SwapStore::open_with_pool(&dirs(&root, 3), cfg, &pool).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (store, pool) = (store.clone(), pool.clone());
            std::thread::spawn(move || {
                for round in 0..3u64 {
                    // Write a batch, then read it back, many operations in flight at once.
                    let keys: Vec<(String, Vec<u8>)> = (0..6u64)
                        .map(|k| {
                            let seed = t * 1000 + round * 100 + k;
                            let len =
                                (random_bytes(seed, 8)[0] as usize) * 997 + (k as usize) * 65536;
                            (format!("t{t}.k{k}"), random_bytes(seed, len.max(1)))
                        })
                        .collect();
                    let mut writes: Vec<_> = keys
                        .iter()
                        .map(|(key, data)| {
                            let mut buf = pool.alloc(data.len()).unwrap();
                            buf.as_mut_slice().copy_from_slice(data);
                            store.write(key, buf).unwrap()
                        })
                        .collect();
                    for h in &mut writes {
                        h.wait(WAIT).unwrap();
                    }
                    let mut reads: Vec<_> = keys
                        .iter()
                        .map(|(key, data)| {
                            store.read(key, pool.alloc(data.len()).unwrap()).unwrap()
                        })
                        .collect();
                    for ((key, data), h) in keys.iter().zip(&mut reads) {
                        let back = h.wait(WAIT).unwrap();
                        assert!(
                            back.as_slice() == data.as_slice(),
                            "{key} differs in round {round}"
                        );
                    }
                    if round == 1 {
                        store.remove(&keys[0].0).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn files_do_not_grow_across_steps_or_runs() {
    let root = tempdir();
    let pool = pool(8 << 20);
    let paths = dirs(&root, 2);
    let keys: Vec<(String, usize)> = (0..6)
        .map(|i| (format!("unit{i}"), 100_000 + i * 70_000))
        .collect();
    let step = |store: &SwapStore, seed: u64| {
        for (key, len) in &keys {
            let mut buf = pool.alloc(*len).unwrap();
            buf.as_mut_slice()
                .copy_from_slice(&random_bytes(seed, *len));
            store.write(key, buf).unwrap().wait(WAIT).unwrap();
        }
    };
    let on_disk = |store: &SwapStore| -> Vec<u64> {
        store
            .file_paths()
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .collect()
    };
    let store = SwapStore::open_with_pool(&paths, small_cfg(), &pool).unwrap();
    step(&store, 1);
    let first = on_disk(&store);
    for s in 2..8 {
        step(&store, s);
        // Remove and rewrite one key each step, as a changing working set would.
        store.remove("unit2").unwrap();
        step(&store, s + 100);
        assert_eq!(on_disk(&store), first, "swap files grew at step {s}");
    }
    let back = store
        .read("unit5", pool.alloc(keys[5].1).unwrap())
        .unwrap()
        .wait(WAIT)
        .unwrap();
    assert!(back.as_slice() == random_bytes(107, keys[5].1).as_slice());
    drop(store);
    // A second run in the same directory reuses the files.
    let store = SwapStore::open_with_pool(&paths, small_cfg(), &pool).unwrap();
    step(&store, 9);
    assert_eq!(on_disk(&store), first, "swap files grew on the second run");
}

#[test]
fn uring_and_fallback_paths_give_identical_bytes() {
    let root_u = tempdir();
    let root_t = tempdir();
    let pool = pool(8 << 20);
    let uring = SwapStore::open_with_pool(&dirs(&root_u, 2), small_cfg(), &pool).unwrap();
    let threads_cfg = AioConfig {
        backend: BackendKind::Threads,
        use_direct: false,
        ..small_cfg()
    };
    let threads = SwapStore::open_with_pool(&dirs(&root_t, 2), threads_cfg, &pool).unwrap();
    assert_eq!(uring.engine_kind(), EngineKind::Uring);
    assert_eq!(threads.engine_kind(), EngineKind::Threads);
    assert!(!threads.direct());
    for (i, len) in [5000usize, 65536, 300_001].into_iter().enumerate() {
        let data = random_bytes(40 + i as u64, len);
        let key = format!("k{i}");
        let a = write_then_read(&uring, &pool, &key, &data);
        let b = write_then_read(&threads, &pool, &key, &data);
        assert!(a == data && b == data, "{key}: a backend lost bytes");
    }
    threads.drop_cache().unwrap();
    uring.sync().unwrap();
    // Same layout, same bytes on disk, file by file.
    for (pu, pt) in uring.file_paths().iter().zip(threads.file_paths()) {
        let (fu, ft) = (std::fs::read(pu).unwrap(), std::fs::read(&pt).unwrap());
        assert_eq!(fu.len(), ft.len());
        assert!(fu == ft, "{} and {} differ", pu.display(), pt.display());
    }
}

#[test]
fn dropped_handles_keep_buffers_until_io_completes() {
    let root = tempdir();
    let pool = pool(16 << 20);
    let store = SwapStore::open_with_pool(&dirs(&root, 1), small_cfg(), &pool).unwrap();
    let data = random_bytes(77, 1 << 20);
    for i in 0..8 {
        let mut buf = pool.alloc(data.len()).unwrap();
        buf.as_mut_slice().copy_from_slice(&data);
        drop(store.write(&format!("k{i}"), buf).unwrap()); // handle dropped at once
    }
    // Reads wait for each key's write; the written data must be whole.
    for i in 0..8 {
        let key = format!("k{i}");
        let mut h = store.read(&key, pool.alloc(data.len()).unwrap()).unwrap();
        assert!(h.wait(WAIT).unwrap().as_slice() == data.as_slice(), "{key}");
    }
    // The written buffers went back to the pool as their writes completed, handles or not.
    assert_eq!(pool.bytes_free(), pool.bytes_total());
    // Dropped read handles: buffers come back once the reads complete, without any wait call.
    for i in 0..8 {
        drop(
            store
                .read(&format!("k{i}"), pool.alloc(data.len()).unwrap())
                .unwrap(),
        );
    }
    let deadline = std::time::Instant::now() + WAIT;
    while pool.bytes_free() != pool.bytes_total() {
        assert!(
            std::time::Instant::now() < deadline,
            "buffers of dropped handles never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Dropping the store with reads in flight drains them before anything is freed.
    for i in 0..8 {
        drop(
            store
                .read(&format!("k{i}"), pool.alloc(data.len()).unwrap())
                .unwrap(),
        );
    }
    drop(store);
    assert_eq!(pool.bytes_free(), pool.bytes_total());
}

#[test]
fn poll_many_and_wait_one() {
    let root = tempdir();
    let pool = pool(8 << 20);
    let store = SwapStore::open_with_pool(&dirs(&root, 2), small_cfg(), &pool).unwrap();
    let mut handles: Vec<_> = (0..4)
        .map(|i| {
            let mut buf = pool.alloc(200_000).unwrap();
            buf.as_mut_slice()
                .copy_from_slice(&random_bytes(i, 200_000));
            store.write(&format!("k{i}"), buf).unwrap()
        })
        .collect();
    let deadline = std::time::Instant::now() + WAIT;
    while strata_offload::IoHandle::ready(&handles).len() < handles.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "writes did not complete"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    for h in &mut handles {
        assert!(h.is_done());
        h.wait(WAIT).unwrap();
        // A second wait reports that the buffer was already taken.
        assert!(matches!(
            h.wait(WAIT),
            Err(strata_offload::OffloadError::AlreadyTaken)
        ));
    }
}

#[test]
fn buffered_io_round_trips_with_uring() {
    let root = tempdir();
    let pool = pool(8 << 20);
    let cfg = AioConfig {
        use_direct: false,
        ..small_cfg()
    };
    let store = SwapStore::open_with_pool(&dirs(&root, 2), cfg, &pool).unwrap();
    assert!(!store.direct());
    let data = random_bytes(5, 3 * 65536 + 1);
    assert!(write_then_read(&store, &pool, "k", &data) == data);
}

#[test]
fn wait_timeout_keeps_the_handle_usable() {
    let root = tempdir();
    let pool = pool(8 << 20);
    let store = SwapStore::open_with_pool(&dirs(&root, 1), small_cfg(), &pool).unwrap();
    let data = random_bytes(3, 4 << 20);
    let mut buf = pool.alloc(data.len()).unwrap();
    buf.as_mut_slice().copy_from_slice(&data);
    let mut h = store.write("big", buf).unwrap();
    // A 4 MiB O_DIRECT write takes far longer than no time at all.
    let timed_out = match h.wait(std::time::Duration::ZERO) {
        Err(strata_offload::OffloadError::Timeout { what, .. }) => {
            assert!(what.contains("big"), "{what}");
            true
        }
        Ok(_) => false,
        Err(e) => panic!("unexpected error {e}"),
    };
    if timed_out {
        // The handle still owns the operation: a second wait gets the buffer back.
        assert_eq!(h.wait(WAIT).unwrap().len(), data.len());
    }
    let back = store
        .read("big", pool.alloc(data.len()).unwrap())
        .unwrap()
        .wait(WAIT)
        .unwrap();
    assert!(back.as_slice() == data.as_slice());
}
