//! Plain data that every layer shares: what was observed on the host.
//!
//! Nothing in here does I/O. The `host` module fills these types from sysfs,
//! the udev database, our own signature probe and the mount table; the `plan`
//! module decides on them.

pub mod device;
pub mod keys;
pub mod mount;
pub mod quantity;
pub mod reasons;
pub mod volume;

pub use device::{
    ownership, unfinished_mkfs, DevNo, Device, DeviceKind, Exclusive, Probe, Signature,
    SignatureKind, UdevState, OWNER_LABEL,
};
pub use mount::{Inventory, MountEntry, SwapEntry};
pub use quantity::{format_bytes, Quantity};
pub use reasons::{PendingReason, Reason};
pub use volume::{
    AccessMode, DirEntry, DirEntryKind, Fingerprint, FormatIntent, MountFact, NodeInfo, ScInfo,
    Volume, VolumeMode, HOSTNAME_LABEL,
};
