//! `uplink-bridge check-config` on bad files: every problem is listed with the file, line
//! and field (or the environment variable that set it), the exit code is 1, and secrets in
//! the file never appear in the output.

use std::path::PathBuf;
use std::process::Command;

const SECRET: &str = "hunter2-do-not-print";

/// Valid except where a test changes it; line numbers matter to the assertions.
fn good() -> String {
    format!(
        "api_url = \"http://127.0.0.1:8080\"\n\
         api_token = \"{SECRET}\"\n\
         \n\
         [broker]\n\
         mode = \"external\"\n\
         host = \"127.0.0.1\"\n\
         port = 1883\n\
         username = \"uplink-bridge\"\n\
         password = \"{SECRET}\"\n"
    )
}

/// Runs the real binary on `text` with only `env` in its environment; (exit code, file,
/// stdout, stderr).
fn check_config(text: &str, env: &[(&str, &str)]) -> (Option<i32>, PathBuf, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bridge.toml");
    std::fs::write(&file, text).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_uplink-bridge"))
        .args([
            "--config",
            file.to_str().expect("utf-8 path"),
            "check-config",
        ])
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run uplink-bridge");
    (
        out.status.code(),
        file,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Exit 1, each of `lines` (with `{file}` for the path) on a line of its own, no secret.
fn assert_fails_with(text: &str, env: &[(&str, &str)], lines: &[&str]) {
    let (code, file, stdout, stderr) = check_config(text, env);
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    for line in lines {
        let line = line.replace("{file}", &file.display().to_string());
        assert!(
            stderr.lines().any(|l| l == line),
            "missing line {line:?} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains(SECRET), "secret printed:\n{stderr}");
    assert!(!stdout.contains(SECRET), "secret printed:\n{stdout}");
}

#[test]
fn a_valid_file_passes() {
    let (code, _, stdout, stderr) = check_config(&good(), &[]);
    assert_eq!(
        (code, stdout.as_str()),
        (Some(0), "config ok\n"),
        "{stderr}"
    );
}

#[test]
fn every_validation_problem_is_listed_with_its_line() {
    let text = good()
        .replace("http://127.0.0.1:8080", "ftp://api")
        .replace("port = 1883", "port = 0")
        .replace("username = \"uplink-bridge\"\n", "");
    assert_fails_with(
        &text,
        &[],
        &[
            "{file}:1:1: api_url: `ftp://api` must be an http:// or https:// URL",
            "{file}:7:1: broker.port: must not be 0",
            "{file}:4:1: broker.username: required when broker.password is set",
        ],
    );
}

#[test]
fn parse_errors_name_line_and_field() {
    assert_fails_with(
        &good().replace("mode = \"external\"", "mode = \"sideways\""),
        &[],
        &[
            "{file}:5:1: broker.mode: unknown variant `sideways` (expected one of: embedded, \
           external)",
        ],
    );
    assert_fails_with(
        &format!("{}shared_subscription = true\n", good()),
        &[],
        &[
            "{file}:10:1: broker.shared_subscription: unknown field (expected one of: mode, \
           listen, host, port, username, password, client_id, shared_subscriptions, \
           dynamic_security, tls, \
           ca_file, client_cert_file, client_key_file, server_name, tls_listen, tls_cert_file, \
           tls_key_file, tls_client_ca_file)",
        ],
    );
    assert_fails_with(
        &good().replace(&format!("api_token = \"{SECRET}\"\n"), ""),
        &[],
        &["{file}: api_token: missing (it has no default)"],
    );
    // An unterminated string: the parser's snippet would show the secret.
    let (_, file, _, stderr) = check_config(
        &good().replace(&format!("\"{SECRET}\"\n"), &format!("\"{SECRET}\n")),
        &[],
    );
    assert!(!stderr.contains(SECRET), "{stderr}");
    let prefix = format!("{}:2:", file.display());
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains("not valid TOML")),
        "{stderr}"
    );
}

#[test]
fn environment_values_name_their_variable() {
    assert_fails_with(
        &good(),
        &[
            ("UPLINK_BRIDGE_BROKER__PORT", "0"),
            ("UPLINK_BRIDGE_API_TOKEN", SECRET),
        ],
        &["UPLINK_BRIDGE_BROKER__PORT (environment): broker.port: must not be 0"],
    );
    assert_fails_with(
        &good(),
        &[("UPLINK_BRIDGE_POLL_INTERVAL_MS", "often")],
        &[
            "UPLINK_BRIDGE_POLL_INTERVAL_MS (environment): poll_interval_ms: invalid type: \
           found string \"often\", expected u64",
        ],
    );
}
