//! The tools `uplink-bench` measures the agent against, each run as a user would run it
//! against the same S3 server, file size, part size and concurrency: aws-cli (`aws s3 cp`),
//! s5cmd (`s5cmd cp`), rclone (`rclone copyto`). Each run is timed by GNU time (wall, user +
//! system CPU, peak RSS, blocks read), and its object is downloaded and compared with the
//! file. On a link that resets connections each keeps its default retries (enough: see
//! docs/performance.md, "A bad link").

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::env::TestEnv;
use crate::files::{s3_download, sha256_file, SourceFile};

/// What one run of a tool took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measure {
    pub secs: f64,
    /// User + system CPU seconds.
    pub cpu_secs: f64,
    pub peak_rss_kib: u64,
    /// Bytes read from storage (GNU time's file system inputs, 512-byte units, of the tool
    /// and the children it waited for).
    pub read_bytes: u64,
    /// The S3 server's CPU seconds over the run ([`super::proc::server_cpu_secs`]).
    pub server_cpu_secs: f64,
}

/// Where and how a tool uploads.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The S3 endpoint the tool talks to: storage itself or the fault proxy in front of it.
    pub endpoint: &'a str,
    pub part_mib: u64,
    pub concurrency: usize,
    /// Runs GNU time and the tool under this command prefix (e.g.
    /// [`super::cgroup::MemoryCgroup::wrapper`]); empty: directly.
    pub wrapper: &'a [String],
    /// A run still going after this long is killed and counts as failed.
    pub timeout: Duration,
}

/// A baseline tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Aws,
    S5cmd,
    Rclone,
}

impl Tool {
    pub const ALL: [Tool; 3] = [Tool::Aws, Tool::S5cmd, Tool::Rclone];

    pub fn name(self) -> &'static str {
        match self {
            Tool::Aws => "aws-cli",
            Tool::S5cmd => "s5cmd",
            Tool::Rclone => "rclone",
        }
    }
}

/// Where the tools are: `UPLINK_BENCH_BIN` (the bench virtualenv's `bin`, set by
/// scripts/bench) for aws and s5cmd; rclone from PATH.
fn program(tool: Tool) -> PathBuf {
    let venv = std::env::var("UPLINK_BENCH_BIN").unwrap_or_default();
    let in_venv = |name: &str| {
        let p = Path::new(&venv).join(name);
        if p.exists() {
            p
        } else {
            PathBuf::from(name)
        }
    };
    match tool {
        Tool::Aws => in_venv("aws"),
        Tool::S5cmd => in_venv("s5cmd"),
        Tool::Rclone => PathBuf::from("rclone"),
    }
}

