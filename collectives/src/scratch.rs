//! Scratch directories under `$TMPDIR` (a run's swap files, the launcher's blame files) that are
//! found and removed once their owner is gone, however it ended.
//!
//! [`ScratchDir::create`] makes `$TMPDIR/<prefix>-<pid>-<nonce>` and holds an exclusive `flock` on
//! its `.owner` file for as long as the value lives; the kernel releases that lock when the owning
//! process ends, by SIGKILL too. The directory is set up under a hidden name (`.<name>.init`) and
//! renamed into place only once its lock is held, so a directory with the visible name and a free
//! lock has no owner. [`sweep`] removes such directories: it takes the lock itself (so a second
//! sweeper skips the directory) and removes it while holding the lock. Directories made before
//! the lock existed (no `.owner`) are removed only when the pid in their name is no process and
//! they are older than a minute; a directory whose owner may be alive is never removed.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The scratch directories of a run's swap files (`nvme_path = "@tmp"`).
pub const SWAP_PREFIX: &str = "strata-swap";
/// The scratch directories of `strata launch`.
pub const LAUNCH_PREFIX: &str = "strata-launch";

/// The owner's lock file in every scratch directory.
pub const OWNER_FILE: &str = ".owner";
/// Age under which a directory without an owner file is left alone.
const UNLOCKED_AGE_MIN: Duration = Duration::from_secs(60);
/// Names tried before giving up on a fresh one.
const NAME_TRIES_MAX: u32 = 16;

/// A scratch directory owned by this process: removed (with its contents) when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    /// Holds the `flock` that says the directory is in use.
    _owner: File,
}

/// Takes an exclusive `flock` on `file` without waiting; false if another open file holds it.
fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor this process owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

fn open_owner(dir: &Path, create: bool) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(dir.join(OWNER_FILE))
}

impl ScratchDir {
    /// Makes `$TMPDIR/<prefix>-<pid>-<nonce>` (mode 0700), owned by this process until dropped.
    pub fn create(prefix: &str) -> std::io::Result<ScratchDir> {
        ScratchDir::create_in(&std::env::temp_dir(), prefix)
    }

