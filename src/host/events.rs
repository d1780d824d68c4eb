//! Event sources. Each only *kicks* the reconciler; none carries logic, so a
//! missed or duplicated event is harmless (the resync is the safety net).
//!
//! - udev monitor (devices after udevd processed them; needs the host network
//!   namespace, as netlink multicast is per namespace),
//! - kernel uevent monitor (always, the fallback when udevd is absent),
//! - the host mount table (`poll(2)` on mountinfo wakes on every mount and
//!   umount: how a new mount point in a discovery dir is noticed),
//! - inotify on every discovery dir.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::sync::mpsc::Sender;

use crate::host::probecache::DeviceEvents;

/// Why the reconciler was woken; for logs only, never for decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    Udev,
    Kernel,
    Mounts,
    Dir,
    Pv,
}

fn monitor_thread(
    name: &'static str,
    kernel: bool,
    kick: Sender<Kick>,
    seen: Arc<DeviceEvents>,
) -> std::io::Result<()> {
    let what = if kernel { Kick::Kernel } else { Kick::Udev };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        // libudev objects are not Send: the socket is made, used and dropped here.
        let listen = || -> std::io::Result<udev::MonitorSocket> {
            let builder = if kernel { udev::MonitorBuilder::new_kernel()? } else { udev::MonitorBuilder::new()? };
            builder.match_subsystem("block")?.listen()
        };
        let socket = match listen() {
            Ok(s) => {
                let _ = ready_tx.send(Ok(()));
                s
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        loop {
            let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, source = name, "device monitor failed; relying on resync");
                    return;
                }
            }
            let mut any = false;
            for ev in socket.iter() {
                tracing::debug!(source = name, action = ?ev.event_type(), dev = ?ev.sysname(), "device event");
                seen.bump(&ev.sysname().to_string_lossy());
                any = true;
            }
            if any && kick.blocking_send(what).is_err() {
                return;
            }
        }
    })?;
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("monitor thread died")))
}

/// Starts the udev and kernel monitors, which also count the events of each
/// device in `seen` (the probe cache's key). Either may fail (no netlink in
/// this namespace): that is logged and the other and the resync carry on.
pub fn spawn_device_monitors(kick: &Sender<Kick>, seen: &Arc<DeviceEvents>) {
    for (name, kernel) in [("udev-monitor", false), ("kernel-monitor", true)] {
        if let Err(e) = monitor_thread(name, kernel, kick.clone(), seen.clone()) {
            tracing::warn!(error = %e, source = name, "cannot listen for device events");
        }
    }
}

/// Wakes on every change of the mount table.
pub fn spawn_mount_watch(mountinfo: &Path, kick: Sender<Kick>) -> std::io::Result<()> {
    let f = std::fs::File::open(mountinfo)?;
    let path = mountinfo.to_path_buf();
    std::thread::Builder::new().name("mount-watch".into()).spawn(move || loop {
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLPRI | PollFlags::POLLERR)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {
                if kick.blocking_send(Kick::Mounts).is_err() {
                    return;
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), fd = f.as_raw_fd(), "mount table watch failed; relying on resync");
                return;
            }
        }
    })?;
    Ok(())
}

/// inotify on discovery dirs. The watcher must be kept alive by the caller.
pub fn watch_dirs(dirs: &[PathBuf], kick: Sender<Kick>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    if dirs.is_empty() {
        return None;
    }
    let mut w = match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = kick.try_send(Kick::Dir);
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; discovery dirs rely on resync");
            return None;
        }
    };
    for d in dirs {
        if let Err(e) = w.watch(d, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, dir = %d.display(), "cannot watch discovery dir; relying on resync");
        }
    }
    Some(w)
}