/// Uploads `file` to `key` of the stack's bucket with `tool` as `target` says; checks the
/// stored object is byte-identical (a mismatch panics: that is a broken bench, not a slow
/// tool). `Err` carries the first line of the tool's error when it fails or times out.
pub async fn upload(
    env: &TestEnv,
    scratch: &Path,
    tool: Tool,
    file: &SourceFile,
    key: &str,
    target: &Target<'_>,
) -> Result<Measure, String> {
    let (part_mib, concurrency, endpoint) = (target.part_mib, target.concurrency, target.endpoint);
    let dest = format!("s3://{}/{key}", env.s3_bucket);
    let mut cmd = match target.wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args).arg("/usr/bin/time");
            cmd
        }
        None => tokio::process::Command::new("/usr/bin/time"),
    };
    cmd.args(["-f", "uplink-bench-time %e %U %S %M %I", "--"]);
    cmd.arg(program(tool));
    cmd.env("AWS_ACCESS_KEY_ID", &env.s3_access_key)
        .env("AWS_SECRET_ACCESS_KEY", &env.s3_secret_key)
        .env("AWS_REGION", &env.s3_region)
        .env("AWS_DEFAULT_REGION", &env.s3_region)
        // rclone 1.60 cannot use a CA bundle with its HTTP transport (and the endpoint is
        // plain HTTP on 127.0.0.1 anyway).
        .env_remove("AWS_CA_BUNDLE");
    match tool {
        Tool::Aws => {
            let config = scratch.join("aws-config");
            std::fs::write(
                &config,
                format!(
                    "[default]\ns3 =\n  multipart_threshold = {part_mib}MB\n  multipart_chunksize = {part_mib}MB\n  max_concurrent_requests = {concurrency}\n"
                ),
            )
            .expect("write aws config");
            cmd.env("AWS_CONFIG_FILE", &config)
                .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
                .args(["--endpoint-url", endpoint, "s3", "cp", "--only-show-errors"])
                .arg(&file.path)
                .arg(&dest);
        }
        Tool::S5cmd => {
            cmd.args(["--endpoint-url", endpoint, "cp"])
                .args(["--concurrency", &concurrency.to_string()])
                .args(["--part-size", &part_mib.to_string()])
                .arg(&file.path)
                .arg(&dest);
        }
        Tool::Rclone => {
            let remote = [
                ("TYPE", "s3"),
                ("PROVIDER", "Other"),
                ("ACCESS_KEY_ID", env.s3_access_key.as_str()),
                ("SECRET_ACCESS_KEY", env.s3_secret_key.as_str()),
                ("ENDPOINT", endpoint),
                ("REGION", env.s3_region.as_str()),
                ("FORCE_PATH_STYLE", "true"),
            ];
            for (k, v) in remote {
                cmd.env(format!("RCLONE_CONFIG_BENCH_{k}"), v);
            }
            cmd.env("RCLONE_CONFIG", "/dev/null")
                .arg("copyto")
                .arg(&file.path)
                .arg(format!("bench:{}/{key}", env.s3_bucket))
                .args(["--s3-chunk-size", &format!("{part_mib}M")])
                .args(["--s3-upload-cutoff", &format!("{part_mib}M")])
                .args(["--s3-upload-concurrency", &concurrency.to_string()])
                .args(["--s3-disable-checksum", "--no-check-dest"]);
        }
    }
    let server_before = super::proc::server_cpu_secs();
    // Its own process group, so a run that times out is killed with its children.
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("run {} under /usr/bin/time: {e}", tool.name()));
    let group = child.id().expect("a spawned tool has a pid");
    let out = match tokio::time::timeout(target.timeout, child.wait_with_output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("wait for {}: {e}", tool.name())),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .status();
            return Err(format!("still running after {:?}", target.timeout));
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let said: String = stderr
            .lines()
            .filter(|l| {
                !l.starts_with("uplink-bench-time ")
                    && !l.starts_with("Command exited with non-zero status")
            })
            .collect::<Vec<_>>()
            .join("\n");
        return Err(format!("{}: {}", out.status, super::first_line(&said)));
    }
    let measure = Measure {
        server_cpu_secs: super::proc::server_cpu_secs() - server_before,
        ..parse_time(&stderr)
            .unwrap_or_else(|| panic!("no GNU time line in {}'s output: {stderr}", tool.name()))
    };
    check_stored(env, &env.s3_bucket, key, file, scratch, tool.name()).await;
    Ok(measure)
}

/// Downloads `bucket/key`, checks it is byte-identical to `file` (panics if not: `who`
/// stored something else) and deletes it: a full run stores tens of GiB in turn, storage
/// keeps only what is being measured.
pub async fn check_stored(
    env: &TestEnv,
    bucket: &str,
    key: &str,
    file: &SourceFile,
    scratch: &Path,
    who: &str,
) {
    let check = scratch.join(format!("check-{}", crate::unique(who)));
    let code = s3_download(env, bucket, key, &check).await;
    assert_eq!(code, 200, "download {key} after {who}");
    let (sha, len) = sha256_file(&check);
    std::fs::remove_file(&check).ok();
    assert_eq!(
        (len, sha.as_str()),
        (file.size, file.sha256.as_str()),
        "{who}'s object is not byte-identical to the file"
    );
    crate::files::s3_delete(env, bucket, key).await;
}

/// The `uplink-bench-time wall user sys maxrss_kib inputs` line GNU time wrote last.
pub fn parse_time(stderr: &str) -> Option<Measure> {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("uplink-bench-time "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    (f.len() == 5).then(|| Measure {
        secs: f[0],
        cpu_secs: f[1] + f[2],
        peak_rss_kib: f[3] as u64,
        read_bytes: f[4] as u64 * 512,
        server_cpu_secs: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gnu_time() {
        let m = parse_time("progress\nuplink-bench-time 12.50 3.25 1.25 20480 8\n").unwrap();
        assert_eq!(
            (m.secs, m.cpu_secs, m.peak_rss_kib, m.read_bytes),
            (12.5, 4.5, 20480, 4096)
        );
        assert!(parse_time("uplink-bench-time 1 2 3 4\n").is_none());
    }
}
