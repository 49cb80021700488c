//! `uplinkctl upload --follow` on a terminal: run under a pseudo-terminal (`script` from
//! util-linux), it draws a progress bar (bytes, rate, ETA) while the gateway uploads, then
//! clears it and ends with the object, its SHA-256 and a `done:` line. Not on a terminal,
//! the same command draws no bar (plain lines, ctl_upload.rs).

use std::time::Duration;

use uplink_e2e::ctl::Ctl;
use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

/// The text without ANSI escape sequences (CSI `ESC [ … letter`, and two-byte escapes).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Quotes for `sh -c`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_bar_renders_on_a_terminal_and_ends_cleanly() {
    let script = std::path::Path::new("/usr/bin/script");
    assert!(
        script.is_file(),
        "this test runs uplinkctl under `script` (util-linux, Debian package bsdutils)"
    );
    let stack = Stack::start(StackOptions::default()).await;
    let ctl = Ctl::new(&stack);
    let dev = ctl.register_device(&stack, None).await;
    // 4 MiB/s, one 5 MiB part at a time: the 16 MiB upload takes about 4 s and its parts
    // complete one after the other, so the bar moves (bytes_done counts completed parts).
    stack.start_agent(
        &dev,
        &AgentOptions {
            concurrency: 1,
            extra_toml: "max_upload_bytes_per_sec = 4194304".into(),
            ..Default::default()
        },
    );
    let file = stack.source_file(&dev, "rec/cam-front.mp4", 16 * MIB).await;
    let target = format!("{}:{}", dev.id, file.path_str());
    // A known terminal size; no --follow: following is the default on a terminal.
    let inner = format!(
        "stty cols 120 rows 40; exec {} upload {}",
        sh_quote(ctl.bin.to_str().expect("utf-8 path")),
        sh_quote(&target)
    );
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        ctl.wrapped("/usr/bin/script", &["-qfec", &inner, "/dev/null"])
            .env("TERM", "xterm-256color")
            .env_remove("NO_COLOR")
            .output(),
    )
    .await
    .expect("uplinkctl under script ends within 180 s")
    .expect("run script");
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let shown = || format!("exit {:?}\n--- raw\n{raw:?}", out.status.code());
    assert_eq!(out.status.code(), Some(0), "{}", shown());

    let text = strip_ansi(&raw);
    // The bar was drawn: its template's parts, with the file's total size.
    assert!(text.contains("ETA"), "no ETA drawn: {}", shown());
    assert!(
        text.contains("/16.00 MiB"),
        "no bytes/total drawn: {}",
        shown()
    );
    assert!(text.contains("[="), "no bar drawn: {}", shown());
    // Drawn part way (bytes_done counts completed 5 MiB parts), with a rate and an ETA.
    assert!(
        [
            "5.00 MiB/16.00 MiB",
            "10.00 MiB/16.00 MiB",
            "15.00 MiB/16.00 MiB"
        ]
        .iter()
        .any(|p| text.contains(p)),
        "the bar never showed a position part way: {}",
        shown()
    );
    assert!(text.contains(" MiB/s ETA "), "no rate drawn: {}", shown());
    assert!(
        text.contains("uploading"),
        "the state is not shown: {}",
        shown()
    );
    // What the terminal shows at the end: per line, what follows the last carriage return.
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .map(|l| l.rsplit('\r').next().unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
        .collect();
    let n = lines.len();
    assert!(n >= 3, "{}", shown());
    assert!(
        lines[n - 1].starts_with("done: 16.0 MiB uploaded in "),
        "last line: {:?}\n{}",
        lines[n - 1],
        shown()
    );
    assert_eq!(
        lines[n - 2].split_whitespace().nth(1),
        Some(file.sha256.as_str()),
        "sha256 line: {}",
        shown()
    );
    assert!(
        lines[n - 3].starts_with("object  s3://") && lines[n - 3].ends_with("/cam-front.mp4"),
        "object line: {}",
        shown()
    );
    // The bar was cleared: none of the final lines holds a piece of it.
    for l in &lines[n - 3..] {
        assert!(
            !l.contains("ETA") && !l.contains("[="),
            "{l:?}: {}",
            shown()
        );
    }
    let cmd_id = stack
        .sessions(&dev.id)
        .await
        .first()
        .and_then(|s| s["command_id"].as_str().map(str::to_string))
        .expect("a session of the upload");
    let cmd = stack
        .wait_command_final(&cmd_id, Duration::from_secs(60))
        .await;
    stack.verify_upload(&file, &cmd).await;
}
