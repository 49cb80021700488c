//! `uplinkctl` without a stack: help and examples on every command, completions, exit
//! codes, profiles, and that the token never shows in what it prints. A one-shot fake API
//! (a TCP listener answering one canned response) stands in where an answer is needed; the
//! end-to-end tests against the real stack are tests/tests/ctl_*.rs.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::thread::JoinHandle;

const BIN: &str = env!("CARGO_BIN_EXE_uplinkctl");

/// Runs uplinkctl with a clean environment (no UPLINK_*, config under `home`).
fn run(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run uplinkctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fake API answering one request with `status` and `body`; the thread returns the
/// request's head (request line and headers).
fn fake_api(status: &str, body: &str) -> (String, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (status, body) = (status.to_string(), body.to_string());
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut head = String::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            head.push_str(&line);
        }
        let mut req_body = vec![0; length];
        reader.read_exact(&mut req_body).expect("body");
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 {status}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        head
    });
    (url, handle)
}

#[test]
fn every_command_has_help_with_examples() {
    let home = tempfile::tempdir().expect("tempdir");
    let commands: &[&[&str]] = &[
        &[],
        &["login"],
        &["profiles"],
        &["devices"],
        &["devices", "list"],
        &["devices", "show"],
        &["devices", "register"],
        &["devices", "disable"],
        &["devices", "enable"],
        &["devices", "rotate-key"],
        &["commands"],
        &["commands", "list"],
        &["commands", "show"],
        &["sessions"],
        &["sessions", "list"],
        &["sessions", "show"],
        &["sessions", "pause"],
        &["sessions", "resume"],
        &["sessions", "abort"],
        &["sessions", "manifest"],
        &["projects"],
        &["projects", "list"],
        &["projects", "show"],
        &["projects", "create"],
        &["projects", "update"],
        &["datasets"],
        &["datasets", "list"],
        &["datasets", "show"],
        &["datasets", "create"],
        &["datasets", "update"],
        &["datasets", "seal"],
        &["datasets", "manifest"],
        &["keys"],
        &["keys", "list"],
        &["keys", "create"],
        &["keys", "revoke"],
        &["webhooks"],
        &["webhooks", "list"],
        &["webhooks", "show"],
        &["webhooks", "create"],
        &["webhooks", "delete"],
        &["audit"],
        &["upload"],
        &["config"],
        &["events"],
        &["completions"],
    ];
    for c in commands {
        let mut args = c.to_vec();
        args.push("--help");
        let out = run(home.path(), &args, &[]);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = stdout(&out);
        let examples = text.split_once("Examples:\n  ").map(|(_, e)| e);
        assert!(
            examples.is_some_and(|e| e.contains("uplinkctl ")),
            "`uplinkctl {}` has no examples:\n{text}",
            args.join(" ")
        );
    }
}

#[test]
fn completions_for_each_shell() {
    let home = tempfile::tempdir().expect("tempdir");
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef uplinkctl"),
        ("fish", "complete -c uplinkctl"),
    ] {
        let out = run(home.path(), &["completions", shell], &[]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains(marker), "{shell} completion lacks {marker:?}");
        assert!(
            text.contains("rotate-key"),
            "{shell} completion lacks subcommands"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let home = tempfile::tempdir().expect("tempdir");
    let out = run(home.path(), &["devices", "frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // No API URL anywhere.
    let out = run(home.path(), &["devices", "list"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no API URL"), "{}", stderr(&out));
    // A target without a path.
    let env = [
        ("UPLINK_API_URL", "http://127.0.0.1:9"),
        ("UPLINK_TOKEN", "t0ken-x"),
    ];
    let out = run(home.path(), &["upload", "robot-17", "--no-follow"], &env);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("DEVICE:/absolute/path"),
        "{}",
        stderr(&out)
    );
    // A bad rate.
    let out = run(
        home.path(),
        &["config", "robot-17", "--max-rate", "fast"],
        &env,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--max-rate"), "{}", stderr(&out));
    // clap's own errors are scrubbed of the token too, even one echoed back.
    let out = run(
        home.path(),
        &[
            "--token",
            "upk_k_s3cr3tvalue",
            "devices",
            "upk_k_s3cr3tvalue",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unrecognized subcommand '***'"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("s3cr3t"), "{}", stderr(&out));
    // An explicit profile that does not exist.
    let out = run(home.path(), &["--profile", "nope", "devices", "list"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no profile \"nope\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unreachable_api_exits_4_without_the_token() {
    let home = tempfile::tempdir().expect("tempdir");
    // Nothing listens on the port of a listener just closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let token = "upk_abcdef_s3cr3tvalue";
    let url = format!("http://127.0.0.1:{port}");
    let out = run(
        home.path(),
        &["--api-url", &url, "--token", token, "devices", "list"],
        &[],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("unreachable"), "{err}");
    assert!(
        !err.contains("s3cr3t") && !stdout(&out).contains("s3cr3t"),
        "{err}"
    );
}

#[test]
fn problems_are_one_line_and_exit_3_without_the_token() {
    let home = tempfile::tempdir().expect("tempdir");
    let token = "upk_k1_s3cr3tvalue";
    let (url, api) = fake_api(
        "403 Forbidden",
        r#"{"type":"urn:uplink:problem:forbidden","title":"Forbidden","status":403,"code":"forbidden","detail":"a viewer key may not do this (needs operator)"}"#,
    );
    let out = run(
        home.path(),
        &["devices", "disable", "robot-17"],
        &[("UPLINK_API_URL", &url), ("UPLINK_TOKEN", token)],
    );
    let head = api.join().expect("fake api");
    assert!(head.starts_with("PATCH /v1/devices/robot-17 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("authorization: bearer {token}").to_ascii_lowercase()),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("idempotency-key:"),
        "{head}"
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim_end(),
        "error: 403 forbidden: a viewer key may not do this (needs operator)"
    );
    assert!(!stderr(&out).contains("s3cr3t"));
}

#[test]
fn profiles_pick_url_and_token() {
    let home = tempfile::tempdir().expect("tempdir");
    let (url_a, api_a) = fake_api(
        "404 Not Found",
        r#"{"code":"device_not_found","detail":"no device x"}"#,
    );
    let (url_b, api_b) = fake_api(
        "404 Not Found",
        r#"{"code":"device_not_found","detail":"no device y"}"#,
    );
    let dir = home.path().join("config/uplink");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("ctl.toml"),
        format!(
            "default_profile = \"a\"\n\n[profiles.a]\napi_url = \"{url_a}\"\ntoken = \"tok-a\"\n\n\
             [profiles.b]\napi_url = \"{url_b}\"\ntoken_file = \"{}\"\n",
            dir.join("b.token").display()
        ),
    )
    .expect("write profiles");
    std::fs::write(dir.join("b.token"), "tok-b\n").expect("write token file");
    let out = run(home.path(), &["devices", "show", "x"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).lines().last(),
        Some("error: 404 device_not_found: no device x")
    );
    assert!(api_a.join().expect("a").contains("Bearer tok-a"));
    let out = run(
        home.path(),
        &["--profile", "b", "devices", "show", "y"],
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(api_b.join().expect("b").contains("Bearer tok-b"));
    // `profiles` lists them, never the tokens.
    let out = run(home.path(), &["profiles"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("a *") && text.contains(&url_b), "{text}");
    assert!(!text.contains("tok-a") && !text.contains("tok-b"), "{text}");
}
