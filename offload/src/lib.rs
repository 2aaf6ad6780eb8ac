//! strata-offload: 4 KiB-aligned host buffers, an io_uring NVMe engine and a swap store.
