//! Crash points for reliability tests. With the `failpoints` feature, a step
//! named in the `DISKLET_FAILPOINTS` environment variable (comma-separated)
//! kills the process with SIGKILL right there, as a power cut or an OOM kill
//! would. Without the feature, `hit` is an empty inline function: zero cost.

/// Every crash point, in the order a volume's life passes them. The crash
/// suite (`tests/crash_points.rs`) runs each, and fails if a point exists in
/// the code but not here, so none goes untested.
pub const POINTS: &[&str] = &[
    // Provisioning: format (under the device lock), mount, publish.
    "format-after-lock",
    "format-after-record",
    "format-after-mkfs",
    "mount-after-mount",
    "mount-after-voldir",
    "apply-before",
    "apply-after",
    // Withdrawing a PV whose disk is gone.
    "delete-after",
    // Cleanup of a released volume.
    "recycle-after-annotate",
    "recycle-before-clean",
    "files-mid-clean",
    "recycle-after-wipe",
    "recycle-after-mkfs",
    "recycle-after-mount",
    "recycle-after-delete",
];

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::sync::OnceLock;
    static SET: OnceLock<Vec<String>> = OnceLock::new();
    let set = SET.get_or_init(|| {
        std::env::var("DISKLET_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    if set.iter().any(|s| s == name) {
        eprintln!("failpoint {name}: SIGKILL");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// Pause points, for tests that must make the agent see the host change in
/// the middle of a step (a race no test could win by timing). With the
/// `failpoints` feature, a point named in `DISKLET_PAUSEPOINTS` creates the
/// file `$DISKLET_PAUSE_DIR/<name>` the first time it is reached, and waits
/// until the test deletes it. Without the feature, `pause` is empty.
pub const PAUSES: &[&str] = &[
    // The agent has listed the block devices but not yet read the mount
    // table and the discovery dirs.
    "observe-after-devices",
];

#[cfg(feature = "failpoints")]
pub fn pause(name: &str) {
    use std::sync::Mutex;
    static DONE: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let armed = std::env::var("DISKLET_PAUSEPOINTS")
        .unwrap_or_default()
        .split(',')
        .any(|s| s.trim() == name);
    let Ok(dir) = std::env::var("DISKLET_PAUSE_DIR") else {
        return;
    };
    {
        let Ok(mut done) = DONE.lock() else { return };
        if !armed || done.iter().any(|d| d == name) {
            return;
        }
        done.push(name.to_string());
    }
    let flag = std::path::Path::new(&dir).join(name);
    if let Err(e) = std::fs::write(&flag, b"") {
        eprintln!("pausepoint {name}: cannot create {}: {e}", flag.display());
        return;
    }
    eprintln!("pausepoint {name}: waiting for {} to go", flag.display());
    // A test hook, never built into a release: polling keeps it simple.
    while flag.exists() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn pause(_name: &str) {}
