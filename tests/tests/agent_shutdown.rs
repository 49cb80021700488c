//! SIGTERM mid-upload: the agent stops starting parts, lets the ones in flight finish or
//! abandons them within its bound, records what it has, says goodbye and exits 0 within
//! 15 s. Started again, it finishes the upload in storage, byte-identical.

use std::process::Command;
use std::time::Duration;

use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

/// `(state, exit code as waitpid reports it)` from `/proc/<pid>/stat`; `None` once gone.
fn proc_state(pid: u32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 52 (exit_code) is the 50th after the name.
    let code = fields.get(49).and_then(|c| c.parse().ok()).unwrap_or(-1);
    Some((state, code))
}

fn agent_pid(config: &str) -> u32 {
    let out = Command::new("pgrep")
        .args(["-f", &format!("uplink-agent --config {config} run")])
        .output()
        .expect("run pgrep");
    let text = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(pids.len(), 1, "one agent runs with {config}: {text:?}");
    pids[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_upload_exits_zero_and_the_upload_resumes() {
    let stack = Stack::start(StackOptions::default()).await;
    let opts = AgentOptions {
        concurrency: 2,
        part_size_mib: 5,
        // 3 MiB/s: the 40 MiB upload takes ~13 s, and a 5 MiB part in flight ~3 s.
        extra_toml: format!("max_upload_bytes_per_sec = {}", 3 * MIB),
        ..AgentOptions::default()
    };
    let dev = stack.add_device(&opts).await;
    let file = stack.source_file(&dev, "rec/term.bin", 40 * MIB).await;
    let command_id = stack.upload_command(&dev.id, file.path_str()).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while stack.proxy.bytes_sent() < 12 * MIB {
        let cmd = stack.command(&command_id).await;
        assert_ne!(cmd["state"], "done", "finished before the SIGTERM: {cmd}");
        stack.assert_alive();
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} bytes reached storage within 120 s",
            stack.proxy.bytes_sent()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let config = dev.dir.join("agent.toml");
    let pid = agent_pid(config.to_str().expect("UTF-8 path"));
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -TERM {pid}");
    let started = tokio::time::Instant::now();
    let code = loop {
        match proc_state(pid) {
            None => break None,
            Some(('Z', code)) => break Some(code),
            Some(_) => {}
        }
        if started.elapsed() > Duration::from_secs(15) {
            stack.dump_logs();
            panic!("the agent did not exit within 15 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "agent exited {:?} after {:?}; {} bytes had reached storage",
        code,
        started.elapsed(),
        stack.proxy.bytes_sent()
    );
    if let Some(code) = code {
        assert_eq!(code, 0, "exit status after SIGTERM (waitpid form)");
    }
    let log = std::fs::read_to_string(dev.dir.join("agent.log")).unwrap_or_default();
    assert!(log.contains("SIGTERM received"), "agent log:\n{log}");
    assert!(log.contains("Agent stopped"), "agent log:\n{log}");
    let cmd = stack.command(&command_id).await;
    assert_ne!(cmd["state"], "done", "the upload was not finished: {cmd}");

    stack.restart_agent(&dev);
    let cmd = stack
        .wait_command_final(&command_id, Duration::from_secs(240))
        .await;
    stack.verify_upload(&file, &cmd).await;
    let sessions = stack.sessions(&dev.id).await;
    assert_eq!(
        sessions.len(),
        1,
        "resumed in the same session: {sessions:?}"
    );
}
