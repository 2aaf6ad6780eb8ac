//! Free space of the file systems that outputs land on, checked before step 1.

use super::{OutputError, OutputFile};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes an unprivileged process may still write on the file system holding `dir` (statvfs `f_bavail`).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::open(dir)?;
    // SAFETY: statvfs is plain old data, so all-zero bytes are a valid value for fstatvfs to fill.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs on an fd we own, writing into a statvfs we own.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Sums the outputs per file system (by the device of their directory) and compares with its free space.
/// An output that replaces a file needs its whole size: the old file is freed only by the rename.
pub(super) fn check(placed: &[(&OutputFile, &Path)]) -> Result<(), OutputError> {
    let mut groups: Vec<(u64, &Path, Vec<&OutputFile>)> = Vec::new();
    for &(out, dir) in placed {
        let dev = std::fs::metadata(dir)
            .map(|m| m.dev())
            .map_err(|error| OutputError::Io {
                key: out.key.clone(),
                path: out.path.clone(),
                what: format!(
                    "cannot read the metadata of its directory {}",
                    dir.display()
                ),
                error,
            })?;
        match groups.iter_mut().find(|(d, _, _)| *d == dev) {
            Some((_, _, outs)) => outs.push(out),
            None => groups.push((dev, dir, vec![out])),
        }
    }
    for (_, dir, outs) in groups {
        let need_bytes = outs
            .iter()
            .fold(0u64, |sum, o| sum.saturating_add(o.size_bytes));
        let free = free_bytes(dir).map_err(|error| OutputError::Io {
            key: outs[0].key.clone(),
            path: outs[0].path.clone(),
            what: format!("cannot read the free space of {}", dir.display()),
            error,
        })?;
        if need_bytes > free {
            let keys: Vec<String> = outs
                .iter()
                .map(|o| format!("{} = {}", o.key, o.path.display()))
                .collect();
            let detail: Vec<String> = outs
                .iter()
                .map(|o| format!("{}: {} bytes, {}", o.key, o.size_bytes, o.size_detail))
                .collect();
            return Err(OutputError::NoSpace {
                keys: keys.join(", "),
                dir: dir.to_path_buf(),
                free_bytes: free,
                need_bytes,
                detail: detail.join("; "),
            });
        }
    }
    Ok(())
}