    fn create_in(base: &Path, prefix: &str) -> std::io::Result<ScratchDir> {
        let mut last = None;
        for attempt in 0..NAME_TRIES_MAX {
            let nonce = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
                ^ attempt;
            let name = format!("{prefix}-{}-{nonce:x}", std::process::id());
            let (init, path) = (base.join(format!(".{name}.init")), base.join(&name));
            if path.exists() {
                continue;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(&init) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let owned = open_owner(&init, true).and_then(|mut owner| {
                if !try_lock(&owner)? {
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                writeln!(owner, "{}", std::process::id())?;
                // A directory of that name appearing meanwhile is not replaced (renaming over
                // an empty directory would succeed).
                if path.exists() {
                    return Err(std::io::ErrorKind::AlreadyExists.into());
                }
                std::fs::rename(&init, &path)?;
                Ok(owner)
            });
            match owned {
                Ok(owner) => {
                    return Ok(ScratchDir {
                        path,
                        _owner: owner,
                    })
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&init);
                    if e.kind() != std::io::ErrorKind::AlreadyExists {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Removed while the lock is held (the owner file closes after this), so no sweeper races it.
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A scratch directory [`sweep`] removed.
#[derive(Clone, Debug)]
pub struct Swept {
    pub path: PathBuf,
    /// Disk space it took (allocated blocks: its swap files are sparse).
    pub bytes: u64,
}

/// Disk space taken by everything under `path` (not following links).
fn allocated_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks().saturating_mul(512);
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| allocated_bytes(&e.path()))
                .fold(own, u64::saturating_add)
        })
        .unwrap_or(own)
}

/// Whether process `pid` exists (in this pid namespace).
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for the process; no memory is involved.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Whether the directory `path` (named `<prefix>-<pid>-…`) has no owner, and so may be removed;
/// when it does, the returned lock (if any) is held until the removal is done.
fn ownerless(path: &Path, name_pid: Option<u32>, meta: &std::fs::Metadata) -> Option<Option<File>> {
    match open_owner(path, false) {
        Ok(owner) => try_lock(&owner).ok()?.then_some(Some(owner)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Made before owner locks (or emptied by hand): by its name's pid and its age.
            let old = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age >= UNLOCKED_AGE_MIN);
            (old && name_pid.is_some_and(|pid| !process_exists(pid))).then_some(None)
        }
        Err(_) => None,
    }
}

/// Removes every directory `<prefix>-*` under `$TMPDIR` of this user whose owner is gone (see the
/// module's description); returns what it removed. Failures are skipped: another sweeper, or a
/// directory it cannot read, is not this run's problem.
pub fn sweep(prefix: &str) -> Vec<Swept> {
    sweep_in(&std::env::temp_dir(), prefix)
}

/// [`sweep`] of every kind of strata's scratch directories.
pub fn sweep_all() -> Vec<Swept> {
    [SWAP_PREFIX, LAUNCH_PREFIX]
        .into_iter()
        .flat_map(sweep)
        .collect()
}

fn sweep_in(base: &Path, prefix: &str) -> Vec<Swept> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    // SAFETY: geteuid has no preconditions and touches no memory.
    let uid = unsafe { libc::geteuid() };
    let mut swept = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != uid {
            continue;
        }
        let name_pid = rest.split('-').next().and_then(|p| p.parse().ok());
        let Some(_lock) = ownerless(&path, name_pid, &meta) else {
            continue;
        };
        let bytes = allocated_bytes(&path);
        if std::fs::remove_dir_all(&path).is_ok() {
            swept.push(Swept { path, bytes });
        }
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets `path`'s modification time `age` into the past.
    fn age(path: &Path, age: Duration) {
        use std::os::unix::ffi::OsStrExt;
        let then = SystemTime::now() - age;
        let secs = then
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970");
        let times = [libc::timespec {
            tv_sec: secs.as_secs() as libc::time_t,
            tv_nsec: 0,
        }; 2];
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: a valid NUL-terminated path and two timespecs, read by utimensat only.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
        assert_eq!(rc, 0, "utimensat {}", path.display());
    }

    #[test]
    fn a_live_owner_keeps_its_directory_and_a_gone_one_loses_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path();
        let prefix = "strata-test";
        let live = ScratchDir::create_in(base, prefix).expect("create");
        assert!(live.path().starts_with(base));
        std::fs::write(live.path().join("data"), b"x").expect("write");
        // Held by this process: not swept.
        assert!(sweep_in(base, prefix).is_empty());
        assert!(live.path().join("data").exists());
        let dir = |n: &str| {
            let d = base.join(format!("{prefix}-{n}"));
            std::fs::create_dir(&d).expect("mkdir");
            d
        };
        // An owner file that nobody locks: its owner is gone.
        let gone = dir(&format!("{}-1", std::process::id()));
        std::fs::write(gone.join(OWNER_FILE), b"1\n").expect("owner");
        // No owner file (an older strata's): by the pid in its name and its age.
        let me = std::process::id();
        let legacy_alive = dir(&format!("{me}-2"));
        age(&legacy_alive, Duration::from_secs(3600));
        let no_pid = u32::MAX - 1;
        let legacy_new = dir(&format!("{no_pid}-3"));
        let legacy_dead = dir(&format!("{no_pid}-4"));
        age(&legacy_dead, Duration::from_secs(3600));
        // Not a scratch directory's name, and a file: never touched.
        let other = dir("x").with_file_name("strata-testament");
        std::fs::create_dir(&other).expect("mkdir");
        let mut swept: Vec<PathBuf> = sweep_in(base, prefix).into_iter().map(|s| s.path).collect();
        swept.sort();
        // Sorted as paths: the order depends on this process's pid.
        let mut expected = vec![gone.clone(), legacy_dead.clone()];
        expected.sort();
        assert_eq!(swept, expected);
        assert!(legacy_alive.exists() && legacy_new.exists() && other.exists());
        assert!(live.path().exists());
        let path = live.path().to_path_buf();
        drop(live);
        assert!(!path.exists());
    }

    #[test]
    fn no_hidden_set_up_directory_is_left() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = ScratchDir::create_in(tmp.path(), "strata-test").expect("a");
        let b = ScratchDir::create_in(tmp.path(), "strata-test").expect("b");
        assert_ne!(a.path(), b.path());
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("read")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }
}
