//! `uplink-agent check-config` on bad files: every problem is listed with the file, line
//! and field (or the environment variable that set it), the exit code is 1, and a secret in
//! the file never appears in the output.

use std::path::{Path, PathBuf};
use std::process::Command;

const SECRET: &str = "hunter2-do-not-print";

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the real binary with only `env` in its environment.
fn agent(args: &[&str], env: &[(&str, &str)]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_uplink-agent"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run uplink-agent");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn check_config(file: &Path, env: &[(&str, &str)]) -> Out {
    agent(
        &[
            "--config",
            file.to_str().expect("utf-8 path"),
            "check-config",
        ],
        env,
    )
}

/// A valid configuration: a real device key, a command key, a state dir and a root.
fn valid(dir: &Path) -> String {
    let key = dir.join("device.key");
    let out = agent(&["keygen", "--out", key.to_str().expect("utf-8")], &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let command_key = agent(
        &[
            "keygen",
            "--out",
            dir.join("cmd.key").to_str().expect("utf-8"),
        ],
        &[],
    );
    let root = dir.join("data");
    std::fs::create_dir_all(&root).expect("mkdir");
    format!(
        "device_id = \"robot-1\"\n\
         key_file = \"{}\"\n\
         command_public_key = \"{}\"\n\
         state_dir = \"{}\"\n\
         allowed_roots = [\"{}\"]\n\
         \n\
         [mqtt]\n\
         host = \"broker\"\n\
         password = \"{SECRET}\"\n",
        key.display(),
        command_key.stdout.trim(),
        dir.join("state").display(),
        root.display(),
    )
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("agent.toml");
    std::fs::write(&file, text).expect("write config");
    file
}

fn assert_fails_with(out: &Out, lines: &[String]) {
    assert_eq!(
        out.code,
        Some(1),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    for line in lines {
        assert!(
            out.stderr.lines().any(|l| l == line),
            "missing line {line:?} in:\n{}",
            out.stderr
        );
    }
    assert!(
        !out.stderr.contains(SECRET),
        "secret printed:\n{}",
        out.stderr
    );
    assert!(
        !out.stdout.contains(SECRET),
        "secret printed:\n{}",
        out.stdout
    );
}

#[test]
fn a_valid_file_passes_also_when_named_by_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), &valid(dir.path()));
    let out = check_config(&file, &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "config ok\n");
    // UPLINK_AGENT_CONFIG names the file; it is not taken for a configuration field.
    let out = agent(
        &["check-config"],
        &[("UPLINK_AGENT_CONFIG", file.to_str().expect("utf-8"))],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[test]
fn a_wrong_type_names_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), &format!("{}port = \"x\"\n", valid(dir.path())));
    let out = check_config(&file, &[]);
    assert_fails_with(
        &out,
        &[format!(
            "{}:10:1: mqtt.port: invalid type: found string \"x\", expected u16",
            file.display()
        )],
    );
}

#[test]
fn an_unknown_field_names_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = valid(dir.path()).replace("host = ", "hots = ");
    let file = write(dir.path(), &text);
    let out = check_config(&file, &[]);
    assert_fails_with(
        &out,
        &[format!(
            "{}:8:1: mqtt.hots: unknown field (expected one of: host, port, username, password, password_file, \
             tls, ca_file, client_cert_file, client_key_file, server_name)",
            file.display()
        )],
    );
}

#[test]
fn a_password_and_a_password_file_conflict_without_printing_either() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("mqtt.password");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write password file");
    let text = format!(
        "{}password_file = \"{}\"\n",
        valid(dir.path()),
        secret_file.display()
    );
    let file = write(dir.path(), &text);
    let out = check_config(&file, &[]);
    assert_fails_with(
        &out,
        &[format!(
            "{}:10:1: mqtt.password_file: set either mqtt.password or mqtt.password_file, not both",
            file.display()
        )],
    );
    // Alone, the file is taken.
    let text = text.replace(&format!("password = \"{SECRET}\"\n"), "");
    let file = write(dir.path(), &text);
    let out = check_config(&file, &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[test]
fn a_missing_field_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text: String = valid(dir.path())
        .lines()
        .filter(|l| !l.starts_with("state_dir"))
        .map(|l| format!("{l}\n"))
        .collect();
    let file = write(dir.path(), &text);
    let out = check_config(&file, &[]);
    assert_fails_with(
        &out,
        &[format!(
            "{}: state_dir: missing (it has no default)",
            file.display()
        )],
    );
}

#[test]
fn a_syntax_error_names_its_line_and_column_without_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    // An unterminated string: the parser's snippet would show the secret.
    let text = valid(dir.path()).replace(&format!("\"{SECRET}\""), &format!("\"{SECRET}"));
    let file = write(dir.path(), &text);
    let out = check_config(&file, &[]);
    assert_fails_with(&out, &[]);
    let prefix = format!("{}:9:", file.display());
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains("not valid TOML")),
        "{}",
        out.stderr
    );
}

#[test]
fn every_validation_problem_is_listed_with_its_line_or_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = valid(dir.path())
        .replace("device_id = \"robot-1\"", "device_id = \"a/b\"")
        .replace("host = \"broker\"", "host = \" \"");
    let file = write(dir.path(), &text);
    let out = check_config(&file, &[("UPLINK_AGENT_CONCURRENCY", "0")]);
    let f = file.display();
    assert_fails_with(
        &out,
        &[
            format!(
                "{f}:1:1: device_id: \"a/b\" is not a valid device id (1-64 of A-Z a-z 0-9 . _ -, \
                 not starting with a dot)"
            ),
            "UPLINK_AGENT_CONCURRENCY (environment): concurrency: 0 is outside 1..=64".into(),
            format!("{f}:8:1: mqtt.host: must not be empty"),
        ],
    );
}

#[test]
fn a_bad_environment_value_names_its_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), &valid(dir.path()));
    let out = check_config(&file, &[("UPLINK_AGENT_MQTT__PORT", "many")]);
    assert_fails_with(
        &out,
        &[
            "UPLINK_AGENT_MQTT__PORT (environment): mqtt.port: invalid type: found string \
           \"many\", expected u16"
                .into(),
        ],
    );
}
