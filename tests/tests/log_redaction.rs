//! No log line of a full run carries a presigned URL's signature, a key or a token: every
//! service runs at debug level through a complete upload, then every log file is searched.

use std::path::Path;
use std::time::Duration;

use uplink_e2e::stack::{AgentOptions, Stack, StackOptions};

fn logs_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            logs_under(&path, out);
        } else if path.extension().is_some_and(|e| e == "log") {
            out.push(path);
        }
    }
}

#[tokio::test]
async fn logs_hold_no_signatures_keys_or_tokens() {
    // This test binary runs this one test only, so changing the environment is safe.
    std::env::set_var("UPLINK_TEST_LOG", "debug");
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.add_device(&AgentOptions::default()).await;
    let file = stack.source_file(&dev, "redaction.bin", 6 << 20).await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(180))
        .await;

    let private_key = std::fs::read_to_string(&dev.key_file).expect("device key");
    let forbidden = [
        ("a presigned URL signature", "X-Amz-Signature".to_string()),
        ("a presigned URL credential", "X-Amz-Credential".to_string()),
        ("the device's private key", private_key.trim().to_string()),
        ("the operator token", stack.operator_token.clone()),
        ("the bridge token", stack.bridge_token.clone()),
        ("the S3 secret key", stack.env.s3_secret_key.clone()),
    ];
    let mut logs = Vec::new();
    logs_under(stack.dir.path(), &mut logs);
    assert!(
        logs.len() >= 3,
        "expected the API, bridge and agent logs, found {logs:?}"
    );
    let mut lines = 0;
    for log in &logs {
        let text = std::fs::read_to_string(log).expect("read log");
        lines += text.lines().count();
        for (what, needle) in &forbidden {
            if let Some(line) = text.lines().find(|l| l.contains(needle.as_str())) {
                stack.dump_logs();
                panic!("{} contains {what}: {line}", log.display());
            }
        }
    }
    assert!(
        lines > 50,
        "debug logs of a full upload should not be nearly empty ({lines} lines)"
    );
}
