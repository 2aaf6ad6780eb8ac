//! Faults: each gives its error with context, the process keeps running, and data written
//! before the fault still reads back intact.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common::{dirs, pool, random_bytes, small_cfg, tempdir, WAIT};
use strata_offload::{AioConfig, HostPool, OffloadError, SwapStore};

fn put(store: &SwapStore, pool: &HostPool, key: &str, data: &[u8]) -> Result<(), OffloadError> {
    let mut buf = pool.alloc(data.len())?;
    buf.as_mut_slice().copy_from_slice(data);
    store.write(key, buf)?.wait(WAIT).map(drop)
}

fn get(store: &SwapStore, pool: &HostPool, key: &str, len: usize) -> Result<Vec<u8>, OffloadError> {
    let buf = pool.alloc(len)?;
    Ok(store.read(key, buf)?.wait(WAIT)?.as_slice().to_vec())
}

#[test]
fn read_of_a_key_never_written_is_not_found() {
    let root = tempdir();
    let pool = pool(4 << 20);
    let store = SwapStore::open_with_pool(&dirs(&root, 1), small_cfg(), &pool).unwrap();
    let data = random_bytes(1, 70_000);
    put(&store, &pool, "a", &data).unwrap();
    let err = get(&store, &pool, "never.written", 4096).unwrap_err();
    assert!(
        matches!(&err, OffloadError::NotFound { key } if key == "never.written"),
        "{err}"
    );
    assert!(err.to_string().contains("never.written"));
    assert!(matches!(
        store.remove("never.written"),
        Err(OffloadError::NotFound { .. })
    ));
    // A buffer too small is refused with the sizes, before any I/O.
    let err = get(&store, &pool, "a", 4096).unwrap_err();
    assert!(
        matches!(
            err,
            OffloadError::BufferTooSmall {
                needed: 73_728,
                capacity: 4096,
                ..
            }
        ),
        "{err}"
    );
    assert!(get(&store, &pool, "a", data.len()).unwrap() == data);
}

#[test]
fn truncated_swap_file_gives_a_short_read_with_context() {
    let root = tempdir();
    let pool = pool(4 << 20);
    let cfg = AioConfig {
        checksums: false,
        ..small_cfg()
    };
    let store = SwapStore::open_with_pool(&dirs(&root, 1), cfg, &pool).unwrap();
    let early = random_bytes(2, 200_000);
    let late = random_bytes(3, 200_000);
    put(&store, &pool, "early", &early).unwrap();
    put(&store, &pool, "late", &late).unwrap();
    let cut = store.extents("late").unwrap()[1].clone();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&cut.path)
        .unwrap();
    file.set_len(cut.offset).unwrap();
    drop(file);

    let err = get(&store, &pool, "late", late.len()).unwrap_err();
    match &err {
        OffloadError::ShortRead {
            key,
            path,
            offset,
            expected,
            got,
        } => {
            assert_eq!(key, "late");
            assert_eq!(path, &cut.path);
            assert!(
                *offset >= cut.offset,
                "offset {offset} before the cut at {}",
                cut.offset
            );
            assert!(got < expected);
        }
        other => panic!("expected ShortRead, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("late") && msg.contains(&cut.path.display().to_string()),
        "{msg}"
    );
    assert!(
        get(&store, &pool, "early", early.len()).unwrap() == early,
        "data before the cut"
    );
    // The store keeps working: a rewrite of the lost key reads back.
    put(&store, &pool, "late", &late).unwrap();
    assert!(get(&store, &pool, "late", late.len()).unwrap() == late);
}

#[test]
fn flipped_byte_is_a_checksum_mismatch_with_context() {
    let root = tempdir();
    let pool = pool(4 << 20);
    let store = SwapStore::open_with_pool(&dirs(&root, 2), small_cfg(), &pool).unwrap();
    let good = random_bytes(4, 150_000);
    let victim = random_bytes(5, 150_000);
    put(&store, &pool, "good", &good).unwrap();
    put(&store, &pool, "victim", &victim).unwrap();
    let target = store.extents("victim").unwrap()[2].clone();
    flip_byte(&target.path, target.offset + 123);

    let err = get(&store, &pool, "victim", victim.len()).unwrap_err();
    match &err {
        OffloadError::Checksum {
            key,
            path,
            offset,
            expected,
            actual,
            ..
        } => {
            assert_eq!(key, "victim");
            assert_eq!(path, &target.path);
            assert_eq!(*offset, target.offset);
            assert_ne!(expected, actual);
        }
        other => panic!("expected Checksum, got {other}"),
    }
    assert!(get(&store, &pool, "good", good.len()).unwrap() == good);
}

fn flip_byte(path: &Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x40;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

/// A small tmpfs, unmounted on drop; `None` (test skipped) where mounting is not permitted.
struct SmallMount {
    dir: tempfile::TempDir,
}

impl SmallMount {
    fn new(size: &str) -> Option<SmallMount> {
        let dir = tempdir();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Some(SmallMount { dir }),
            _ => None,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for SmallMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn full_file_system_gives_enospc_with_context() {
    let Some(mount) = SmallMount::new("1m") else {
        eprintln!("SKIP full_file_system_gives_enospc_with_context: mounting a tmpfs is not permitted here");
        return;
    };
    let pool = pool(4 << 20);
    let cfg = AioConfig {
        grow_bytes: 256 << 10,
        ..small_cfg()
    };
    let store = SwapStore::open_with_pool(&[mount.path()], cfg, &pool).unwrap();
    let mut written = Vec::new();
    let mut failure = None;
    for i in 0..20 {
        let data = random_bytes(100 + i, 150_000);
        let key = format!("unit{i}");
        match put(&store, &pool, &key, &data) {
            Ok(()) => written.push((key, data)),
            Err(e) => {
                failure = Some((key, e));
                break;
            }
        }
    }
    let (key, err) = failure.expect("a 1 MiB file system must fill up");
    eprintln!("ENOSPC error: {err} (direct: {})", store.direct());
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&key) && msg.contains("strata.swap") && msg.contains("offset"),
        "{msg}"
    );
    assert!(!written.is_empty());
    for (key, data) in &written {
        assert!(
            get(&store, &pool, key, data.len()).unwrap() == *data,
            "{key} after ENOSPC"
        );
    }
    // Space freed by a remove is used again without growing the file.
    store.remove(&written[0].0).unwrap();
    put(&store, &pool, &key, &random_bytes(1, 150_000)).unwrap();
    drop(store);
}
