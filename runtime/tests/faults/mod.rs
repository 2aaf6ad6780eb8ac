//! Helpers for the reliability tests: real processes with bounded waits, input snapshots, leftover checks.

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// A small, fast model: one block, width 32, sequences of 16, micro-batches of 2; one log line only.
pub const TINY: [&str; 12] = [
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_embd=32",
    "--set",
    "model.n_head=2",
    "--set",
    "model.seq_len=16",
    "--set",
    "data.micro_batch_size=2",
    "--set",
    "train.log_every=100000",
];

/// `strata train` on the tiny model with `args` (after the tiny settings, so they win).
pub fn train(args: &[&str]) -> Command {
    let mut c = Command::new(STRATA);
    c.arg("train").args(TINY).args(args);
    c
}

/// `--set key=path`.
pub fn set(key: &str, path: &Path) -> [String; 2] {
    ["--set".into(), format!("{key}={}", path.display())]
}

/// How a process ended and what it printed.
#[derive(Debug)]
pub struct Ran {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// A started process whose output goes to files (no pipe can fill and block it).
pub struct Running {
    child: Child,
    command: String,
    logs: tempfile::TempDir,
    start: Instant,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_so_far(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stderr")).unwrap_or_default()
    }

    /// Waits up to `limit` for the exit; kills the process and fails the test if it runs over.
    pub fn wait(mut self, limit: Duration) -> Ran {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if self.start.elapsed() > limit => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "{} ran over {limit:?}; stderr so far:\n{}",
                        self.command,
                        self.stderr_so_far()
                    );
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("waiting for {}: {e}", self.command),
            }
        };
        use std::os::unix::process::ExitStatusExt;
        let read =
            |name: &str| std::fs::read_to_string(self.logs.path().join(name)).unwrap_or_default();
        Ran {
            code: status.code(),
            signal: status.signal(),
            stdout: read("stdout"),
            stderr: read("stderr"),
            elapsed: self.start.elapsed(),
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(self) -> Ran {
        // SAFETY: kill(2) on a child we started and have not reaped; no memory is involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.wait(Duration::from_secs(20))
    }
}

impl Drop for Running {
    /// A test that fails while its process runs must not leave it running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn start(mut command: Command) -> Running {
    let logs = tempfile::tempdir().expect("log dir");
    let out = File::create(logs.path().join("stdout")).expect("stdout file");
    let err = File::create(logs.path().join("stderr")).expect("stderr file");
    let description = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {description}: {e}"));
    Running {
        child,
        command: description,
        logs,
        start: Instant::now(),
    }
}

/// Runs `command` to its end within `limit`.
pub fn run(command: Command, limit: Duration) -> Ran {
    start(command).wait(limit)
}

/// Waits up to `limit` for `ready`; false if it never held.
pub fn wait_until(limit: Duration, ready: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ready()
}

/// Asserts a failed run: exit code 1 (not a signal), no panic, and every needle in its stderr.
pub fn assert_refused(ran: &Ran, needles: &[&str]) {
    assert_eq!(
        (ran.code, ran.signal),
        (Some(1), None),
        "expected exit code 1:\n{}",
        ran.stderr
    );
    assert!(!ran.stderr.contains("panicked"), "{}", ran.stderr);
    for n in needles {
        assert!(
            ran.stderr.contains(n),
            "stderr lacks {n:?}:\n{}",
            ran.stderr
        );
    }
}

/// Asserts that no training step ran (the first step always logs `step     1/…`).
pub fn assert_no_step(ran: &Ran) {
    assert!(
        !ran.stderr.contains("step     1/"),
        "a step ran:\n{}",
        ran.stderr
    );
}

/// The bytes of each input, to compare after a run.
pub struct Snapshot(Vec<(PathBuf, Vec<u8>)>);

