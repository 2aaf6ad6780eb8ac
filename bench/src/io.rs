//! `strata-bench io`: NVMe write/read sweep through the swap store (block size × queue depth).
//!
//! Each row writes `--size` bytes as keys of one chunk each (at least `block_size × queue_depth`
//! bytes, so one operation can fill the queue), with `--inflight` operations outstanding, then reads
//! them back. Reads go through O_DIRECT, or, where a path refuses it, after the file's page cache is
//! dropped, so the cache never flatters the read figure. Every block carries a stamp (chunk, block)
//! that is checked on read: `#wrong` counts blocks that came back wrong, as in nccl-tests.
//! GB/s are decimal (1e9 bytes per second), as dd prints them.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use strata::config::ByteSize;
use strata_offload::{
    AioConfig, BackendKind, EngineKind, HostBuf, HostPool, IoHandle, OnExhausted, PoolConfig,
    SwapStore,
};

const WAIT: Duration = Duration::from_secs(120);
const FILE_NAME: &str = "strata-bench-io.swap";
const STAMP_MAGIC: u64 = 0x5354_5241_5441_494f; // "STRATAIO"

#[derive(clap::Args)]
pub struct IoArgs {
    /// Directory for the swap file; repeat or comma-separate for several drives (blocks are striped).
    #[arg(long, required = true, value_delimiter = ',')]
    path: Vec<PathBuf>,
    /// Bytes written and read per row (e.g. 4GiB, 512MiB).
    #[arg(long, default_value = "4GiB")]
    size: String,
    /// Block sizes to sweep (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "256KiB,1MiB,4MiB")]
    block_size: Vec<String>,
    /// Queue depths to sweep (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64")]
    queue_depth: Vec<usize>,
    /// io_uring rings (one I/O thread each).
    #[arg(long, default_value_t = 1)]
    rings: usize,
    /// Smallest operation (one key); raised to block_size × queue_depth where that is larger.
    #[arg(long, default_value = "64MiB")]
    chunk: String,
    /// Operations kept in flight.
    #[arg(long, default_value_t = 2)]
    inflight: usize,
    /// Buffered I/O instead of O_DIRECT (the page cache is dropped before each read pass).
    #[arg(long)]
    buffered: bool,
    /// Use the pread/pwrite thread pool instead of io_uring.
    #[arg(long)]
    threads: bool,
    /// One JSON object per row on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Keep the swap file(s) afterwards (default: remove them).
    #[arg(long)]
    keep: bool,
}

/// A size argument (`4GiB`, `1MB`, `512M`, `4096`), by strata's one rule for sizes (`ByteSize`).
fn parse_size(flag: &str, text: &str) -> anyhow::Result<u64> {
    text.parse::<ByteSize>()
        .map(ByteSize::bytes)
        .map_err(|e| anyhow::anyhow!("{flag} {e}"))
}

/// Refuses a `--path` that is not an existing directory, as `strata train` refuses an `nvme_path`: a
/// missing mount point must not be created on whatever disk holds its parent and benchmarked there.
fn check_path(path: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!(
            "--path {}: not a directory (give the directory the swap file goes in, on the drive to measure)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--path {}: does not exist; strata-bench io does not create it, so that a missing mount is not \
             measured on the disk below it: mount the drive or create the directory",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("--path {}", path.display())),
    }
}

/// The swap files of a run: removed at the end unless `--keep`, and, when the run fails, those it
/// created (a failed write on a full disk leaves no file behind).
struct SwapFiles {
    files: Vec<(PathBuf, bool)>,
    keep: bool,
    finished: bool,
}

impl SwapFiles {
    fn new(dirs: &[PathBuf], keep: bool) -> Self {
        let files = dirs
            .iter()
            .map(|d| {
                let file = d.join(FILE_NAME);
                let existed = file.symlink_metadata().is_ok();
                (file, existed)
            })
            .collect();
        SwapFiles {
            files,
            keep,
            finished: false,
        }
    }
}

