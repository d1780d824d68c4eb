//! Signatures read in-process by libblkid, the library `wipefs` is built
//! on, the way `wipefs --no-act` lists them: the superblocks chain (magic,
//! type, usage, label, UUID, bad checksums accepted) and the partitions chain
//! (magic, GPT forced), each signature found then hidden and the probe
//! stepped back, so that overlapping ones (a filesystem inside a partition
//! table, the backup GPT header, a PMBR) are all listed, in wipefs's order
//! and deduplicated by offset as wipefs does (util-linux
//! `misc-utils/wipefs.c`, `read_offsets`).
//!
//! The bindings are `libblkid-rs-sys`' (bindgen, from `blkid.h`); this file
//! is the small safe layer over the ten calls used. No process is spawned:
//! a probe of a blank 1 GiB loop costs tens of microseconds, against a few
//! milliseconds for a `wipefs` process.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use libblkid_rs_sys as sys;

use crate::model::Signature;

/// The most detections one device is read for: a loop that never ends
/// (a libblkid that would not honour a hidden range) stops here, and the
/// probe fails rather than returning what it has.
const MAX_DETECTIONS: usize = 256;

/// One libblkid probe of a device, freed on drop.
struct Probe(sys::blkid_probe);

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: `self.0` came non-null from blkid_new_probe_from_filename
        // and is freed only here, once; the probe closes the descriptor it
        // opened.
        unsafe { sys::blkid_free_probe(self.0) }
    }
}

