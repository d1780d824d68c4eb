//! The vocabulary disklet shares with the cluster: label and annotation
//! keys, the field manager and provisioner names, and how PV names and the
//! node label value are made. Everything that reads or writes a PV (the plan
//! that builds them, the client that selects them, the agent that reads
//! them back) takes these from here.

pub use super::volume::HOSTNAME_LABEL;

/// Label: the node a PV's volume is on (`node_label_value` of its name);
/// every PV list and watch of an agent selects on it.
pub const LABEL_NODE: &str = "disklet.io/node";
/// Label: the disklet class of the volume.
pub const LABEL_CLASS: &str = "disklet.io/class";
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
pub const ANN_KEY: &str = "disklet.io/volume-key";
pub const ANN_NODE_UID: &str = "disklet.io/node-uid";
pub const ANN_DEVICE_ID: &str = "disklet.io/device-id";
pub const ANN_BY_ID: &str = "disklet.io/by-id";
pub const ANN_SERIAL: &str = "disklet.io/serial";
pub const ANN_FS_UUID: &str = "disklet.io/fs-uuid";
pub const FIELD_MANAGER: &str = "disklet";
pub const PROVISIONER: &str = "disklet";

/// FNV-1a, 64 bit: stable across versions and platforms, which PV names must be.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The value for the `disklet.io/node` label: the node name when it is a valid
/// label value (63 characters at most), else a stable hash of it.
pub fn node_label_value(node: &str) -> String {
    let valid = !node.is_empty()
        && node.len() <= 63
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && node.as_bytes()[0].is_ascii_alphanumeric()
        && node.as_bytes()[node.len() - 1].is_ascii_alphanumeric();
    if valid {
        node.to_string()
    } else {
        format!("h-{:016x}", fnv1a64(node.as_bytes()))
    }
}

/// `disklet-<class>-<16 hex>`: a hash of the node name and the volume key. The
/// key carries the filesystem UUID (new on every format), the device identity
/// or the discovery path, so a name never moves to another disk, node, or
/// a reformatted filesystem.
pub fn pv_name(node: &str, class: &str, key: &str) -> String {
    let h = fnv1a64(format!("{node}\0{key}").as_bytes());
    format!("disklet-{class}-{h:016x}")
}

/// Annotation: why the PV's disk cannot serve it now: `missing` (not on the
/// node), `shrunk` (smaller than its filesystem), `read-only`, or another
/// refusal reason code of the disk. Removed once the disk is fit again.
pub const ANN_DEVICE_STATE: &str = "disklet.io/device-state";
/// Annotation: a cleanup was started (`started`); survives a crash, so the
/// next agent finishes it.
pub const ANN_CLEANUP: &str = "disklet.io/cleanup";
/// Annotation: the Retain policy was seen and reported once.
pub const ANN_RECLAIM: &str = "disklet.io/reclaim";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns1123_deterministic_and_distinct() {
        let n = pv_name("node-a", "fast", "fs:1234");
        assert_eq!(n, pv_name("node-a", "fast", "fs:1234"));
        assert_ne!(n, pv_name("node-b", "fast", "fs:1234"), "another node");
        assert_ne!(
            n,
            pv_name("node-a", "fast", "fs:1235"),
            "a reformatted disk"
        );
        assert!(n.len() <= 253 && n.starts_with("disklet-fast-"));
        assert!(n
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        // FNV-1a test vector: names must never change across releases.
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn node_label_values_are_valid_labels() {
        assert_eq!(node_label_value("node-a"), "node-a");
        let long = "n".repeat(100);
        let v = node_label_value(&long);
        assert!(v.len() <= 63 && v.starts_with("h-"));
        assert_eq!(v, node_label_value(&long));
    }
}