impl Drop for SwapFiles {
    fn drop(&mut self) {
        for (file, existed) in &self.files {
            let remove = if self.finished { !self.keep } else { !existed };
            if !remove {
                continue;
            }
            match std::fs::remove_file(file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    eprintln!("# could not remove {}: {e}", file.display())
                }
                _ => {}
            }
        }
    }
}

struct Row {
    block_size: usize,
    queue_depth: usize,
    bytes: u64,
    write_s: f64,
    read_s: f64,
    wrong: u64,
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

pub fn run(args: IoArgs) -> anyhow::Result<()> {
    let size = parse_size("--size", &args.size)?;
    let chunk_min = parse_size("--chunk", &args.chunk)?;
    let block_sizes = args
        .block_size
        .iter()
        .map(|b| parse_size("--block-size", b).map(|v| v as usize))
        .collect::<anyhow::Result<Vec<usize>>>()?;
    if size == 0 || args.inflight == 0 || args.queue_depth.is_empty() || block_sizes.is_empty() {
        bail!("--size, --inflight, --block-size and --queue-depth must be non-empty and > 0");
    }
    // O_DIRECT moves whole 4 KiB blocks: "4MB" is 976.6 of them, measured as 977.
    let size = size
        .checked_next_multiple_of(4096)
        .context("--size overflows")?;
    for dir in &args.path {
        check_path(dir)?;
    }
    let mut swap_files = SwapFiles::new(&args.path, args.keep);
    let mut header_done = false;
    let mut warmed = false;
    let mut rows = Vec::new();
    for &bs in &block_sizes {
        for &qd in &args.queue_depth {
            let cfg = AioConfig {
                block_size: bs,
                queue_depth: qd,
                rings: args.rings,
                use_direct: !args.buffered,
                backend: if args.threads {
                    BackendKind::Threads
                } else {
                    BackendKind::Uring
                },
                file_name: FILE_NAME.into(),
                prealloc_bytes: size.div_ceil(args.path.len() as u64),
                ..AioConfig::default()
            };
            let chunk = chunk_min.max((bs * qd) as u64).min(size).div_ceil(4096) * 4096;
            let chunk = usize::try_from(chunk).context("chunk size")?;
            let pool = HostPool::new(PoolConfig {
                bytes_total: chunk * args.inflight,
                slab_bytes_max: chunk,
                mlock: false,
                on_exhausted: OnExhausted::Wait(WAIT),
                check_budget: true,
            })
            .context("host pool for the benchmark")?;
            let store = SwapStore::open_with_pool(&args.path, cfg, &pool)
                .with_context(|| format!("opening swap files in {:?}", args.path))?;
            if !header_done {
                print_header(&args, &store, size);
                header_done = true;
            }
            let mut bench = Bench::new(&store, &pool, size, chunk, bs, args.inflight)?;
            if !warmed {
                // Untimed pass: extents become written (not unwritten), as in a swap file reused
                // across steps; later rows overwrite the same file.
                bench.write_pass()?;
                warmed = true;
            }
            let write_s = bench.write_pass()?;
            let (read_s, wrong) = bench.read_pass()?;
            let row = Row {
                block_size: bs,
                queue_depth: qd,
                bytes: size,
                write_s,
                read_s,
                wrong,
            };
            print_row(&args, &store, &row);
            rows.push(row);
        }
    }
    swap_files.finished = true;
    drop(swap_files);
    let wrong: u64 = rows.iter().map(|r| r.wrong).sum();
    let best_w = rows
        .iter()
        .max_by(|a, b| a.write_s.total_cmp(&b.write_s).reverse());
    let best_r = rows
        .iter()
        .max_by(|a, b| a.read_s.total_cmp(&b.read_s).reverse());
    if let (Some(w), Some(r)) = (best_w, best_r) {
        let out = format!(
            "# best write {:.2} GB/s (block {} x qd {}), best read {:.2} GB/s (block {} x qd {}); #wrong total {wrong}",
            gbps(w.bytes, w.write_s),
            w.block_size,
            w.queue_depth,
            gbps(r.bytes, r.read_s),
            r.block_size,
            r.queue_depth
        );
        table_line(&args, &out);
    }
    if wrong > 0 {
        bail!("{wrong} blocks read back wrong");
    }
    Ok(())
}

fn table_line(args: &IoArgs, line: &str) {
    if args.json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

fn print_header(args: &IoArgs, store: &SwapStore, size: u64) {
    let engine = match store.engine_kind() {
        EngineKind::Uring => format!("io_uring x{} ring(s)", args.rings),
        EngineKind::Threads => "pread/pwrite thread pool".to_string(),
    };
    let mode = if store.direct() {
        "O_DIRECT"
    } else {
        "buffered (cache dropped before reads)"
    };
    let fixed = if store.fixed_buffers() {
        ", fixed buffers"
    } else {
        ""
    };
    table_line(
        args,
        &format!(
            "# strata-bench io: {:?}, {size} bytes per row, {engine}, {mode}{fixed}; {} chunks outstanding \
             (a chunk: the larger of --chunk and block_size x queue_depth, written as block_size requests, \
             queue_depth of them in flight per ring)",
            args.path, args.inflight
        ),
    );
    table_line(args, "#");
    table_line(
        args,
        &format!(
            "# {:>10} {:>11} {:>12} {:>9} {:>10} {:>9} {:>10} {:>7}",
            "block_size",
            "queue_depth",
            "bytes",
            "write_s",
            "write_GB/s",
            "read_s",
            "read_GB/s",
            "#wrong"
        ),
    );
}

fn print_row(args: &IoArgs, store: &SwapStore, r: &Row) {
    let line = format!(
        "  {:>10} {:>11} {:>12} {:>9.3} {:>10.2} {:>9.3} {:>10.2} {:>7}",
        r.block_size,
        r.queue_depth,
        r.bytes,
        r.write_s,
        gbps(r.bytes, r.write_s),
        r.read_s,
        gbps(r.bytes, r.read_s),
        r.wrong
    );
    table_line(args, &line);
    if args.json {
        let obj = serde_json::json!({
            "block_size": r.block_size,
            "queue_depth": r.queue_depth,
            "bytes": r.bytes,
            "write_s": r.write_s,
            "write_gbps": gbps(r.bytes, r.write_s),
            "read_s": r.read_s,
            "read_gbps": gbps(r.bytes, r.read_s),
            "wrong": r.wrong,
            "rings": args.rings,
            "paths": args.path.len(),
            "engine": match store.engine_kind() { EngineKind::Uring => "io_uring", EngineKind::Threads => "threads" },
            "direct": store.direct(),
        });
        println!("{obj}");
    }
}

/// One row's state: the chunks (keys) and the buffers cycling through them.
struct Bench<'a> {
    store: &'a SwapStore,
    size: u64,
    chunk: usize,
    block_size: usize,
    free: Vec<HostBuf>,
}

impl<'a> Bench<'a> {
    fn new(
        store: &'a SwapStore,
        pool: &HostPool,
        size: u64,
        chunk: usize,
        bs: usize,
        inflight: usize,
    ) -> anyhow::Result<Self> {
        let mut free = Vec::with_capacity(inflight);
        for i in 0..inflight {
            let mut buf = pool.alloc(chunk)?;
            // Incompressible filler; the stamps make each block of each chunk distinct.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ i as u64;
            for word in buf.as_mut_slice().chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            free.push(buf);
        }
        Ok(Bench {
            store,
            size,
            chunk,
            block_size: bs,
            free,
        })
    }