impl Probe {
    /// Opens `path` read-only (libblkid: `O_RDONLY|O_CLOEXEC|O_NONBLOCK`; a
    /// read-only close triggers no udev re-probe) and sets up the chains as
    /// `wipefs` does.
    fn open(path: &Path) -> Result<Probe, String> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| format!("{}: a device path with a NUL byte", path.display()))?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the
        // call; libblkid copies what it keeps.
        let pr = unsafe { sys::blkid_new_probe_from_filename(c.as_ptr()) };
        if pr.is_null() {
            return Err(format!(
                "libblkid cannot open {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        let probe = Probe(pr);
        let sublks = sys::BLKID_SUBLKS_MAGIC
            | sys::BLKID_SUBLKS_TYPE
            | sys::BLKID_SUBLKS_USAGE
            | sys::BLKID_SUBLKS_LABEL
            | sys::BLKID_SUBLKS_UUID
            | sys::BLKID_SUBLKS_BADCSUM;
        let parts = sys::BLKID_PARTS_MAGIC | sys::BLKID_PARTS_FORCE_GPT;
        // SAFETY: `probe.0` is a live probe (above); these calls only set
        // flags on it. The flag values are blkid.h's, small positive ints.
        let rc = unsafe {
            [
                sys::blkid_probe_enable_superblocks(probe.0, 1),
                sys::blkid_probe_set_superblocks_flags(probe.0, sublks as c_int),
                sys::blkid_probe_enable_partitions(probe.0, 1),
                sys::blkid_probe_set_partitions_flags(probe.0, parts as c_int),
            ]
        };
        if rc.iter().any(|r| *r != 0) {
            return Err(format!(
                "libblkid refused the probe settings for {}",
                path.display()
            ));
        }
        Ok(probe)
    }

    /// The value `name` of the last detection, as bytes (strings without
    /// their NUL; binary values such as a magic as they are).
    fn value(&self, name: &CStr) -> Option<Vec<u8>> {
        let mut data: *const c_char = std::ptr::null();
        let mut len: usize = 0;
        // SAFETY: `self.0` is live; `name` is NUL-terminated; libblkid
        // writes a pointer into the probe's own value list and its length,
        // valid until the next probing call on this probe, and the bytes
        // are copied out before that.
        let rc =
            unsafe { sys::blkid_probe_lookup_value(self.0, name.as_ptr(), &mut data, &mut len) };
        if rc != 0 || data.is_null() {
            return None;
        }
        // SAFETY: on success `data` points to `len` readable bytes owned
        // by the probe (see above).
        let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
        Some(bytes.to_vec())
    }

    fn text(&self, name: &CStr) -> Option<String> {
        let mut v = self.value(name)?;
        while v.last() == Some(&0) {
            v.pop();
        }
        Some(String::from_utf8_lossy(&v).into_owned()).filter(|s| !s.is_empty())
    }

    /// What the last detection found: a signature and the length of its
    /// magic (0: nothing to hide), or `None` for a detection wipefs skips.
    fn found(&self) -> Option<(Signature, u64)> {
        let (kind, off, magic) = if let Some(kind) = self.text(c"TYPE") {
            (kind, self.text(c"SBMAGIC_OFFSET")?, self.value(c"SBMAGIC")?)
        } else {
            let kind = self.text(c"PTTYPE")?;
            (kind, self.text(c"PTMAGIC_OFFSET")?, self.value(c"PTMAGIC")?)
        };
        let offset = off.trim().parse::<u64>().ok()?;
        let sig = Signature {
            kind,
            offset,
            uuid: self.text(c"UUID"),
            label: self.text(c"LABEL"),
            in_progress: false,
        };
        Some((sig, magic.len() as u64))
    }
}

/// Every signature on `path`, as `wipefs --no-act` lists them. An error of
/// libblkid's in the middle of the list fails the whole probe (wipefs would
/// print what it had found so far and succeed): a disk is never taken for
/// blank on a read that did not finish.
pub fn signatures(path: &Path) -> Result<Vec<Signature>, String> {
    let probe = Probe::open(path)?;
    let mut out: Vec<Signature> = Vec::new();
    for _ in 0..MAX_DETECTIONS {
        // SAFETY: `probe.0` is live; blkid_do_probe reads the device into
        // the probe's own buffers and returns 0 (found), 1 (done) or -1.
        let rc = unsafe { sys::blkid_do_probe(probe.0) };
        match rc {
            0 => {}
            1 => return Ok(out),
            _ => {
                return Err(format!(
                    "libblkid failed while reading the signatures of {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                ))
            }
        }
        let Some((sig, len)) = probe.found() else {
            continue;
        };
        let offset = sig.offset;
        merge(&mut out, sig);
        if len > 0 {
            // SAFETY: `probe.0` is live; hiding a range and stepping back
            // only change where the next blkid_do_probe looks.
            let rc = unsafe {
                [
                    sys::blkid_probe_hide_range(probe.0, offset, len),
                    sys::blkid_probe_step_back(probe.0),
                ]
            };
            if rc.iter().any(|r| *r != 0) {
                return Err(format!(
                    "libblkid cannot hide the {} signature at {offset:#x} of {} to look for more",
                    out.last().map_or("", |s| s.kind.as_str()),
                    path.display()
                ));
            }
        }
    }
    Err(format!(
        "{}: libblkid was still finding signatures after {MAX_DETECTIONS} detections; not trusted as a probe",
        path.display()
    ))
}

/// Adds `sig` to `out` as wipefs does: a second detection at an offset
/// already listed updates that entry (its type; its label and UUID when it
/// has them) instead of adding one.
fn merge(out: &mut Vec<Signature>, sig: Signature) {
    match out.iter_mut().find(|s| s.offset == sig.offset) {
        Some(s) => {
            s.kind = sig.kind;
            if sig.label.is_some() {
                s.label = sig.label;
            }
            if sig.uuid.is_some() {
                s.uuid = sig.uuid;
            }
        }
        None => out.push(sig),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(kind: &str, offset: u64, label: Option<&str>) -> Signature {
        Signature {
            kind: kind.into(),
            offset,
            uuid: None,
            label: label.map(Into::into),
            in_progress: false,
        }
    }

    #[test]
    fn a_second_detection_at_one_offset_updates_the_entry_as_wipefs_does() {
        let mut out = vec![sig("gpt", 0x200, None)];
        merge(&mut out, sig("PMBR", 0x1fe, None));
        merge(&mut out, sig("dos", 0x1fe, Some("x")));
        merge(&mut out, sig("dos", 0x1fe, None));
        assert_eq!(
            out,
            vec![sig("gpt", 0x200, None), sig("dos", 0x1fe, Some("x"))]
        );
    }

    #[test]
    fn a_plain_file_of_zeroes_has_no_signature_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
        assert_eq!(signatures(&p).unwrap(), vec![]);
        let e = signatures(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn swap_in_a_plain_file_is_found_with_its_label() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
        let ok = std::process::Command::new("mkswap")
            .args(["-q", "-L", "lbl"])
            .arg(&p)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: mkswap is not installed (util-linux)");
            return;
        }
        let s = signatures(&p).unwrap();
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].kind, "swap");
        assert_eq!(s[0].label.as_deref(), Some("lbl"));
        assert_eq!(s[0].offset, 4086, "the SWAPSPACE2 magic at page end - 10");
    }
}
