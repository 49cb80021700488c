//! The agent end to end against in-process fakes (`fake/`): an embedded rumqttd broker
//! (checking the agent's MQTT password), a fake control plane answering requests over MQTT
//! (checking every signature), and a fake S3 that verifies Content-MD5 and answers MD5
//! ETags. The real cross-service tests live in `tests/`; this one needs nothing outside the
//! process.

#![allow(clippy::unwrap_used)] // test code

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uplink_protocol::command::{AckState, Action, Command};
use uplink_protocol::ops::SessionState;
use uplink_protocol::sign;
use uplink_protocol::telemetry::Presence;
use uplink_protocol::{plan, unix_now};
use uuid::Uuid;

mod fake;

use fake::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_rejects_and_dedups_commands() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("uplink_agent=debug")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let device_key = sign::generate();
    let port = free_port();
    start_broker(port, device_key.verifying_key());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s3_addr, s3) = start_s3().await;
    let mut cloud = start_cloud(port, device_key.verifying_key(), s3_addr, s3.clone()).await;

    let cfg = config(&base, port, &device_key, &cloud.cmd_key);
    let loaded = cfg.validate().unwrap();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(uplink_agent::run(loaded, shutdown.clone()));

    // Wait for the agent's retained online status.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cloud
        .statuses
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.state == Presence::Online)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent never came online"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A 3-part file (5 MiB parts), with part 2 failing once with 500 and part 3 with 403.
    let size = 12 * plan::MIB as usize + 777;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
    let file = base.join("data/run-042.mcap");
    std::fs::write(&file, &data).unwrap();
    s3.fail_once.lock().unwrap().extend([(2, 500), (3, 403)]);

    let upload = cloud
        .command(Action::Upload {
            path: file.to_string_lossy().into_owned(),
            priority: None,
        })
        .await;
    cloud.ack(upload, AckState::Accepted).await;
    let done = cloud.ack(upload, AckState::Done).await;
    let session_id = done.session_id.expect("done ack carries the session id");
    let mut joined = Vec::new();
    for n in 1..=3u32 {
        joined.extend_from_slice(&s3.parts.lock().unwrap()[&(session_id.to_string(), n)]);
    }
    assert_eq!(joined, data, "storage holds exactly the file");
    assert_eq!(*s3.puts.lock().unwrap(), 5, "3 parts + 2 injected failures");
    assert_eq!(
        cloud.sessions.lock().unwrap()[&session_id].info.state,
        SessionState::Completed
    );

    // A path outside the roots is rejected with a clear reason.
    let bad = cloud
        .command(Action::Upload {
            path: "/etc/passwd".into(),
            priority: None,
        })
        .await;
    let ack = cloud.ack(bad, AckState::Rejected).await;
    assert_eq!(
        ack.reason.as_deref(),
        Some("path /etc/passwd is outside the allowed roots")
    );

    // Pausing a finished job is rejected; an unknown job too.
    let p = cloud.command(Action::Pause { job_id: upload }).await;
    assert!(cloud
        .ack(p, AckState::Rejected)
        .await
        .reason
        .unwrap()
        .contains("already done"));
    let p = cloud
        .command(Action::Pause {
            job_id: Uuid::new_v4(),
        })
        .await;
    assert!(cloud
        .ack(p, AckState::Rejected)
        .await
        .reason
        .unwrap()
        .contains("no job"));

    // An expired command is rejected; a re-delivered one gets its stored ack, once.
    let expired = Command {
        command_id: Uuid::new_v4(),
        device_id: DEVICE.into(),
        issued_at: unix_now() - 100,
        expires_at: unix_now() - 10,
        action: Action::Upload {
            path: file.to_string_lossy().into_owned(),
            priority: None,
        },
    };
    cloud.send(&expired).await;
    let ack = cloud.ack(expired.command_id, AckState::Rejected).await;
    assert!(ack.reason.unwrap().contains("expired"));

    let empty = base.join("data/empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let cmd = Command {
        command_id: Uuid::new_v4(),
        device_id: DEVICE.into(),
        issued_at: unix_now(),
        expires_at: unix_now() + 600,
        action: Action::Upload {
            path: empty.to_string_lossy().into_owned(),
            priority: None,
        },
    };
    cloud.send(&cmd).await;
    let done = cloud.ack(cmd.command_id, AckState::Done).await;
    let sid = done.session_id.unwrap().to_string();
    assert_eq!(s3.parts.lock().unwrap()[&(sid, 1)], Vec::<u8>::new());
    let puts = *s3.puts.lock().unwrap();
    cloud.send(&cmd).await; // duplicate delivery
    cloud.ack(cmd.command_id, AckState::Done).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*s3.puts.lock().unwrap(), puts, "executed once");

    // A command signed by another key is dropped without an ack.
    let forged = Command {
        command_id: Uuid::new_v4(),
        ..cmd.clone()
    };
    cloud.send_signed_by(&sign::generate(), &forged).await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("agent stops on shutdown")
        .unwrap()
        .unwrap();
    while let Ok(ack) = cloud.acks.try_recv() {
        assert_ne!(
            ack.command_id, forged.command_id,
            "forged command was answered"
        );
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_restart_pauses_and_cancels() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("uplink_agent=debug")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let device_key = sign::generate();
    let port = free_port();
    start_broker(port, device_key.verifying_key());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s3_addr, s3) = start_s3().await;
    let mut cloud = start_cloud(port, device_key.verifying_key(), s3_addr, s3.clone()).await;

    let mut cfg = config(&base, port, &device_key, &cloud.cmd_key);
    cfg.concurrency = 1;
    cfg.max_upload_bytes_per_sec = 8 * plan::MIB;
    let size = 15 * plan::MIB as usize;
    let data: Vec<u8> = (0..size).map(|i| (i * 13 % 241) as u8).collect();
    let file = base.join("data/big.bin");
    std::fs::write(&file, &data).unwrap();

    // First run: stop the agent once part 1 is stored.
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(uplink_agent::run(
        cfg.clone().validate().unwrap(),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let upload = cloud
        .command(Action::Upload {
            path: file.to_string_lossy().into_owned(),
            priority: None,
        })
        .await;
    cloud.ack(upload, AckState::Accepted).await;
    wait_until("part 1 stored", || {
        s3.parts.lock().unwrap().keys().any(|(_, n)| *n == 1)
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!s3.puts_by_part.lock().unwrap().contains_key(&3));

    // Second run: resumes from session.status, uploads only what storage lacks.
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(uplink_agent::run(
        cfg.clone().validate().unwrap(),
        shutdown.clone(),
    ));
    let done = cloud.ack(upload, AckState::Done).await;
    let sid = done.session_id.unwrap().to_string();
    let mut joined = Vec::new();
    for n in 1..=3u32 {
        joined.extend_from_slice(&s3.parts.lock().unwrap()[&(sid.clone(), n)]);
    }
    assert_eq!(joined, data);
    assert_eq!(
        s3.puts_by_part.lock().unwrap()[&1],
        1,
        "part 1 was not uploaded again"
    );
    assert_eq!(
        cloud.sessions.lock().unwrap().len(),
        1,
        "session.create was not repeated"
    );

    // Pause stops new parts; resume finishes the job.
    let file2 = base.join("data/big2.bin");
    std::fs::write(&file2, &data).unwrap();
    s3.puts_by_part.lock().unwrap().clear();
    let up2 = cloud
        .command(Action::Upload {
            path: file2.to_string_lossy().into_owned(),
            priority: None,
        })
        .await;
    cloud.ack(up2, AckState::Accepted).await;
    wait_until("first part of job 2", || {
        !s3.puts_by_part.lock().unwrap().is_empty()
    })
    .await;
    let pause = cloud.command(Action::Pause { job_id: up2 }).await;
    cloud.ack(pause, AckState::Done).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let puts_while_paused = s3.puts_by_part.lock().unwrap().len();
    assert!(puts_while_paused < 3, "paused job kept uploading");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(s3.puts_by_part.lock().unwrap().len(), puts_while_paused);
    let resume = cloud.command(Action::Resume { job_id: up2 }).await;
    cloud.ack(resume, AckState::Done).await;
    cloud.ack(up2, AckState::Done).await;

    // Cancel aborts the session and fails the upload command with "cancelled".
    let file3 = base.join("data/big3.bin");
    std::fs::write(&file3, &data).unwrap();
    s3.puts_by_part.lock().unwrap().clear();
    let up3 = cloud
        .command(Action::Upload {
            path: file3.to_string_lossy().into_owned(),
            priority: None,
        })
        .await;
    cloud.ack(up3, AckState::Accepted).await;
    wait_until("first part of job 3", || {
        !s3.puts_by_part.lock().unwrap().is_empty()
    })
    .await;
    let cancel = cloud.command(Action::Cancel { job_id: up3 }).await;
    cloud.ack(cancel, AckState::Done).await;
    let failed = cloud.ack(up3, AckState::Failed).await;
    assert_eq!(failed.reason.as_deref(), Some("cancelled"));
    assert!(cloud
        .sessions
        .lock()
        .unwrap()
        .values()
        .any(|s| s.info.state == SessionState::Aborted));
    let again = cloud.command(Action::Resume { job_id: up3 }).await;
    assert!(cloud
        .ack(again, AckState::Rejected)
        .await
        .reason
        .unwrap()
        .contains("already cancelled"));

    // Storage loses a part at completion: the agent uploads it again and completes.
    let file4 = base.join("data/big4.bin");
    std::fs::write(&file4, &data).unwrap();
    s3.puts_by_part.lock().unwrap().clear();
    *s3.lose_at_complete.lock().unwrap() = Some(2);
    let up4 = cloud
        .command(Action::Upload {
            path: file4.to_string_lossy().into_owned(),
            priority: None,
        })
        .await;
    let done = cloud.ack(up4, AckState::Done).await;
    let sid = done.session_id.unwrap().to_string();
    assert_eq!(
        s3.puts_by_part.lock().unwrap()[&2],
        2,
        "lost part uploaded again"
    );
    assert_eq!(s3.puts_by_part.lock().unwrap()[&1], 1);
    let mut joined = Vec::new();
    for n in 1..=3u32 {
        joined.extend_from_slice(&s3.parts.lock().unwrap()[&(sid.clone(), n)]);
    }
    assert_eq!(joined, data);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `config` commands signed by the cloud but invalid are rejected by the agent itself (an
/// older or bypassed control API), changing nothing; valid ones are applied, kept in the
/// database across a restart, and dropped by `reset`. Upload priorities are checked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_commands_are_checked_applied_and_kept() {
    use uplink_protocol::flow::FlowConfig;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let device_key = sign::generate();
    let port = free_port();
    start_broker(port, device_key.verifying_key());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s3_addr, s3) = start_s3().await;
    let mut cloud = start_cloud(port, device_key.verifying_key(), s3_addr, s3.clone()).await;
    let cfg = config(&base, port, &device_key, &cloud.cmd_key);
    let overrides = || {
        let conn = uplink_agent::store::open(&base.join("state")).unwrap();
        uplink_agent::store::flow_overrides(&conn).unwrap()
    };

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(uplink_agent::run(
        cfg.clone().validate().unwrap(),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;

    let bad = cloud
        .command(Action::Config(FlowConfig {
            max_upload_bytes_per_sec: Some(65536),
            concurrency: Some(99),
            upload_windows: Some(vec!["6pm-8pm".into()]),
            ..FlowConfig::default()
        }))
        .await;
    let reason = cloud.ack(bad, AckState::Rejected).await.reason.unwrap();
    assert!(
        reason.contains("concurrency: 99 is outside 1..=64"),
        "{reason}"
    );
    assert!(reason.contains("\"6pm-8pm\""), "{reason}");
    assert_eq!(overrides(), None, "a rejected command changes nothing");

    let urgent = base.join("data/urgent.bin");
    std::fs::write(&urgent, b"urgent").unwrap();
    let bad = cloud
        .command(Action::Upload {
            path: urgent.to_string_lossy().into_owned(),
            priority: Some(10),
        })
        .await;
    let reason = cloud.ack(bad, AckState::Rejected).await.reason.unwrap();
    assert!(reason.contains("priority 10 is outside 0..=9"), "{reason}");

    let good = cloud
        .command(Action::Config(FlowConfig {
            max_upload_bytes_per_sec: Some(65536),
            per_job_concurrency: Some(1),
            ..FlowConfig::default()
        }))
        .await;
    cloud.ack(good, AckState::Done).await;
    let more = cloud
        .command(Action::Config(FlowConfig {
            upload_windows: Some(vec!["22:00-06:00".into()]),
            ..FlowConfig::default()
        }))
        .await;
    cloud.ack(more, AckState::Done).await;
    let kept = FlowConfig {
        max_upload_bytes_per_sec: Some(65536),
        per_job_concurrency: Some(1),
        upload_windows: Some(vec!["22:00-06:00".into()]),
        ..FlowConfig::default()
    };
    assert_eq!(overrides(), Some(kept.clone()), "overrides merge");

    // A high-priority upload is taken on and finishes (the window above may be closed
    // now, so open it first: `[]` = always).
    let open = cloud
        .command(Action::Config(FlowConfig {
            upload_windows: Some(vec![]),
            ..FlowConfig::default()
        }))
        .await;
    cloud.ack(open, AckState::Done).await;
    let job = cloud
        .command(Action::Upload {
            path: urgent.to_string_lossy().into_owned(),
            priority: Some(9),
        })
        .await;
    cloud.ack(job, AckState::Done).await;

    // Restart: the overrides hold; `reset` drops them.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        overrides().unwrap().max_upload_bytes_per_sec,
        Some(65536),
        "kept across the restart"
    );
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(uplink_agent::run(
        cfg.clone().validate().unwrap(),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let reset = cloud
        .command(Action::Config(FlowConfig {
            reset: true,
            ..FlowConfig::default()
        }))
        .await;
    cloud.ack(reset, AckState::Done).await;
    assert_eq!(overrides(), Some(FlowConfig::default()));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
