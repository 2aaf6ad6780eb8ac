//! Where io_uring is blocked (seccomp, as in many containers), the store falls back to the
//! pread/pwrite thread pool and still round-trips. Its own test binary: the filter is installed
//! on the test thread and inherited by the I/O threads it starts.

mod common;

use common::{dirs, pool, random_bytes, small_cfg, tempdir, WAIT};
use strata_offload::{EngineKind, SwapStore};

const SYS_IO_URING_SETUP: u32 = 425;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;

/// Make io_uring_setup fail with EPERM for this thread and the threads it starts.
fn block_io_uring() -> bool {
    if !cfg!(target_arch = "x86_64") {
        return false;
    }
    let stmt = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let ld_w_abs = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut filter = [
        stmt(ld_w_abs, 0, 0, 4), // seccomp_data.arch
        stmt(jeq, 0, 3, AUDIT_ARCH_X86_64),
        stmt(ld_w_abs, 0, 0, 0), // seccomp_data.nr
        stmt(jeq, 0, 1, SYS_IO_URING_SETUP),
        stmt(ret, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return false;
    }
    // SAFETY: `prog` points at `filter`, both alive for the call; the kernel copies the program.
    unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const _,
        ) == 0
    }
}

#[test]
fn blocked_io_uring_falls_back_to_the_thread_pool() {
    if !block_io_uring() {
        eprintln!("SKIP blocked_io_uring_falls_back_to_the_thread_pool: cannot install a seccomp filter here");
        return;
    }
    let root = tempdir();
    let pool = pool(4 << 20);
    let store = SwapStore::open_with_pool(&dirs(&root, 2), small_cfg(), &pool).unwrap();
    assert_eq!(store.engine_kind(), EngineKind::Threads);
    assert!(store.direct(), "O_DIRECT still works with pread/pwrite");
    let data = random_bytes(9, 5 * 65536 + 333);
    let mut buf = pool.alloc(data.len()).unwrap();
    buf.as_mut_slice().copy_from_slice(&data);
    store.write("k", buf).unwrap().wait(WAIT).unwrap();
    let back = store
        .read("k", pool.alloc(data.len()).unwrap())
        .unwrap()
        .wait(WAIT)
        .unwrap();
    assert!(back.as_slice() == data.as_slice());
    // Asking for io_uring explicitly is an error that names the cause.
    let cfg = strata_offload::AioConfig {
        backend: strata_offload::BackendKind::Uring,
        file_name: "other.swap".into(),
        ..small_cfg()
    };
    let err = SwapStore::open(&dirs(&root, 1), cfg).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
}
