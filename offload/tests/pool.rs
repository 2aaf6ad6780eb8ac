//! Host pool: alignment, budget, exhaustion policy, registration hook.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_offload::{check_memlock, HostPool, OffloadError, OnExhausted, PoolConfig, Registrar};

fn cfg(bytes_total: usize, on_exhausted: OnExhausted) -> PoolConfig {
    PoolConfig {
        bytes_total,
        slab_bytes_max: 1 << 20,
        mlock: false,
        on_exhausted,
        check_budget: true,
    }
}

#[test]
fn buffers_are_aligned_disjoint_and_within_budget() {
    let pool = HostPool::new(cfg(4 << 20, OnExhausted::Error)).unwrap();
    assert_eq!(pool.slabs().len(), 4);
    let sizes = [1usize, 4095, 4096, 4097, 100_000, 1 << 20];
    let mut bufs: Vec<_> = sizes.iter().map(|&n| pool.alloc(n).unwrap()).collect();
    for (buf, &n) in bufs.iter().zip(&sizes) {
        assert_eq!(
            buf.as_ptr() as usize % 4096,
            0,
            "alignment of a {n}-byte buffer"
        );
        assert_eq!(buf.len(), n);
        assert_eq!(buf.capacity(), n.div_ceil(4096) * 4096);
    }
    // Fill each with its own byte and check that no buffer overlaps another.
    for (i, buf) in bufs.iter_mut().enumerate() {
        buf.as_mut_slice().fill(i as u8 + 1);
    }
    for (i, buf) in bufs.iter().enumerate() {
        assert!(
            buf.iter().all(|&b| b == i as u8 + 1),
            "buffer {i} was overwritten"
        );
    }
    let used: usize = bufs.iter().map(|b| b.capacity()).sum();
    assert_eq!(pool.bytes_free(), pool.bytes_total() - used);
    // Typed views.
    let f = bufs[5].try_cast::<f32>().unwrap();
    assert_eq!(f.len(), (1 << 20) / 4);
    assert!(
        bufs[0].try_cast::<f32>().is_none(),
        "1 byte is not an f32 slice"
    );
    drop(bufs);
    assert_eq!(pool.bytes_free(), pool.bytes_total());
    // Freed runs coalesce: a whole slab is available again.
    assert_eq!(pool.alloc(1 << 20).unwrap().capacity(), 1 << 20);
}

#[test]
fn exhaustion_errors_or_waits_and_never_allocates_more() {
    let pool = HostPool::new(cfg(2 << 20, OnExhausted::Error)).unwrap();
    let a = pool.alloc(1 << 20).unwrap();
    let _b = pool.alloc(1 << 20).unwrap();
    match pool.alloc(4096) {
        Err(OffloadError::PoolExhausted {
            bytes_free,
            bytes_total,
            ..
        }) => {
            assert_eq!(bytes_free, 0);
            assert_eq!(bytes_total, 2 << 20);
        }
        other => panic!("expected PoolExhausted, got {other:?}"),
    }
    assert!(matches!(
        pool.alloc(2 << 20),
        Err(OffloadError::BufferTooLarge { .. })
    ));

    // Waiting: times out when nothing comes back ...
    let t0 = Instant::now();
    let r = pool.alloc_timeout(4096, Duration::from_millis(100));
    assert!(matches!(r, Err(OffloadError::PoolExhausted { .. })));
    assert!(t0.elapsed() >= Duration::from_millis(100));
    // ... and succeeds when another thread returns a buffer.
    let waiter = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            pool.alloc_timeout(1 << 20, Duration::from_secs(10))
                .map(|b| b.capacity())
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    drop(a);
    assert_eq!(waiter.join().unwrap().unwrap(), 1 << 20);
}

#[test]
fn budget_beyond_free_memory_is_refused_with_a_fix() {
    let available = strata_offload::mem_available_bytes().unwrap();
    let too_big = (available as usize).saturating_mul(2);
    let err = HostPool::new(PoolConfig {
        bytes_total: too_big,
        slab_bytes_max: 1 << 30,
        ..PoolConfig::default()
    })
    .err()
    .expect("a pool of twice the free memory must be refused");
    let msg = err.to_string();
    assert!(matches!(err, OffloadError::Budget { .. }), "{msg}");
    assert!(
        msg.contains("MemAvailable") && msg.contains("Fix:"),
        "{msg}"
    );
}

#[test]
fn memlock_rule() {
    assert!(check_memlock(1 << 30, Some(64 << 10), false).is_err());
    assert!(
        check_memlock(1 << 30, Some(64 << 10), true).is_ok(),
        "CAP_IPC_LOCK lifts the limit"
    );
    assert!(check_memlock(1 << 30, None, false).is_ok(), "unlimited");
    assert!(check_memlock(32 << 10, Some(64 << 10), false).is_ok());
    let msg = check_memlock(1 << 30, Some(64 << 10), false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("ulimit -l"), "{msg}");
}

/// A real registrar: page-locks each slab with mlock, as cuMemHostRegister would pin it.
struct MlockRegistrar {
    ranges: Mutex<Vec<(usize, usize)>>,
}

impl Registrar for MlockRegistrar {
    fn name(&self) -> &str {
        "mlock"
    }
    fn register(&self, ptr: *mut u8, len: usize) -> Result<(), String> {
        // SAFETY: the pool passes a live slab mapping of `len` bytes.
        if unsafe { libc::mlock(ptr.cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        self.ranges.lock().unwrap().push((ptr as usize, len));
        Ok(())
    }
    fn unregister(&self, ptr: *mut u8, len: usize) {
        // SAFETY: as in register; the slab is still mapped when unregister is called.
        unsafe { libc::munlock(ptr.cast(), len) };
        self.ranges
            .lock()
            .unwrap()
            .retain(|&r| r != (ptr as usize, len));
    }
}

#[test]
fn registrar_sees_every_slab_and_is_released_with_the_pool() {
    let pool = HostPool::new(cfg(3 << 20, OnExhausted::Error)).unwrap();
    let reg = Arc::new(MlockRegistrar {
        ranges: Mutex::new(Vec::new()),
    });
    pool.add_registrar(reg.clone()).unwrap();
    let ranges = reg.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 3);
    // Every buffer lies inside a registered range.
    let buf = pool.alloc(700_000).unwrap();
    let p = buf.as_ptr() as usize;
    assert!(ranges
        .iter()
        .any(|&(a, n)| p >= a && p + buf.capacity() <= a + n));
    drop(buf);
    drop(pool);
    assert!(
        reg.ranges.lock().unwrap().is_empty(),
        "slabs unregistered on drop"
    );
}

#[test]
fn mlocked_pool_works() {
    let pool = HostPool::new(PoolConfig {
        mlock: true,
        ..cfg(1 << 20, OnExhausted::Error)
    });
    match pool {
        Ok(pool) => assert_eq!(pool.alloc(4096).unwrap().capacity(), 4096),
        // Without CAP_IPC_LOCK and a small RLIMIT_MEMLOCK the error must explain the fix.
        Err(e) => assert!(e.to_string().contains("memlock"), "{e}"),
    }
}
