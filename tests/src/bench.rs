//! The tools `uplink-bench` measures the agent against, each run as a user would run it
//! against the same S3 server, file size, part size and concurrency: aws-cli (`aws s3 cp`),
//! s5cmd (`s5cmd cp`), rclone (`rclone copyto`). Each run is timed by GNU time (wall, user +
//! system CPU, peak RSS), and its object is downloaded and compared with the file.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::env::TestEnv;
use crate::files::{s3_download, sha256_file, SourceFile};

/// What one run of a tool took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measure {
    pub secs: f64,
    /// User + system CPU seconds.
    pub cpu_secs: f64,
    pub peak_rss_kib: u64,
    /// The S3 server's CPU seconds over the run ([`server_cpu_secs`]; 0 when unknown).
    pub server_cpu_secs: f64,
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

/// Uploads `file` to `key` of the stack's bucket with `tool`, `part_mib`-MiB parts and
/// `concurrency` in flight; checks the stored object is byte-identical.
pub async fn upload(
    env: &TestEnv,
    scratch: &Path,
    tool: Tool,
    file: &SourceFile,
    key: &str,
    part_mib: u64,
    concurrency: usize,
) -> Measure {
    let target = format!("s3://{}/{key}", env.s3_bucket);
    let mut cmd = tokio::process::Command::new("/usr/bin/time");
    cmd.args(["-f", "uplink-bench-time %e %U %S %M", "--"]);
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
                .args([
                    "--endpoint-url",
                    &env.s3_endpoint,
                    "s3",
                    "cp",
                    "--only-show-errors",
                ])
                .arg(&file.path)
                .arg(&target);
        }
        Tool::S5cmd => {
            cmd.args(["--endpoint-url", &env.s3_endpoint, "cp"])
                .args(["--concurrency", &concurrency.to_string()])
                .args(["--part-size", &part_mib.to_string()])
                .arg(&file.path)
                .arg(&target);
        }
        Tool::Rclone => {
            let remote = [
                ("TYPE", "s3"),
                ("PROVIDER", "Other"),
                ("ACCESS_KEY_ID", env.s3_access_key.as_str()),
                ("SECRET_ACCESS_KEY", env.s3_secret_key.as_str()),
                ("ENDPOINT", env.s3_endpoint.as_str()),
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
    let server_before = server_cpu_secs();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {} under /usr/bin/time: {e}", tool.name()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}): {stderr}",
        tool.name(),
        out.status
    );
    let measure = Measure {
        server_cpu_secs: server_cpu_secs() - server_before,
        ..parse_time(&stderr)
            .unwrap_or_else(|| panic!("no GNU time line in {}'s output: {stderr}", tool.name()))
    };
    let dest = scratch.join(format!("check-{}", tool.name()));
    let code = s3_download(env, &env.s3_bucket, key, &dest).await;
    assert_eq!(code, 200, "download {key} after {}", tool.name());
    let (sha, len) = sha256_file(&dest);
    std::fs::remove_file(&dest).ok();
    assert_eq!(
        (len, sha.as_str()),
        (file.size, file.sha256.as_str()),
        "{}'s object is not byte-identical to the file",
        tool.name()
    );
    // A full run stores tens of GiB: storage keeps only what is being measured.
    crate::files::s3_delete(env, &env.s3_bucket, key).await;
    measure
}

/// The `uplink-bench-time wall user sys maxrss_kib` line GNU time wrote last.
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
    (f.len() == 4).then(|| Measure {
        secs: f[0],
        cpu_secs: f[1] + f[2],
        peak_rss_kib: f[3] as u64,
        server_cpu_secs: 0.0,
    })
}

/// User + system CPU seconds a running process has used so far (`/proc/PID/stat`).
pub fn cpu_secs_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// CPU seconds the S3 server (`UPLINK_BENCH_SERVER_PID`, set by scripts/bench) has used so
/// far; 0 when it is not known. Differences show what each client costs the server.
pub fn server_cpu_secs() -> f64 {
    std::env::var("UPLINK_BENCH_SERVER_PID")
        .ok()
        .and_then(|p| p.parse().ok())
        .and_then(cpu_secs_of)
        .unwrap_or(0.0)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The median of `xs` (the mean of the middle two for an even count); 0 when empty.
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gnu_time_and_proc_stat() {
        let m = parse_time("progress\nuplink-bench-time 12.50 3.25 1.25 20480\n").unwrap();
        assert_eq!((m.secs, m.cpu_secs, m.peak_rss_kib), (12.5, 4.5, 20480));
        assert!(parse_time("uplink-bench-time 1 2\n").is_none());
        assert!(cpu_secs_of(std::process::id()).is_some());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
