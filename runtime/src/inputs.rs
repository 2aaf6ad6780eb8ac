//! Input files (config, token files, `model.init_from`, `strata prepare`'s text): opened only when they are
//! regular files, and read with a length bound.
//!
//! The type is checked with `stat` before the file is opened, and again on the open descriptor, so a FIFO
//! never blocks the open, and a device such as `/dev/zero` is never read without end. The open itself uses
//! `O_NONBLOCK` too, which closes the window between the two checks (a FIFO swapped in between opens
//! without blocking and is then refused by the second check).

use std::fs::{File, FileType, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why an input file cannot be used; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The OS error is part of the message and not a `source`, so a chain printed with `{:#}` says it once.
    #[error("{path}: {what}: {error}")]
    Io {
        path: PathBuf,
        what: &'static str,
        error: std::io::Error,
    },
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} has {len_bytes} bytes or more; at most {max_bytes} are read from {what}")]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        len_bytes: u64,
        max_bytes: u64,
    },
}

/// What a file type is, in words: "a directory", "a FIFO (named pipe)", …
pub fn kind_of(file_type: FileType) -> &'static str {
    if file_type.is_file() {
        "a regular file"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

fn io_error<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> InputError + 'a {
    move |error| InputError::Io {
        path: path.to_path_buf(),
        what,
        error,
    }
}

fn require_regular(path: &Path, meta: &Metadata) -> Result<(), InputError> {
    if meta.is_file() {
        Ok(())
    } else {
        Err(InputError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        })
    }
}

/// Opens `path` for reading if it is a regular file (symbolic links are followed); returns it with its length.
pub fn open_regular(path: &Path) -> Result<(File, u64), InputError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => InputError::Missing {
            path: path.to_path_buf(),
        },
        _ => io_error(path, "cannot read its metadata")(e),
    })?;
    require_regular(path, &meta)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_error(path, "cannot open"))?;
    let meta = file
        .metadata()
        .map_err(io_error(path, "cannot read its metadata"))?;
    require_regular(path, &meta)?;
    Ok((file, meta.len()))
}

/// Reads all of the regular file at `path`, refusing one longer than `max_bytes` (`what` names the bound's
/// purpose in the error: "a config file").
pub fn read_bounded(
    path: &Path,
    max_bytes: u64,
    what: &'static str,
) -> Result<Vec<u8>, InputError> {
    let (file, len) = open_regular(path)?;
    let too_large = |len_bytes| InputError::TooLarge {
        path: path.to_path_buf(),
        what,
        len_bytes,
        max_bytes,
    };
    if len > max_bytes {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // One byte more than the bound: a file that grew past it after the stat is caught here.
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path, "cannot read"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
        // SAFETY: a valid NUL-terminated path; mkfifo touches no memory of ours.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn non_regular_files_are_refused_by_type_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let e = open_regular(&fifo).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some(
                format!(
                    "{} is a FIFO (named pipe), not a regular file",
                    fifo.display()
                )
                .as_str()
            )
        );
        let e = open_regular(dir.path()).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.ends_with("is a directory, not a regular file")));
        let e = read_bounded(Path::new("/dev/zero"), 10, "a test").err();
        assert!(e.is_some_and(|e| e.to_string().contains("is a character device")));
    }

    #[test]
    fn reads_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").expect("write");
        assert_eq!(
            read_bounded(&path, 10, "a test").ok(),
            Some(b"0123456789".to_vec())
        );
        let e = read_bounded(&path, 9, "a test")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.is_some_and(|e| e.contains("has 10 bytes or more; at most 9 are read from a test"))
        );
        let e = read_bounded(&dir.path().join("missing"), 9, "a test").err();
        assert!(e.is_some_and(|e| e.to_string().ends_with("missing does not exist")));
    }
}
