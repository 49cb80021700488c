//! The command-key rotation of docs/security.md ("Rotating the command key"), end to end
//! with the real API, bridge and agents:
//!
//! 1. the API announces the next key (`command_next_key_file` → `next_public_key`);
//! 2. an agent pins it beside the current one (`command_public_keys`);
//! 3. the API switches keys in the middle of that agent's upload: the upload finishes (its
//!    later answers are signed with the new key) and a new command signed with the new key
//!    is done: no command or answer refused;
//! 4. control: an agent that pins only the old key drops the new key's command.

use std::path::Path;
use std::time::Duration;

use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};
use uplink_protocol::sign;

/// Writes a fresh command key to `path`; returns its public half (base64).
fn new_key(path: &Path) -> String {
    let key = sign::generate();
    std::fs::write(path, sign::encode_private(&key)).expect("write key file");
    sign::encode_public(&key.verifying_key())
}

async fn announced(stack: &Stack) -> (String, Option<String>) {
    let reply = stack.get_json("/v1/command-key").await;
    assert_eq!(reply.status, 200, "GET /v1/command-key: {reply}");
    (
        reply.body["public_key"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        reply.body["next_public_key"].as_str().map(str::to_string),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_key_rotates_without_refused_commands() {
    let stack = Stack::start(StackOptions::default()).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let next_file = keys.path().join("command-next.key");
    let next_public = new_key(&next_file);
    let next_path = next_file.to_str().expect("utf-8 path");

    // 1. The API announces the next key.
    stack
        .restart_api_with(&[("UPLINK_API_COMMAND_NEXT_KEY_FILE", next_path)])
        .await;
    let (current, next) = announced(&stack).await;
    assert_eq!(current, stack.command_public_key);
    assert_eq!(next.as_deref(), Some(next_public.as_str()));

    // 2. One agent pins both keys, another only the current one (the control).
    let rotated = stack
        .add_device(&AgentOptions {
            extra_toml: format!(
                "command_public_keys = [\"{next_public}\"]\nmax_upload_bytes_per_sec = {}",
                2 * MIB
            ),
            ..AgentOptions::default()
        })
        .await;
    let stale = stack.add_device(&AgentOptions::default()).await;

    // 3. Switch in the middle of an upload (12 MiB at 2 MiB/s: about 6 s).
    let file = stack
        .source_file(&rotated, "rec/rotation.bin", 12 * MIB)
        .await;
    let first = stack.upload_command(&rotated.id, file.path_str()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sessions = stack.sessions(&rotated.id).await;
        if sessions.iter().any(|s| s["state"] == "uploading") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no upload under way: {sessions:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after_file = keys.path().join("command-after.key");
    let after_public = new_key(&after_file);
    stack
        .restart_api_with(&[
            ("UPLINK_API_COMMAND_KEY_FILE", next_path),
            (
                "UPLINK_API_COMMAND_NEXT_KEY_FILE",
                after_file.to_str().expect("utf-8 path"),
            ),
        ])
        .await;
    let (current, next) = announced(&stack).await;
    assert_eq!(current, next_public, "the API signs with the new key");
    assert_eq!(next.as_deref(), Some(after_public.as_str()));
    let cmd = stack
        .wait_command_final(&first, Duration::from_secs(180))
        .await;
    assert_eq!(cmd["state"], "done", "the upload across the switch: {cmd}");
    stack.verify_upload(&file, &cmd).await;

    let second_file = stack.source_file(&rotated, "rec/after.bin", MIB).await;
    let second = stack
        .upload_command(&rotated.id, second_file.path_str())
        .await;
    let cmd = stack
        .wait_command_final(&second, Duration::from_secs(120))
        .await;
    assert_eq!(
        cmd["state"], "done",
        "a command signed with the new key: {cmd}"
    );

    // 4. The agent that pins only the old key drops the new key's command.
    let stale_file = stack.source_file(&stale, "rec/stale.bin", MIB).await;
    let refused = stack.upload_command(&stale.id, stale_file.path_str()).await;
    stack
        .wait_agent_log(
            &stale,
            "Command with a bad signature; dropped",
            Duration::from_secs(60),
            "the agent pinning only the old key logs the dropped command",
        )
        .await;
    let cmd = stack.command(&refused).await;
    assert!(
        !matches!(cmd["state"].as_str(), Some("accepted" | "done")),
        "an agent pinning only the old key took a command signed with the new key: {cmd}"
    );
    stack.assert_alive();
}
