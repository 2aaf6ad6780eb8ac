//! EFBIG from RLIMIT_FSIZE. Its own test binary (so its own process): the limit and the ignored
//! SIGXFSZ apply to the whole process.

mod common;

use common::{dirs, pool, random_bytes, small_cfg, tempdir, WAIT};
use strata_offload::{AioConfig, OffloadError, SwapStore};

#[test]
fn file_size_limit_gives_efbig_with_context() {
    // SAFETY: setting SIGXFSZ to SIG_IGN installs no handler code; the write then fails with EFBIG
    // instead of killing the process.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let limit = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass; it only lowers this process's soft limit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) }, 0);

    let root = tempdir();
    let pool = pool(4 << 20);
    let cfg = AioConfig {
        grow_bytes: 256 << 10,
        ..small_cfg()
    };
    let store = SwapStore::open_with_pool(&dirs(&root, 1), cfg, &pool).unwrap();
    let mut written = Vec::new();
    let mut failure = None;
    for i in 0..20u64 {
        let data = random_bytes(i, 200_000);
        let mut buf = pool.alloc(data.len()).unwrap();
        buf.as_mut_slice().copy_from_slice(&data);
        let key = format!("unit{i}");
        match store.write(&key, buf).and_then(|mut h| h.wait(WAIT)) {
            Ok(_) => written.push((key, data)),
            Err(e) => {
                failure = Some((key, e));
                break;
            }
        }
    }
    let (key, err) = failure.expect("a 1 MiB RLIMIT_FSIZE must stop the file");
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    assert!(
        matches!(&err, OffloadError::Io { key: k, offset, .. } if *k == key && *offset >= 1 << 20),
        "{err}"
    );
    for (key, data) in &written {
        let back = store
            .read(key, pool.alloc(data.len()).unwrap())
            .unwrap()
            .wait(WAIT)
            .unwrap();
        assert!(back.as_slice() == data.as_slice(), "{key} after EFBIG");
    }
}
