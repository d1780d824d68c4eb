//! Bakes the commit into `disklet --version` (from DISKLET_GIT_COMMIT, which the
//! Dockerfile passes as a build argument, else from git, else "unknown"), and
//! generates the CSI gRPC code from proto/csi.proto with protox, a pure-Rust
//! proto compiler: no protoc on the build machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
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

    println!("cargo:rerun-if-changed=proto/csi.proto");
    let fds = protox::compile(["csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
