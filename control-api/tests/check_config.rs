//! `uplink-api check-config` on bad files: every problem is listed with the file, line and
//! field (or the environment variable that set it), the exit code is 1, and secrets in the
//! file never appear in the output. Needs no database: the configuration is only read.

use std::path::{Path, PathBuf};
use std::process::Command;

const SECRET: &str = "hunter2-do-not-print";

/// Valid except where a test changes it; line numbers matter to the assertions.
fn good() -> String {
    format!(
        "database_url = \"postgres://uplink:{SECRET}@127.0.0.1/uplink\"\n\
         operator_token = \"operator-token-0123456789\"\n\
         bridge_token = \"bridge-token-0123456789\"\n\
         command_key_file = \"/etc/uplink/command.key\"\n\
         \n\
         [s3]\n\
         endpoint = \"http://127.0.0.1:8333\"\n\
         bucket = \"uplink\"\n\
         access_key_id = \"key\"\n\
         secret_access_key = \"{SECRET}\"\n"
    )
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("api.toml");
    std::fs::write(&file, text).expect("write config");
    file
}

/// Runs the real binary with only `env` in its environment; (exit code, stdout, stderr).
fn check_config(file: &Path, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_uplink-api"))
        .args([
            "--config",
            file.to_str().expect("utf-8 path"),
            "check-config",
        ])
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run uplink-api");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_fails_with(file: &Path, env: &[(&str, &str)], lines: &[String]) {
    let (code, stdout, stderr) = check_config(file, env);
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    for line in lines {
        assert!(
            stderr.lines().any(|l| l == line),
            "missing line {line:?} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains(SECRET), "secret printed:\n{stderr}");
    assert!(!stdout.contains(SECRET), "secret printed:\n{stdout}");
}

#[test]
fn a_valid_file_passes_also_when_named_by_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), &good());
    let (code, stdout, stderr) = check_config(&file, &[]);
    assert_eq!(
        (code, stdout.as_str()),
        (Some(0), "config ok\n"),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_uplink-api"))
        .arg("check-config")
        .env_clear()
        .env("UPLINK_API_CONFIG", &file)
        .output()
        .expect("run uplink-api");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_validation_problem_is_listed_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = good()
        .replace("postgres://", "mysql://")
        .replace("http://127.0.0.1:8333", "127.0.0.1:8333")
        .replace("bridge-token-0123456789", "short");
    let file = write(dir.path(), &text);
    let f = file.display();
    assert_fails_with(
        &file,
        &[],
        &[
            format!("{f}:1:1: database_url: must be a postgres:// or postgresql:// URL"),
            format!("{f}:3:1: bridge_token: must be at least 16 characters"),
            format!("{f}:7:1: s3.endpoint: must be an http:// or https:// URL"),
        ],
    );
}

#[test]
fn parse_errors_name_line_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        &format!("{}presign_ttl_secs = \"soon\"\n", good()),
    );
    assert_fails_with(
        &file,
        &[],
        &[format!(
            "{}:11:1: s3.presign_ttl_secs: invalid type: found string \"soon\", expected u64",
            file.display()
        )],
    );
    let file = write(dir.path(), &good().replace("bucket = \"uplink\"\n", ""));
    assert_fails_with(
        &file,
        &[],
        &[format!(
            "{}:6:1: s3.bucket: missing (it has no default)",
            file.display()
        )],
    );
    // A secret that is not a string is read as one rather than echoed in a type error.
    let file = write(
        dir.path(),
        &good().replace(&format!("\"{SECRET}\"\n"), "1234\nregion = 5\n"),
    );
    assert_fails_with(
        &file,
        &[],
        &[format!(
            "{}:11:1: s3.region: invalid type: found signed int `5`, expected a string",
            file.display()
        )],
    );
}

#[test]
fn a_syntax_error_names_its_line_without_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = good().replace(&format!("\"{SECRET}\"\n"), &format!("\"{SECRET}\n"));
    let file = write(dir.path(), &text);
    assert_fails_with(&file, &[], &[]);
    let (_, _, stderr) = check_config(&file, &[]);
    let prefix = format!("{}:10:", file.display());
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains("not valid TOML")),
        "{stderr}"
    );
}

#[test]
fn environment_values_name_their_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), &good());
    assert_fails_with(
        &file,
        &[
            ("UPLINK_API_S3__BUCKET", ""),
            ("UPLINK_API_OPERATOR_TOKEN", SECRET),
            ("UPLINK_API_BRIDGE_TOKEN", SECRET),
            ("UPLINK_API_LISTEN", "nowhere"),
        ],
        &["UPLINK_API_LISTEN (environment): listen: invalid socket address syntax".into()],
    );
    assert_fails_with(
        &file,
        &[
            ("UPLINK_API_S3__BUCKET", ""),
            ("UPLINK_API_OPERATOR_TOKEN", SECRET),
            ("UPLINK_API_BRIDGE_TOKEN", SECRET),
        ],
        &[
            "UPLINK_API_BRIDGE_TOKEN (environment): bridge_token: must differ from \
             operator_token"
                .into(),
            "UPLINK_API_S3__BUCKET (environment): s3.bucket: must not be empty".into(),
        ],
    );
}

#[test]
fn https_files_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("api.pem");
    std::fs::write(&cert, "not a certificate\n").expect("write");
    let line = |field: &str| format!("tls_cert_file = {:?}\n{field}", cert.display().to_string());
    let file = write(dir.path(), &format!("{}{}", line(""), good()));
    assert_fails_with(
        &file,
        &[],
        &[format!(
            "{}:1:1: tls_cert_file: set tls_cert_file and tls_key_file together",
            file.display()
        )],
    );
    let with_key = format!("tls_key_file = {:?}\n", cert.display().to_string());
    let file = write(dir.path(), &format!("{}{}", line(&with_key), good()));
    assert_fails_with(
        &file,
        &[],
        &[format!(
            "{}:1:1: tls_cert_file: {} holds no PEM certificate",
            file.display(),
            cert.display()
        )],
    );
}
