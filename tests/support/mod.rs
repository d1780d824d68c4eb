//! Test support for root tests on real loop devices. Every guard undoes what
//! it did in `Drop`, so loops, mounts, swaps and udevd go away even when a test
//! panics.
#![allow(dead_code, clippy::unwrap_used)]

pub mod agent;
pub mod binder;
pub mod cluster;
pub mod csi;
pub mod csi_cluster;
pub mod kubelet;
pub mod load;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a command and panics with its stderr if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes the partition table `script` (sfdisk's input) to `dev`, without
/// asking the kernel to read it.
pub fn sfdisk(dev: &str, script: &str) {
    let mut c = Command::new("sfdisk")
        .args(["-q", "--no-reread", dev])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "sfdisk {dev}");
}

/// A LUKS2 header on `dev`, quickly (pbkdf2 at 1000 iterations), its key in
/// `dir`.
pub fn luks_format(dev: &str, dir: &Path) {
    let key = dir.join("luks.key");
    std::fs::write(&key, "not-a-secret").unwrap();
    sh(&[
        "cryptsetup",
        "luksFormat",
        "-q",
        "--type",
        "luks2",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        key.to_str().unwrap(),
        dev,
    ]);
}

pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Root tests need root and losetup; without them the test says so and
/// returns (never pretends to pass silently).
pub fn skip_unless_root(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED {test}: needs root to attach loop devices");
        return true;
    }
    if !have("losetup") {
        eprintln!("SKIPPED {test}: losetup not installed");
        return true;
    }
    false
}

/// A loop device over a sparse file in the test's own temp dir.
pub struct Loop {
    pub dev: PathBuf,
    pub file: PathBuf,
    partitions: bool,
}

impl Loop {
    pub fn new(dir: &Path, name: &str, size_mib: u64) -> Loop {
        Self::with_flags(dir, name, size_mib, &[])
    }

    /// `losetup` with extra flags (`-r` read-only, `-P` partition scan).
    pub fn with_flags(dir: &Path, name: &str, size_mib: u64, flags: &[&str]) -> Loop {
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join(format!("{name}.img"));
        if !file.exists() {
            let f = std::fs::File::create(&file).unwrap();
            f.set_len(size_mib << 20).unwrap();
        }
        let mut args = vec!["losetup", "-f", "--show"];
        args.extend_from_slice(flags);
        let f = file.to_str().unwrap();
        args.push(f);
        let dev = PathBuf::from(sh(&args).trim());
        Loop {
            dev,
            file,
            partitions: flags.contains(&"-P"),
        }
    }