impl Snapshot {
    pub fn of(paths: &[&Path]) -> Snapshot {
        Snapshot(
            paths
                .iter()
                .map(|p| (p.to_path_buf(), std::fs::read(p).expect("read input")))
                .collect(),
        )
    }

    /// Every input byte-for-byte as it was.
    pub fn assert_unchanged(&self) {
        for (path, bytes) in &self.0 {
            let now = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                now == *bytes,
                "{} changed ({} -> {} bytes)",
                path.display(),
                bytes.len(),
                now.len()
            );
        }
    }
}

/// Asserts that `dir` holds none of strata's temporary or lock files.
pub fn assert_no_leftovers(dir: &Path) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".strata-tmp") || n.contains(".strata-lock") || n.ends_with(".tmp"))
        .collect();
    assert!(
        names.is_empty(),
        "left behind in {}: {names:?}",
        dir.display()
    );
}

/// Writes an llm.c token file byte by byte (independently of strata's writer): `count` tokens below 256.
pub fn write_tokens(path: &Path, count: usize) {
    let mut bytes = Vec::with_capacity(1024 + 2 * count);
    let mut header = [0i32; 256];
    header[0] = 20240520;
    header[1] = 1;
    header[2] = count as i32;
    header
        .iter()
        .for_each(|h| bytes.extend_from_slice(&h.to_le_bytes()));
    (0..count).for_each(|i| bytes.extend_from_slice(&(((i * 7) % 256) as u16).to_le_bytes()));
    std::fs::write(path, bytes).expect("write tokens");
}

/// Exports the tiny model's weights after one step, for use as `model.init_from`.
pub fn export_tiny_weights(path: &Path) {
    let mut c = train(&["--steps", "1"]);
    c.args(set("train.export_to", path));
    let ran = run(c, Duration::from_secs(60));
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
}

/// A character device to use as an output path. As root, a private node (the null device, 1:3) in `dir`:
/// a strata that wrongly replaced the path must not replace the machine's /dev/null. Others cannot
/// replace /dev/null, so they get it.
pub fn char_device(dir: &Path) -> PathBuf {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return PathBuf::from("/dev/null");
    }
    use std::os::unix::ffi::OsStrExt;
    let path = dir.join("null-device");
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path; mknod touches no memory of ours.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(rc, 0, "mknod {}", path.display());
    path
}

pub fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path; mkfifo touches no memory of ours.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Whether this machine lets a test mount a small tmpfs in a private mount namespace (root, unshare).
pub fn can_mount_tmpfs() -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs \"$0\""])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `unshare -m sh -c SCRIPT` with `$0` the directory `mount` (created here) holding a fresh tmpfs of `size`
/// (e.g. "64k"), visible only to this command, `$1` the strata binary, and `args` after.
pub fn in_small_tmpfs(mount: &Path, size: &str, script: &str, args: &[String]) -> Command {
    std::fs::create_dir_all(mount).expect("mount point");
    let mut c = Command::new("unshare");
    c.args(["-m", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size={size} tmpfs \"$0\" || exit 99\n{script}"
        ))
        .arg(mount)
        .arg(STRATA)
        .args(args);
    c
}

/// Runs `command` with `dir` as its `TMPDIR`, so whatever it leaves there goes with the test's directory.
pub fn in_tmpdir(command: &mut Command, dir: &Path) {
    command.env("TMPDIR", dir);
}

/// The names in `dir` that start with `prefix`.
pub fn names_starting(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// `safetensors` bytes of `tensors` (name, shape, f32 values), written independently of strata.
pub fn safetensors_bytes(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let bytes: &[u8] = bytemuck::cast_slice(values);
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("view");
            (name.to_string(), view)
        })
        .collect();
    safetensors::serialize(views, &None).expect("serialize")
}

/// A safetensors file whose header is `header` (JSON) followed by `data_bytes` zero bytes.
pub fn safetensors_with_header(header: &str, data_bytes: usize) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_bytes, 0);
    bytes
}