    fn chunks(&self) -> usize {
        self.size.div_ceil(self.chunk as u64) as usize
    }

    fn chunk_len(&self, i: usize) -> usize {
        let start = i as u64 * self.chunk as u64;
        (self.size - start).min(self.chunk as u64) as usize
    }

    fn stamp(&self, buf: &mut HostBuf, chunk: usize) {
        for (b, block) in buf.as_mut_slice().chunks_mut(self.block_size).enumerate() {
            if block.len() >= 16 {
                block[..8].copy_from_slice(&(STAMP_MAGIC ^ chunk as u64).to_le_bytes());
                block[8..16].copy_from_slice(&(b as u64).to_le_bytes());
            }
        }
    }

    fn wrong_blocks(&self, buf: &HostBuf, chunk: usize) -> u64 {
        let mut wrong = 0;
        for (b, block) in buf.as_slice().chunks(self.block_size).enumerate() {
            if block.len() >= 16
                && (block[..8] != (STAMP_MAGIC ^ chunk as u64).to_le_bytes()
                    || block[8..16] != (b as u64).to_le_bytes())
            {
                wrong += 1;
            }
        }
        wrong
    }

    fn take_buf(
        &mut self,
        pending: &mut VecDeque<(usize, IoHandle)>,
    ) -> anyhow::Result<Option<(usize, HostBuf)>> {
        if let Some(buf) = self.free.pop() {
            return Ok(Some((usize::MAX, buf)));
        }
        let Some((chunk, mut h)) = pending.pop_front() else {
            return Ok(None);
        };
        let buf = h.wait(WAIT).with_context(|| format!("chunk {chunk}"))?;
        Ok(Some((chunk, buf)))
    }

