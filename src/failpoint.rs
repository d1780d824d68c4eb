//! Crash points for reliability tests. With the `failpoints` feature, a step
//! named in the `DISKLET_FAILPOINTS` environment variable (comma-separated)
//! kills the process with SIGKILL right there, as a power cut or an OOM kill
//! would. Without the feature, `hit` is an empty inline function: zero cost.

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
