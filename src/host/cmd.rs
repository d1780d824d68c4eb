//! One way to run external tools: an argument vector (never a shell string),
//! a timeout, and errors that name the command and carry its stderr.

use std::ffi::OsString;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot run `{cmd}`: {source} (is it installed and on PATH?)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed with {status}: {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}` did not finish within {timeout:?} and was killed")]
    Timeout { cmd: String, timeout: Duration },
}

/// A command line to run.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    timeout: Duration,
}

impl Cmd {
    pub fn new(program: impl Into<OsString>) -> Self {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The command line as one string, for messages only.
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs to completion and returns stdout; a non-zero exit is an error.
    pub fn output(&self) -> Result<String, CmdError> {
        let cmd = self.display();
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LC_ALL", "C")
            .spawn()
            .map_err(|source| CmdError::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
        let pid = child.id();
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = String::new();
            let mut err = String::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_string(&mut out);
            }
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_string(&mut err);
            }
            let _ = tx.send((out, err));
        });
        let (out, err) = match rx.recv_timeout(self.timeout) {
            Ok(v) => v,
            Err(_) => {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                // A process stuck in uninterruptible sleep (a dead device)
                // outlives SIGKILL: reap it elsewhere, never block on it here.
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                return Err(CmdError::Timeout {
                    cmd,
                    timeout: self.timeout,
                });
            }
        };
        let status = child.wait().map_err(|source| CmdError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
        if status.success() {
            Ok(out)
        } else {
            Err(CmdError::Failed {
                cmd,
                status: status.to_string(),
                // The first lines say what went wrong; usage texts follow.
                stderr: err
                    .trim()
                    .lines()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" / ")
                    .chars()
                    .take(500)
                    .collect(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_never_interpreted_by_a_shell() {
        let out = Cmd::new("echo")
            .arg("a; rm -rf /tmp/x $(id)")
            .output()
            .unwrap();
        assert_eq!(out, "a; rm -rf /tmp/x $(id)\n");
    }

    #[test]
    fn failure_names_the_command_and_carries_stderr() {
        let e = Cmd::new("sh")
            .arg("-c")
            .arg("echo oops >&2; exit 3")
            .output()
            .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("`sh -c echo oops >&2; exit 3`"), "{s}");
        assert!(s.contains("oops") && s.contains("3"), "{s}");
    }

    #[test]
    fn a_hung_command_is_killed() {
        let e = Cmd::new("sleep")
            .arg("30")
            .timeout(Duration::from_millis(100))
            .output()
            .unwrap_err();
        assert!(matches!(e, CmdError::Timeout { .. }), "{e}");
    }

    #[test]
    fn a_missing_program_says_so() {
        let e = Cmd::new("/nonexistent/mkfs.zz").output().unwrap_err();
        assert!(
            matches!(e, CmdError::Spawn { .. }) && e.to_string().contains("installed"),
            "{e}"
        );
    }
}