    /// Write every chunk; returns seconds (including fdatasync when not O_DIRECT).
    fn write_pass(&mut self) -> anyhow::Result<f64> {
        let mut pending = VecDeque::new();
        let start = Instant::now();
        for i in 0..self.chunks() {
            let Some((_, mut buf)) = self.take_buf(&mut pending)? else {
                bail!("no buffer available");
            };
            buf.set_len(self.chunk_len(i))?;
            self.stamp(&mut buf, i);
            pending.push_back((i, self.store.write(&format!("bench.{i}"), buf)?));
        }
        while let Some((i, mut h)) = pending.pop_front() {
            self.free.push(
                h.wait(WAIT)
                    .with_context(|| format!("write of chunk {i}"))?,
            );
        }
        if !self.store.direct() {
            self.store.sync()?;
        }
        Ok(start.elapsed().as_secs_f64())
    }

    /// Read every chunk back, checking each block's stamp; returns (seconds, wrong blocks).
    fn read_pass(&mut self) -> anyhow::Result<(f64, u64)> {
        self.store.drop_cache()?;
        let mut pending: VecDeque<(usize, IoHandle)> = VecDeque::new();
        let mut wrong = 0;
        let start = Instant::now();
        for i in 0..self.chunks() {
            let Some((done, buf)) = self.take_buf(&mut pending)? else {
                bail!("no buffer available");
            };
            if done != usize::MAX {
                wrong += self.wrong_blocks(&buf, done);
            }
            pending.push_back((i, self.store.read(&format!("bench.{i}"), buf)?));
        }
        while let Some((i, mut h)) = pending.pop_front() {
            let buf = h.wait(WAIT).with_context(|| format!("read of chunk {i}"))?;
            wrong += self.wrong_blocks(&buf, i);
            self.free.push(buf);
        }
        Ok((start.elapsed().as_secs_f64(), wrong))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size as size;

    #[test]
    fn sizes_follow_strata_s_one_rule() {
        assert_eq!(size("--size", "4GiB").unwrap(), 4 << 30);
        assert_eq!(size("--size", "256KiB").unwrap(), 256 << 10);
        assert_eq!(size("--size", "1M").unwrap(), 1 << 20);
        assert_eq!(size("--size", "1MB").unwrap(), 1_000_000);
        assert_eq!(size("--size", "4096").unwrap(), 4096);
        assert!(size("--size", "4XB")
            .unwrap_err()
            .to_string()
            .starts_with("--size "));
        assert!(size("--size", "GiB").is_err());
    }
}
