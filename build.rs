//! Bakes the commit into `disklet --version`: from DISKLET_GIT_COMMIT (the
//! Dockerfile passes it as a build argument), else from git, else "unknown".
fn main() {
    println!("cargo:rerun-if-env-changed=DISKLET_GIT_COMMIT");
    let commit = std::env::var("DISKLET_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=DISKLET_COMMIT={commit}");
}
