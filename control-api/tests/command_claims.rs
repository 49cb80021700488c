//! Commands pushed to the bridges (`POST /v1/bridge/commands/claim`): a long-poll that a
//! stored command ends, leases that give each command to exactly one bridge, a lease that
//! runs out when its bridge died, and refused claims.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

/// Registers `device_id` and marks it online.
async fn online_device(app: &TestApp, device_id: &str) -> PrivateKey {
    let key = app.register(device_id).await;
    go_online(app, &key, device_id).await;
    key
}

async fn command(app: &TestApp, device_id: &str) -> String {
    let (status, cmd) = app
        .operator(
            reqwest::Method::POST,
            &format!("/v1/devices/{device_id}/commands"),
            Some(json!({"type": "upload", "path": "/data/run.mcap"})),
        )
        .await;
    assert_eq!(status, 201, "{cmd}");
    cmd["command_id"].as_str().expect("id").to_string()
}

/// `POST /v1/bridge/commands/claim` as `bridge`; the ids claimed.
async fn claim(app: &TestApp, bridge: &str, limit: i64, wait_ms: u64) -> Vec<String> {
    let (status, body) = app
        .bridge(
            reqwest::Method::POST,
            "/v1/bridge/commands/claim",
            Some(json!({"bridge": bridge, "limit": limit, "wait_ms": wait_ms})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .expect("a list")
        .iter()
        .map(|c| c["command_id"].as_str().expect("command_id").to_string())
        .collect()
}

async fn published(app: &TestApp, id: &str) {
    let (status, body) = app
        .bridge(
            reqwest::Method::POST,
            &format!("/v1/bridge/commands/{id}/published"),
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
}

async fn claimed_by(app: &TestApp, id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT claimed_by FROM commands WHERE command_id = $1::uuid")
        .bind(id)
        .fetch_one(&app.state.store.pool)
        .await
        .expect("command row")
}

/// Marks `device_id` online with a signed `status`, as the bridge forwards it.
async fn go_online(app: &TestApp, key: &PrivateKey, device_id: &str) {
    let status: uplink_protocol::telemetry::Status =
        serde_json::from_value(json!({"v": 1, "state": "online", "ts_ms": unix_now() * 1000}))
            .expect("status");
    let (code, body) = app
        .bridge(
            reqwest::Method::PUT,
            &format!("/v1/bridge/devices/{device_id}/presence"),
            Some(serde_json::to_value(status.signed(key, device_id)).expect("json")),
        )
        .await;
    assert_eq!(code, 204, "{body}");
}

#[tokio::test]
async fn a_stored_command_ends_a_waiting_claim_and_goes_to_one_bridge() {
    let app = TestApp::spawn().await;
    online_device(&app, "robot-push").await;
    // Two bridges wait with nothing due. Claims run only at the start and when the API is
    // woken, so a command in an answer proves the wake-up: without it both would end
    // empty after their 5 s.
    let (got_a, got_b, id) = tokio::join!(
        claim(&app, "bridge-a", 100, 5_000),
        claim(&app, "bridge-b", 100, 5_000),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            command(&app, "robot-push").await
        },
    );
    let (winner, got, other) = if got_a.is_empty() {
        ("bridge-b", got_b, got_a)
    } else {
        ("bridge-a", got_a, got_b)
    };
    assert_eq!(got, vec![id.clone()], "one bridge gets the command");
    assert!(other.is_empty(), "the other bridge gets nothing: {other:?}");
    assert_eq!(claimed_by(&app, &id).await.as_deref(), Some(winner));
}

#[tokio::test]
async fn a_device_coming_online_ends_a_waiting_claim() {
    let app = TestApp::spawn().await;
    let key = app.register("robot-late").await;
    let id = command(&app, "robot-late").await;
    assert!(claim(&app, "bridge-a", 100, 0).await.is_empty(), "offline");
    let (got, ()) = tokio::join!(claim(&app, "bridge-a", 100, 5_000), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        go_online(&app, &key, "robot-late").await;
    });
    assert_eq!(got, vec![id]);
}

#[tokio::test]
async fn each_command_is_leased_to_exactly_one_bridge() {
    let app = TestApp::spawn().await;
    online_device(&app, "robot-many").await;
    let mut ids = HashSet::new();
    for _ in 0..30 {
        ids.insert(command(&app, "robot-many").await);
    }
    // Three bridges claim four at a time, all at once, until nothing is left.
    let drain = |bridge: &'static str| {
        let app = &app;
        async move {
            let mut mine = Vec::new();
            loop {
                let got = claim(app, bridge, 4, 0).await;
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|id| (bridge, id)));
            }
        }
    };
    let (a, b, c) = tokio::join!(drain("bridge-a"), drain("bridge-b"), drain("bridge-c"));
    let all: Vec<(&str, String)> = a.into_iter().chain(b).chain(c).collect();
    let claimed: HashSet<String> = all.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(all.len(), 30, "no command claimed twice: {all:?}");
    assert_eq!(claimed, ids, "every command claimed");
    for (bridge, id) in &all {
        assert_eq!(claimed_by(&app, id).await.as_deref(), Some(*bridge));
    }

    // Leased: neither another claim nor the old listing offers them.
    assert!(claim(&app, "bridge-d", 100, 0).await.is_empty());
    let (_, due) = app
        .bridge(reqwest::Method::GET, "/v1/bridge/commands/due", None)
        .await;
    assert_eq!(due, json!([]));

    // Published (twenty reported in one batch, ten one by one): the lease ends, and the
    // command waits command_resend_secs for a re-send.
    let ordered: Vec<&String> = ids.iter().collect();
    let (batch, single) = ordered.split_at(20);
    let (status, body) = app
        .bridge(
            reqwest::Method::POST,
            "/v1/bridge/commands/published",
            Some(json!({ "command_ids": batch })),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    for id in single {
        published(&app, id).await;
    }
    for id in &ids {
        assert_eq!(claimed_by(&app, id).await, None);
    }
    assert!(claim(&app, "bridge-d", 100, 0).await.is_empty());
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM commands WHERE state = 'published' AND publish_count = 1",
    )
    .fetch_one(&app.state.store.pool)
    .await
    .expect("count");
    assert_eq!(n, 30);
}

