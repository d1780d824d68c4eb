//! Volume capabilities: what a claim may ask of a disklet volume.

use std::collections::{BTreeMap, HashMap};

use tonic::Status;

use super::proto::volume_capability::access_mode::Mode;
use super::proto::volume_capability::AccessType;
use super::proto::{CapacityRange, Topology, TopologyRequirement, VolumeCapability};

/// Filesystems a Filesystem volume may be made with; the first when none
/// is asked for.
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];

/// How a volume is used, from its capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount { fs_type: String, flags: Vec<String> },
}

/// Why a capability cannot be had, or `None` when it can. One node reaches a
/// local volume: the single-node modes only.
pub fn unsupported(c: &VolumeCapability) -> Option<String> {
    let mode = c
        .access_mode
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown));
    match mode {
        None => return Some("the capability has no access mode".into()),
        Some(Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter) => {}
        Some(m) => return Some(format!("access mode {} is not supported: a local volume is reached from one node (use a SINGLE_NODE mode, ReadWriteOnce or ReadWriteOncePod)", m.as_str_name())),
    }
    match &c.access_type {
        None => Some("the capability has neither block nor mount access".into()),
        Some(AccessType::Block(_)) => None,
        Some(AccessType::Mount(m))
            if m.fs_type.is_empty() || FS_TYPES.contains(&m.fs_type.as_str()) =>
        {
            None
        }
        Some(AccessType::Mount(m)) => Some(format!(
            "filesystem {:?} is not supported; use one of {FS_TYPES:?}",
            m.fs_type
        )),
    }
}

/// Every capability must be supported; `INVALID_ARGUMENT` names the first
/// that is not.
pub fn require_all(caps: &[VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume capabilities are required"));
    }
    match caps.iter().find_map(unsupported) {
        Some(why) => Err(Status::invalid_argument(why)),
        None => Ok(()),
    }
}

pub fn access(c: Option<&VolumeCapability>) -> Result<Access, Status> {
    let c = c.ok_or_else(|| Status::invalid_argument("a volume capability is required"))?;
    if let Some(why) = unsupported(c) {
        return Err(Status::invalid_argument(why));
    }
    Ok(match &c.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => Access::Mount {
            fs_type: if m.fs_type.is_empty() {
                FS_TYPES[0].to_string()
            } else {
                m.fs_type.clone()
            },
            flags: m.mount_flags.clone(),
        },
        None => {
            return Err(Status::invalid_argument(
                "the capability has neither block nor mount access",
            ))
        }
    })
}

/// Whether the capability allows one writer at one path only
/// (ReadWriteOncePod).
pub fn single_writer(c: Option<&VolumeCapability>) -> bool {
    c.and_then(|c| c.access_mode)
        .is_some_and(|m| m.mode == Mode::SingleNodeSingleWriter as i32)
}

/// Volumes are whole MiB (loop devices and filesystems like round sizes).
const ROUND: u64 = 1 << 20;

/// The size to create for a capacity range, `OUT_OF_RANGE` when none fits.
pub fn size_for(range: Option<&CapacityRange>, default: u64) -> Result<u64, Status> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(Status::invalid_argument(
            "capacity range bytes must not be negative",
        ));
    }
    let (req, lim) = (req as u64, lim as u64);
    if lim > 0 && req > lim {
        return Err(Status::out_of_range(format!(
            "required {req} bytes exceeds the limit of {lim}"
        )));
    }
    let want = if req > 0 {
        req
    } else if lim > 0 {
        default.min(lim)
    } else {
        default
    };
    let rounded = want.div_ceil(ROUND) * ROUND;
    let size = if lim > 0 && rounded > lim {
        want.div_ceil(4096) * 4096
    } else {
        rounded
    };
    if lim > 0 && size > lim {
        return Err(Status::out_of_range(format!(
            "no size of whole 4 KiB blocks lies between {req} and {lim} bytes"
        )));
    }
    Ok(size)
}

/// Whether this node's segments satisfy a topology requirement: some
/// requisite segment (or, with none, any) agrees on every key it names.
pub fn reachable(node: &BTreeMap<String, String>, req: Option<&TopologyRequirement>) -> bool {
    let Some(req) = req else { return true };
    let agrees = |t: &Topology| t.segments.iter().all(|(k, v)| node.get(k) == Some(v));
    if req.requisite.is_empty() {
        req.preferred.is_empty() || req.preferred.iter().any(agrees)
    } else {
        req.requisite.iter().any(agrees)
    }
}

pub fn topology(node: &BTreeMap<String, String>) -> Topology {
    Topology {
        segments: node
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
    }
}

/// A CreateVolume's parameters (the StorageClass's, with the sidecars'
/// `csi.storage.k8s.io/` ones): disklet takes none of its own, so any other
/// key is a typo or a setting meant for another driver, refused by name
/// rather than ignored.
pub fn parameters(p: &HashMap<String, String>) -> Result<(), Status> {
    let mut unknown: Vec<&str> = p
        .keys()
        .map(String::as_str)
        .filter(|k| !k.starts_with("csi.storage.k8s.io/"))
        .collect();
    unknown.sort();
    match unknown.first() {
        None => Ok(()),
        Some(k) => Err(Status::invalid_argument(format!(
            "StorageClass parameter {k:?} is not one of disklet's: it takes none but csi.storage.k8s.io/fstype (ext4 or xfs); remove it from the StorageClass"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_other_than_the_sidecars_are_refused_by_name() {
        let p = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(parameters(&p(&[])).is_ok());
        assert!(parameters(&p(&[
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .is_ok());
        let e = parameters(&p(&[
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("fsType", "xfs"),
        ]))
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("\"fsType\""), "{}", e.message());
    }

    #[test]
    fn sizes_round_to_mib_within_the_range() {
        let r = |req, lim| {
            Some(CapacityRange {
                required_bytes: req,
                limit_bytes: lim,
            })
        };
        assert_eq!(size_for(None, 1 << 30).unwrap(), 1 << 30);
        assert_eq!(size_for(r(1, 0).as_ref(), 1 << 30).unwrap(), 1 << 20);
        assert_eq!(
            size_for(r((1 << 20) + 1, (1 << 20) + 8192).as_ref(), 0).unwrap(),
            (1 << 20) + 4096
        );
        assert_eq!(size_for(r(0, 5 << 20).as_ref(), 1 << 30).unwrap(), 5 << 20);
        assert_eq!(
            size_for(r(10, 5).as_ref(), 0).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(r(4097, 4098).as_ref(), 0).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(r(-1, 0).as_ref(), 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn topology_must_agree_on_every_key_of_a_requisite_segment() {
        let node: BTreeMap<String, String> = [
            ("kubernetes.io/hostname".to_string(), "n1".to_string()),
            ("zone".to_string(), "a".to_string()),
        ]
        .into();
        let seg = |pairs: &[(&str, &str)]| Topology {
            segments: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let req = |segs: Vec<Topology>| TopologyRequirement {
            requisite: segs,
            preferred: vec![],
        };
        assert!(reachable(&node, None));
        assert!(reachable(&node, Some(&req(vec![seg(&[("zone", "a")])]))));
        assert!(reachable(
            &node,
            Some(&req(vec![
                seg(&[("zone", "b")]),
                seg(&[("kubernetes.io/hostname", "n1")])
            ]))
        ));
        assert!(!reachable(
            &node,
            Some(&req(vec![seg(&[("kubernetes.io/hostname", "n2")])]))
        ));
        assert!(!reachable(
            &node,
            Some(&req(vec![seg(&[("zone", "a"), ("rack", "r1")])]))
        ));
    }
}
