//! `fake-apiserver`: see `disklet_fakeapi::run_cli`.

fn main() {
    std::process::exit(disklet_fakeapi::run_cli());
}
