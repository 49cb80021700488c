//! Child processes whose stdout and stderr go to a log file; killed on drop.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

#[derive(Debug)]
pub struct Process {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    pub log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Process {
    /// Describes a process; nothing runs until [`Process::start`].
    pub fn new(name: &str, program: &Path, args: &[&str], log: PathBuf) -> Process {
        Process {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            envs: vec![
                (
                    "RUST_LOG".into(),
                    std::env::var("UPLINK_TEST_LOG").unwrap_or_else(|_| "info".into()),
                ),
                ("NO_COLOR".into(), "1".into()),
                // Tests read the logs as text, even when the runner is a systemd unit.
                ("UPLINK_LOG_FORMAT".into(), "text".into()),
            ],
            log,
            child: None,
            starts: 0,
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Process {
        self.set_env(key, value);
        self
    }

    /// Sets `key` for the next start, replacing an earlier value.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.into(), value.into()));
    }

    /// Starts (or restarts) the process, appending its output to the log file.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        writeln!(
            log,
            "===== start #{} of {}: {} {} =====",
            self.starts,
            self.name,
            self.program.display(),
            self.args.join(" ")
        )
        .ok();
        let err: File = log.try_clone().expect("clone log file");
        // Its own process group, so that a wrapper's children (faketime forks the agent)
        // are signalled and killed with it.
        let child = Command::new(&self.program)
            .process_group(0)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} ({}): {e}", self.name, self.program.display()));
        self.child = Some(child);
    }

    /// SIGKILL to its process group, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group("KILL", child.id());
            child.kill().ok();
            child.wait().ok();
            if let Ok(mut log) = OpenOptions::new().append(true).open(&self.log) {
                writeln!(
                    log,
                    "===== {} killed (SIGKILL) by the test =====",
                    self.name
                )
                .ok();
            }
        }
    }

    /// Sends SIGTERM (the process is then expected to exit on its own: see [`Process::exited`]).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`TERM`, `HUP`, …) to the running process.
    pub fn signal(&self, name: &str) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        assert!(
            signal_group(name, pid),
            "kill -{name} -- -{pid} ({})",
            self.name
        );
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` when the process was started and has exited on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    /// The last `max_bytes` of the log.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        log_tail(&self.log, max_bytes)
    }
}

/// Sends the signal `name` to the process group `pgid` (a [`Process`] leads its own).
fn signal_group(name: &str, pgid: u32) -> bool {
    Command::new("kill")
        .args([&format!("-{name}"), "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn log_tail(path: &Path, max_bytes: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max_bytes);
            let text = String::from_utf8_lossy(&bytes[start..]).into_owned();
            if start > 0 {
                format!("[… {start} bytes cut …]\n{text}")
            } else {
                text
            }
        }
        Err(e) => format!("(no log at {}: {e})", path.display()),
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion and returns its stdout; panics with its output on failure.
pub fn run_output(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {} failed ({}):\nstdout: {}\nstderr: {}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
