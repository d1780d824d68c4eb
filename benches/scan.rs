//! `cargo bench --bench scan` (root): wall time of `disklet scan` over 64 loop
//! devices, against baselines measured in the same run:
//!   - `lsblk --json --output-all` (sysfs + udev only, no content probe),
//!   - a sequential `wipefs --no-act --json` over the same 64 devices (what a
//!     shell script that probes each disk would do),
//!   - `disklet scan` with none of the test loops attached (fixed cost).
//!
//! Prints medians of 15 runs and the ratios.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEVICES: usize = 64;
const RUNS: usize = 15;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut()) -> Duration {
    f(); // warm the page cache and the binary
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn quiet(cmd: &mut Command) {
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{cmd:?}");
}

fn main() {
    if support::skip_unless_root("scan bench") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_disklet");
    let cfg = dir.path().join("config.yaml");
    let scan = |cfg: &Path| {
        quiet(
            Command::new(bin)
                .args(["scan", "--output", "json", "--config"])
                .arg(cfg),
        );
    };

    // Fixed cost first: the same config, no test loops attached.
    std::fs::write(&cfg, "mountInfo: /proc/self/mountinfo\nclasses: []\n").unwrap();
    let empty = time(RUNS, || scan(&cfg));

    let loops: Vec<support::Loop> = (0..DEVICES)
        .map(|i| support::Loop::new(dir.path(), &format!("d{i}"), 320))
        .collect();
    // A realistic mix: a quarter ext4, a quarter with a GPT, half blank.
    for (i, l) in loops.iter().enumerate() {
        match i % 4 {
            0 => support::sh(&["mkfs.ext4", "-q", l.path()]),
            1 => support::sh(&[
                "sh",
                "-c",
                &format!("echo 'label: gpt' | sfdisk -q --no-reread {}", l.path()),
            ]),
            _ => String::new(),
        };
        l.assert_ours();
    }
    let paths: Vec<String> = loops.iter().map(|l| format!("\"{}\"", l.path())).collect();
    std::fs::write(
        &cfg,
        format!("mountInfo: /proc/self/mountinfo\nclasses:\n  - name: bench\n    selector:\n      paths: [{}]\n      types: [loop]\n", paths.join(", ")),
    )
    .unwrap();

    let full = time(RUNS, || scan(&cfg));
    let lsblk = time(RUNS, || {
        quiet(Command::new("lsblk").args(["--json", "--output-all"]))
    });
    let wipefs = time(RUNS, || {
        for l in &loops {
            quiet(Command::new("wipefs").args(["--no-act", "--json", l.path()]));
        }
    });

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "disklet scan, {DEVICES} loop devices (median of {RUNS} runs, {} CPUs)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("  disklet scan, 64 loops        {:8.1} ms", ms(full));
    println!("  disklet scan, no test loops   {:8.1} ms", ms(empty));
    println!("  lsblk --json --output-all     {:8.1} ms", ms(lsblk));
    println!("  wipefs -n over 64, sequential {:8.1} ms", ms(wipefs));
    println!(
        "  per device                    {:8.2} ms",
        (ms(full) - ms(empty)) / DEVICES as f64
    );
    println!(
        "  ratio scan / lsblk            {:8.2}",
        ms(full) / ms(lsblk)
    );
    println!(
        "  ratio scan / sequential wipefs{:8.2}",
        ms(full) / ms(wipefs)
    );
}
