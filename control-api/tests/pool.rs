//! More requests at once than `database_max_connections`: they queue for connections and
//! all get their answer. (A request used to hold its idempotency lock on a connection of
//! the same pool it then ran on: with as many requests as connections, each held one and
//! waited for a second, and every request stalled 5 s and got 503 `unavailable`.)

mod common;

use common::*;

#[tokio::test]
async fn requests_beyond_the_pool_queue_and_all_succeed() {
    let app = TestApp::spawn_config(|c| c.database_max_connections = 2).await;
    let n = 12;
    let devices: Vec<(String, PrivateKey)> = futures::future::join_all((0..n).map(|i| {
        let app = &app;
        async move {
            let id = format!("robot-pool-{i}");
            let key = sign::generate();
            let resp = app
                .http
                .post(format!("{}/v1/devices", app.base))
                .bearer_auth(OPERATOR)
                .header("Idempotency-Key", format!("register-{i}"))
                .json(&json!({"device_id": id, "public_key": sign::encode_public(&key.verifying_key())}))
                .send()
                .await
                .expect("POST /v1/devices");
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            assert_eq!(status, 201, "keyed registration {i} beyond the pool: {body}");
            (id, key)
        }
    }))
    .await;
    let answers = futures::future::join_all(devices.iter().enumerate().map(|(i, (id, key))| {
        let body = create_body(Uuid::new_v4(), &file(1000 + i, i as u8), 5 * MIB);
        let app = &app;
        async move { app.device(key, id, "session.create", &rid(), &body).await }
    }))
    .await;
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 201, "session.create {i} beyond the pool: {body}");
    }
    for (id, _) in &devices {
        assert_eq!(app.session_count(id).await, 1);
    }
}