#[tokio::test]
async fn a_lease_that_runs_out_goes_to_another_bridge() {
    let app = TestApp::spawn_config(|c| c.command_lease_secs = 1).await;
    online_device(&app, "robot-lease").await;
    let id = command(&app, "robot-lease").await;
    assert_eq!(claim(&app, "bridge-dead", 100, 0).await, vec![id.clone()]);
    // Its bridge dies before publishing; nobody else gets it while the lease runs...
    assert!(claim(&app, "bridge-b", 100, 0).await.is_empty());
    // ...and once it has run out, the next claim (a sweep) does.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(claim(&app, "bridge-b", 100, 0).await, vec![id.clone()]);
    assert_eq!(claimed_by(&app, &id).await.as_deref(), Some("bridge-b"));
    published(&app, &id).await;
}

#[tokio::test]
async fn bad_claims_are_refused() {
    let app = TestApp::spawn().await;
    for body in [
        json!({"bridge": ""}),
        json!({"bridge": "b\u{7}"}),
        json!({"bridge": "x".repeat(129)}),
        json!({"bridge": "b", "limit": 0}),
        json!({"bridge": "b", "limit": 1001}),
        json!({"bridge": "b", "wait_ms": 30_001}),
    ] {
        let (status, p) = app
            .bridge(
                reqwest::Method::POST,
                "/v1/bridge/commands/claim",
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (status, p["code"].as_str()),
            (400, Some("invalid_claim")),
            "{body}: {p}"
        );
    }
    let (status, _) = app
        .bridge(
            reqwest::Method::POST,
            "/v1/bridge/commands/claim",
            Some(json!({"bridge": "b", "lease": 9999})),
        )
        .await;
    assert!(matches!(status, 400 | 422), "unknown field: {status}");
    let (status, _) = app
        .call(
            reqwest::Method::POST,
            "/v1/bridge/commands/claim",
            Some(json!({"bridge": "b"})),
            OPERATOR,
        )
        .await;
    assert_eq!(status, 401, "the operator token must not claim commands");
    // Published reports: 1 to 1000 ids, nothing else.
    let many: Vec<String> = (0..1001)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    for body in [json!({"command_ids": []}), json!({ "command_ids": many })] {
        let (status, p) = app
            .bridge(
                reqwest::Method::POST,
                "/v1/bridge/commands/published",
                Some(body),
            )
            .await;
        assert_eq!(
            (status, p["code"].as_str()),
            (400, Some("invalid_batch")),
            "{p}"
        );
    }
    for body in [json!({"command_ids": ["not-a-uuid"]}), json!({"ids": []})] {
        let (status, p) = app
            .bridge(
                reqwest::Method::POST,
                "/v1/bridge/commands/published",
                Some(body),
            )
            .await;
        assert!(matches!(status, 400 | 422), "{status}: {p}");
    }
    let (status, _) = app
        .call(
            reqwest::Method::POST,
            "/v1/bridge/commands/published",
            Some(json!({"command_ids": [uuid::Uuid::new_v4()]})),
            OPERATOR,
        )
        .await;
    assert_eq!(
        status, 401,
        "the operator token must not report commands published"
    );
}

#[tokio::test]
async fn an_accepted_command_is_offered_again_until_its_final_ack() {
    let app = TestApp::spawn_config(|c| c.command_recheck_secs = 1).await;
    let key = online_device(&app, "robot-recheck").await;
    let id = command(&app, "robot-recheck").await;
    let ack = |state: &'static str| {
        let (app, key, id) = (&app, &key, &id);
        async move {
            let (status, body) = app
                .device(
                    key,
                    "robot-recheck",
                    "command.ack",
                    &uuid::Uuid::new_v4().to_string(),
                    &json!({"command_id": id, "state": state}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
    };
    assert_eq!(claim(&app, "bridge-a", 100, 0).await, vec![id.clone()]);
    published(&app, &id).await;
    ack("accepted").await;
    // Accepted: not offered while command_recheck_secs run...
    assert!(claim(&app, "bridge-a", 100, 0).await.is_empty());
    // ...then offered once (its final ack may have been lost), and the clock starts again
    // when it is published.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(claim(&app, "bridge-b", 100, 0).await, vec![id.clone()]);
    assert!(claim(&app, "bridge-a", 100, 0).await.is_empty(), "leased");
    published(&app, &id).await;
    assert!(claim(&app, "bridge-a", 100, 0).await.is_empty());
    // The device answers the repeat with its latest ack: done. Never offered again.
    ack("done").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(claim(&app, "bridge-a", 100, 0).await.is_empty());
    let (n,): (i32,) =
        sqlx::query_as("SELECT publish_count FROM commands WHERE command_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.state.store.pool)
            .await
            .expect("command row");
    assert_eq!(n, 2);
}
