//! What a pool records with a file beyond its contents, as an extended
//! attribute of the file itself: written before the file is renamed into
//! place, so a snapshot never exists without its source.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{io, PoolError};

/// The volume a snapshot was taken of.
const SOURCE: &str = "user.disklet.source";

pub fn set_source(f: &File, path: &Path, volume: &str) -> Result<(), PoolError> {
    let name = CString::new(SOURCE).map_err(|e| io("setxattr", path)(std::io::Error::other(e)))?;
    // SAFETY: the fd is open for the call; name is NUL-terminated and
    // value/len describe a live byte slice the kernel only reads.
    let rc = unsafe {
        nix::libc::fsetxattr(
            f.as_raw_fd(),
            name.as_ptr(),
            volume.as_ptr().cast(),
            volume.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io("setxattr", path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The recorded source, `None` for a file that has none.
pub fn source(path: &Path) -> Result<Option<String>, PoolError> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io("getxattr", path)(std::io::Error::other(e)))?;
    let name = CString::new(SOURCE).map_err(|e| io("getxattr", path)(std::io::Error::other(e)))?;
    let mut buf = [0u8; 256];
    // SAFETY: both strings are NUL-terminated; buf is writable for its
    // whole length, which is what the kernel is told.
    let n = unsafe {
        nix::libc::lgetxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(nix::libc::ENODATA) => Ok(None),
            _ => Err(io("getxattr", path)(e)),
        };
    }
    let v = &buf[..n as usize];
    Ok(Some(String::from_utf8_lossy(v).into_owned()))
}