    /// Attaches `file` to the free loop node `dev` itself; `None` when the
    /// node is taken (another test may have attached it meanwhile).
    pub fn attach_at(dev: &str, file: &Path) -> Option<Loop> {
        let ok = Command::new("losetup")
            .args([dev, file.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        ok.then(|| Loop {
            dev: PathBuf::from(dev),
            file: file.to_path_buf(),
            partitions: false,
        })
    }

    pub fn path(&self) -> &str {
        self.dev.to_str().unwrap()
    }

    /// Sets a field of the loop's primary xfs superblock with `xfs_db`
    /// (`field` as xfs_db writes it, e.g. `inprogress 1`).
    pub fn xfs_sb_write(&self, field: &str) {
        sh(&[
            "xfs_db",
            "-x",
            "-c",
            "sb 0",
            "-c",
            &format!("write {field}"),
            self.path(),
        ]);
    }

    pub fn name(&self) -> String {
        self.dev.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// Asserts the loop is backed by our own file: a selector naming it can
    /// only ever match a device this test created.
    pub fn assert_ours(&self) {
        let bf = std::fs::read_to_string(format!(
            "/sys/class/block/{}/loop/backing_file",
            self.name()
        ))
        .unwrap();
        assert_eq!(
            Path::new(bf.trim()),
            self.file,
            "{} is not backed by our file",
            self.path()
        );
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if self.partitions {
            let _ = Command::new("partx").args(["-d", self.path()]).status();
        }
        // A read-only flag set with `blockdev --setro` outlives the attach
        // and would make the next test's loop on this node read-only.
        let _ = Command::new("blockdev")
            .args(["--setrw", self.path()])
            .status();
        let _ = Command::new("losetup").args(["-d", self.path()]).status();
    }
}

/// A mount, unmounted (lazily if busy) on drop.
pub struct Mounted(pub PathBuf);

impl Mounted {
    pub fn new(dev: &str, at: &Path) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        sh(&["mount", dev, at.to_str().unwrap()]);
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if nix::mount::umount(&self.0).is_err() {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Active swap, turned off on drop.
pub struct Swapon(pub String);

impl Swapon {
    pub fn new(dev: &str) -> Swapon {
        sh(&["swapon", dev]);
        Swapon(dev.to_string())
    }
}

impl Drop for Swapon {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.0).status();
    }
}

/// Another process holding the device open with O_EXCL until dropped.
pub struct ExclusiveHolder(Child);

impl ExclusiveHolder {
    pub fn new(dev: &str) -> ExclusiveHolder {
        let mut child = Command::new("perl")
            .args([
                "-e",
                "use Fcntl; sysopen(my $fh, $ARGV[0], O_RDONLY|O_EXCL) or die \"open: $!\"; $|=1; print \"held\\n\"; <STDIN>;",
                dev,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the child to say it holds the device: a real signal, no sleep.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held", "holder failed to open {dev}");
        ExclusiveHolder(child)
    }
}

impl Drop for ExclusiveHolder {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn udevd_path() -> Option<&'static str> {
    [
        "/lib/systemd/systemd-udevd",
        "/usr/lib/systemd/systemd-udevd",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

pub fn udevd_alive() -> bool {
    Command::new("udevadm")
        .args(["control", "--ping", "--timeout=1"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A udevd we started, stopped and reaped on drop.
pub struct Udevd(Option<Child>);

impl Udevd {
    /// Starts udevd unless one already runs; `None` if it is not installed.
    pub fn start() -> Option<Udevd> {
        if udevd_alive() {
            return Some(Udevd(None));
        }
        let child = Command::new(udevd_path()?)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let guard = Udevd(Some(child));
        // udevd has no readiness pipe when run by hand; its control socket
        // answering a ping is the signal. Bounded by a deadline.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !udevd_alive() {
            assert!(Instant::now() < deadline, "udevd did not answer within 20s");
        }
        Some(guard)
    }

    pub fn settle() {
        sh(&["udevadm", "settle", "--timeout=30"]);
    }

    /// Makes udevd process `loops` (and their partitions) again, and waits
    /// for it. A `settle` alone races: udevd learns of a write (mkfs) only
    /// through its inotify watch, which it sets when it first processes the
    /// device; a write that closed before that left a stale record.
    pub fn reprocess(loops: &[&Loop]) {
        let mut paths = Vec::new();
        for l in loops {
            let sys = Path::new("/sys/class/block").join(l.name());
            paths.push(sys.display().to_string());
            if let Ok(rd) = std::fs::read_dir(&sys) {
                for e in rd.flatten() {
                    if e.path().join("partition").exists() {
                        paths.push(e.path().display().to_string());
                    }
                }
            }
        }
        let mut args = vec!["trigger", "--action=change", "--settle"];
        args.extend(paths.iter().map(String::as_str));
        let st = Command::new("udevadm").args(&args).status().unwrap();
        assert!(st.success(), "udevadm {args:?}");
    }
}

impl Drop for Udevd {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

/// A udev rule file under /run/udev/rules.d, removed (and udevd reloaded) on drop.
pub struct UdevRule(PathBuf);

impl UdevRule {
    pub fn new(name: &str, text: &str) -> UdevRule {
        let dir = Path::new("/run/udev/rules.d");
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        sh(&["udevadm", "control", "--reload"]);
        UdevRule(p)
    }
}

impl Drop for UdevRule {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = Command::new("udevadm")
            .args(["control", "--reload"])
            .status();
    }
}

/// Runs the real `disklet scan` binary and returns its JSON rows.
pub fn scan_json(config: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_disklet"))
        .args(["scan", "--output", "json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Detaches every loop device whose backing file lies under `dir` (the
/// volumes a pool's files were attached as): before the pool is unmounted.
pub fn detach_loops_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let bf = std::fs::read_to_string(format!("/sys/block/{n}/loop/backing_file"));
        if bf.is_ok_and(|b| Path::new(b.trim()).starts_with(dir)) {
            let _ = Command::new("losetup")
                .args(["-d", &format!("/dev/{n}")])
                .status();
        }
    }
}
