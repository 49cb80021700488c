//! SIGTERM drains the API and the bridge: a request already in flight is answered, then the
//! process exits 0. The request is held in flight by a table lock the test takes in
//! PostgreSQL and releases only after the SIGTERM.

use std::time::Duration;

use serde_json::json;
use sqlx::{Connection as _, PgConnection};
use uplink_e2e::device::signed;
use uplink_e2e::{MqttDevice, Service, Stack, StackOptions};
use uplink_protocol::topics::{self, Channel};

/// Takes `LOCK TABLE sessions` in a transaction; the lock holds until the returned
/// connection runs `COMMIT`.
async fn lock_sessions(stack: &Stack) -> PgConnection {
    let mut conn = PgConnection::connect(&stack.db.url)
        .await
        .expect("connect to the test database");
    sqlx::query("BEGIN")
        .execute(&mut conn)
        .await
        .expect("BEGIN");
    sqlx::query("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut conn)
        .await
        .expect("LOCK TABLE sessions");
    conn
}

/// Waits until a query of the test database whose text matches `like` waits for a lock
/// (the cleanup worker's queries may wait too: they must not count).
async fn wait_for_a_blocked_query(stack: &Stack, like: &str) {
    let mut conn = PgConnection::connect(&stack.db.url)
        .await
        .expect("connect to the test database");
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
             AND query LIKE $1",
        )
        .bind(like)
        .fetch_one(&mut conn)
        .await
        .expect("query pg_stat_activity");
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.dump_logs();
    panic!("no query like {like:?} ever waited for the sessions lock");
}

/// Sends SIGTERM while a request waits, checks the service is still draining a second
/// later, then lets the request finish.
async fn terminate_while_blocked(
    stack: &Stack,
    which: Service,
    like: &str,
    mut lock: PgConnection,
) {
    wait_for_a_blocked_query(stack, like).await;
    stack.terminate(which);
    if let Some(status) = stack.wait_exit(which, Duration::from_secs(1)).await {
        stack.dump_logs();
        panic!("{which:?} exited ({status}) with a request in flight instead of draining");
    }
    sqlx::query("COMMIT")
        .execute(&mut lock)
        .await
        .expect("COMMIT");
}

async fn assert_exits_zero(stack: &Stack, which: Service) {
    match stack.wait_exit(which, Duration::from_secs(25)).await {
        Some(status) if status.success() => {}
        Some(status) => {
            stack.dump_logs();
            panic!("{which:?} exited with {status} after draining");
        }
        None => {
            stack.dump_logs();
            panic!("{which:?} still running 25 s after its last request was answered");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_the_request_in_flight_at_sigterm_then_exits_zero() {
    let stack = Stack::start(StackOptions::default()).await;
    let lock = lock_sessions(&stack).await;
    let (reply, ()) = tokio::join!(
        stack.operator(reqwest::Method::GET, "/v1/sessions", None),
        // GET /v1/sessions lists with optional filters.
        terminate_while_blocked(&stack, Service::Api, "%device_id = $1)%", lock),
    );
    assert_eq!(
        reply.status, 200,
        "the request in flight at SIGTERM must be answered: {reply:?}"
    );
    assert_exits_zero(&stack, Service::Api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_delivers_the_answer_in_flight_at_sigterm_then_exits_zero() {
    let stack = Stack::start(StackOptions::default()).await;
    let dev = stack.register_device().await;
    let mut mqtt = MqttDevice::connect(stack.mqtt_port, &dev.id, &dev.key).await;
    let res = topics::topic(&dev.id, Channel::Res);
    mqtt.subscribe(&res).await;
    mqtt.wait_bridge_ready(&dev.id, &dev.key, Duration::from_secs(30))
        .await;

    let lock = lock_sessions(&stack).await;
    let request = signed(
        &dev.key,
        &dev.id,
        "session.status",
        &json!({ "session_id": uuid::Uuid::new_v4() }),
    );
    mqtt.publish_request(&dev.id, &request).await;
    // session.status reads its session by id.
    terminate_while_blocked(&stack, Service::Bridge, "%WHERE session_id = $1", lock).await;
    let answer = mqtt
        .response(&res, &request.request_id, Duration::from_secs(20))
        .await;
    if answer.is_none() {
        stack.dump_logs();
        panic!("the draining bridge never delivered the answer to the request in flight");
    }
    assert_exits_zero(&stack, Service::Bridge).await;
}
