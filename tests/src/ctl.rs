//! Driving the real `uplinkctl` binary against a [`Stack`] (tests/tests/ctl_*.rs).
//!
//! The token goes in `UPLINK_TOKEN`, never in the arguments; each [`Ctl`] has its own
//! `HOME` / `XDG_CONFIG_HOME`, so no profile file of the machine is read.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use uplink_protocol::sign;

use crate::stack::{public_key_of, Device, Stack};

/// `uplinkctl` for one caller (API URL and token).
pub struct Ctl {
    pub bin: PathBuf,
    pub api_url: String,
    pub token: String,
    pub home: tempfile::TempDir,
}

/// How a run ended.
#[derive(Debug)]
pub struct CtlRun {
    pub args: Vec<String>,
    /// `None`: killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for CtlRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "uplinkctl {} exited {:?}\n--- stdout\n{}--- stderr\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
}

impl CtlRun {
    /// The one JSON document on stdout.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self}"))
    }

    /// One JSON document per line of stdout.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("line {l:?} is not JSON ({e}): {self}"))
            })
            .collect()
    }
}

impl Ctl {
    /// As the stack's bootstrap operator.
    pub fn new(stack: &Stack) -> Ctl {
        Ctl::with_token(stack, &stack.operator_token)
    }

    pub fn with_token(stack: &Stack, token: &str) -> Ctl {
        let bin = stack.env.bin("uplinkctl");
        assert!(
            bin.is_file(),
            "{} does not exist: build it first (`cargo build -p uplinkctl`, or \
             `cargo build --workspace --all-targets`)",
            bin.display()
        );
        Ctl {
            bin,
            api_url: stack.api_url.clone(),
            token: token.to_string(),
            home: tempfile::tempdir().expect("uplinkctl home"),
        }
    }

    /// The command with this caller's environment (and nothing of the runner's `UPLINK_*`).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args);
        self.environment(&mut cmd);
        cmd
    }

    /// `program args…` (e.g. `script -qec "uplinkctl …"`) with this caller's environment.
    pub fn wrapped(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.environment(&mut cmd);
        cmd
    }

    fn environment(&self, cmd: &mut Command) {
        cmd.env_remove("UPLINK_PROFILE")
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("UPLINK_API_URL", &self.api_url)
            .env("UPLINK_TOKEN", &self.token)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
    }

    /// Runs to the end (at most 180 s).
    pub async fn run(&self, args: &[&str]) -> CtlRun {
        let out = tokio::time::timeout(Duration::from_secs(180), self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("uplinkctl {} did not end within 180 s", args.join(" ")))
            .expect("run uplinkctl");
        CtlRun {
            args: args.iter().map(|a| a.to_string()).collect(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs with `--json`, asserts exit 0 and returns the document.
    pub async fn ok(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let run = self.run(&all).await;
        assert_eq!(run.code, Some(0), "{run}");
        run.json()
    }

    /// Starts it with stdout piped (read it line by line with [`Follower::next_json`]).
    pub fn spawn(&self, args: &[&str]) -> Follower {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn uplinkctl");
        let stdout = child.stdout.take().expect("stdout");
        Follower {
            child,
            lines: BufReader::new(stdout).lines(),
            seen: Vec::new(),
        }
    }

    /// Makes a key pair with `uplink-agent keygen` and registers the device with
    /// `uplinkctl devices register` (in `project`, else `default`); the agent is not started
    /// (see [`Stack::start_agent`]).
    pub async fn register_device(&self, stack: &Stack, project: Option<&str>) -> Device {
        let id = crate::unique("robot");
        let dir = stack.dir.path().join(&id);
        let root = dir.join("root");
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&root).expect("create root");
        std::fs::create_dir_all(&state_dir).expect("create state dir");
        let key_file = dir.join("device.key");
        crate::process::run_output(
            &stack.env.bin("uplink-agent"),
            &["keygen", "--out", key_file.to_str().expect("utf-8 path")],
        );
        let public_key = public_key_of(&key_file);
        let mut args = vec!["devices", "register", &id, "--public-key", &public_key];
        if let Some(p) = project {
            args.extend(["--project", p]);
        }
        let device = self.ok(&args).await;
        assert_eq!(device["device_id"], id.as_str(), "{device}");
        let key = sign::decode_private(&std::fs::read_to_string(&key_file).expect("read key"))
            .expect("device key");
        Device {
            id,
            key,
            public_key,
            key_file,
            dir,
            root,
            state_dir,
            mqtt_password: None,
        }
    }
}

/// A running `uplinkctl` whose stdout is read as it comes.
pub struct Follower {
    pub child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Follower {
    /// The next stdout line as JSON; `None` at the end of output. Panics after `timeout`.
    pub async fn next_json(&mut self, timeout: Duration) -> Option<Value> {
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no line from uplinkctl within {timeout:?}; so far:\n{}",
                    self.seen.join("\n")
                )
            })
            .expect("read uplinkctl stdout")?;
        self.seen.push(line.clone());
        Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("line {line:?} is not JSON: {e}")),
        )
    }

    /// Reads documents until one matches; panics at the end of output or after `timeout`.
    pub async fn until(&mut self, timeout: Duration, what: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_json(left).await {
                Some(v) if what(&v) => return v,
                Some(_) => {}
                None => panic!(
                    "uplinkctl ended before the awaited document; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Reads the rest of stdout and waits for the exit; returns the exit code, every stdout
    /// line and stderr.
    pub async fn finish(mut self, timeout: Duration) -> (Option<i32>, Vec<String>, String) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if self.next_json(left).await.is_none() {
                break;
            }
        }
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt as _;
            let _ = e.read_to_string(&mut stderr).await;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let status = tokio::time::timeout(left, self.child.wait())
            .await
            .expect("uplinkctl exits")
            .expect("wait uplinkctl");
        (status.code(), self.seen, stderr)
    }
}
