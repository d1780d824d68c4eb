//! The fake Kubernetes API server from `tests/support/fakeapi`, standalone:
//!
//! ```sh
//! cargo run --example fake-apiserver -- --listen 127.0.0.1:0 --kubeconfig-out /tmp/fake.kubeconfig
//! ```
fn main() {
    std::process::exit(disklet_fakeapi::run_cli());
}
