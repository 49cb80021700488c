//! The outbox: `GET /v1/events` (gap-free, never misses an event, long-poll) and webhooks
//! (HMAC-signed, in order, retried), against a real PostgreSQL.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use common::*;
use hmac::{Hmac, Mac};
use reqwest::Method;
use sha2::Sha256;
use uplink_api::store::{audit, Actor};

async fn events(app: &TestApp, query: &str, token: &str) -> (u16, Value) {
    app.call(Method::GET, &format!("/v1/events?{query}"), None, token)
        .await
}

fn seqs(page: &Value) -> Vec<i64> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect()
}

async fn new_dataset(app: &TestApp, project: &str, name: &str) {
    let (status, reply) = app
        .operator(
            Method::POST,
            &format!("/v1/projects/{project}/datasets"),
            Some(json!({"name": name})),
        )
        .await;
    assert_eq!(status, 201, "{reply}");
}

/// Reads every event after `after` until `want` have arrived (or 30 s pass).
async fn collect(app: &TestApp, mut after: i64, want: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    while got.len() < want && Instant::now() < until {
        let (status, page) =
            events(app, &format!("after={after}&wait=2&limit=1000"), OPERATOR).await;
        assert_eq!(status, 200, "{page}");
        after = page["next"].as_i64().expect("next");
        got.extend(page["events"].as_array().expect("events").iter().cloned());
    }
    got
}

#[tokio::test]
async fn events_are_gap_free_and_a_long_poll_wakes_on_the_next_one() {
    let app = TestApp::spawn().await;
    new_project(&app, json!({"project_id": "p"})).await;
    let all = collect(&app, 0, 1).await;
    let first = seqs(&json!({"events": all}));
    assert_eq!(first, (1..=first.len() as i64).collect::<Vec<_>>());
    assert!(all
        .iter()
        .any(|e| e["action"] == "project.create" && e["subject"] == "p"));
    let next = *first.last().expect("seq");

    // A long-poll with nothing to return waits, and answers as soon as an event commits.
    let waiting = {
        let (http, base) = (app.http.clone(), app.base.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let page: Value = http
                .get(format!("{base}/v1/events?after={next}&wait=20"))
                .bearer_auth(OPERATOR)
                .send()
                .await
                .expect("long-poll")
                .json()
                .await
                .expect("json");
            (t.elapsed(), page)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a long-poll with no event must wait"
    );
    new_dataset(&app, "p", "d1").await;
    let (took, page) = waiting.await.expect("task");
    assert!(took < Duration::from_secs(15), "woke after {took:?}");
    assert_eq!(page["events"][0]["action"], "dataset.create", "{page}");
    assert_eq!(page["events"][0]["seq"], next + 1);
    assert_eq!(page["next"], next + 1);

    // Without wait, an empty page answers at once; bad parameters are refused.
    let (status, page) = events(&app, &format!("after={}", next + 1), OPERATOR).await;
    assert_eq!(status, 200);
    assert_eq!(page["events"], json!([]));
    assert_eq!(page["next"], next + 1);
    for bad in ["after=-1", "limit=0", "limit=1001", "wait=61"] {
        let (status, p) = events(&app, bad, OPERATOR).await;
        assert_eq!(status, 422, "{bad}: {p}");
        assert_eq!(p["code"], "invalid_query");
    }

    // Shutdown ends waiting long-polls at once.
    let waiting = {
        let (http, base) = (app.http.clone(), app.base.clone());
        tokio::spawn(async move {
            http.get(format!("{base}/v1/events?after=1000000&wait=60"))
                .bearer_auth(OPERATOR)
                .send()
                .await
                .expect("long-poll")
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.state.events.close();
    let status = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the long-poll ended at shutdown")
        .expect("task");
    assert_eq!(status, 200);
}

/// Many writers, some rolled back, and one transaction that writes first and commits two
/// seconds later: a reader that follows `next` sees every committed event exactly once,
/// numbered without a gap, the slow one included, numbered after the rows that committed
/// before it (and not holding them back).
#[tokio::test]
async fn a_reader_never_misses_an_event_of_a_slow_transaction() {
    let app = TestApp::spawn().await;
    let pool = app.state.store.pool.clone();
    let actor = Actor::system("test");
    let base = uplink_api::events::latest(&pool).await.expect("latest");

    // A transaction that writes first and commits last.
    let slow = {
        let (pool, actor) = (pool.clone(), actor.clone());
        tokio::spawn(async move {
            let mut tx = pool.begin().await.expect("begin");
            audit(&mut tx, &actor, "test.slow", "slow", None, json!({}))
                .await
                .expect("insert");
            tokio::time::sleep(Duration::from_secs(2)).await;
            tx.commit().await.expect("commit");
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (pool, actor) = (pool.clone(), actor.clone());
            tokio::spawn(async move {
                for i in 0..25u64 {
                    let mut tx = pool.begin().await.expect("begin");
                    audit(
                        &mut tx,
                        &actor,
                        "test.fast",
                        &format!("{w}-{i}"),
                        None,
                        json!({}),
                    )
                    .await
                    .expect("insert");
                    if i % 5 == 4 {
                        tx.rollback().await.expect("rollback");
                    } else {
                        tokio::time::sleep(Duration::from_millis((i % 3) * 7)).await;
                        tx.commit().await.expect("commit");
                    }
                }
            })
        })
        .collect();
    // Read while they write.
    let reader = {
        let (http, base_url) = (app.http.clone(), app.base.clone());
        tokio::spawn(async move {
            let mut after = base;
            let mut got: Vec<(i64, String, String)> = Vec::new();
            let until = Instant::now() + Duration::from_secs(60);
            while got.len() < 8 * 20 + 1 && Instant::now() < until {
                let page: Value = http
                    .get(format!("{base_url}/v1/events?after={after}&wait=1&limit=7"))
                    .bearer_auth(OPERATOR)
                    .send()
                    .await
                    .expect("events")
                    .json()
                    .await
                    .expect("json");
                for e in page["events"].as_array().expect("events") {
                    got.push((
                        e["seq"].as_i64().expect("seq"),
                        e["action"].as_str().expect("action").into(),
                        e["subject"].as_str().expect("subject").into(),
                    ));
                }
                after = page["next"].as_i64().expect("next");
            }
            got
        })
    };
    for w in writers {
        w.await.expect("writer");
    }
    slow.await.expect("slow writer");
    let got = reader.await.expect("reader");

    let numbers: Vec<i64> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        numbers,
        (base + 1..=base + got.len() as i64).collect::<Vec<_>>(),
        "gap-free and in order"
    );
    let subjects: BTreeSet<&str> = got.iter().map(|g| g.2.as_str()).collect();
    assert_eq!(subjects.len(), got.len(), "each event once");
    assert!(
        subjects.contains("slow"),
        "the slow transaction's event arrived"
    );
    let committed: Vec<String> = sqlx::query_scalar(
        "SELECT subject FROM audit_events WHERE action LIKE 'test.%' ORDER BY subject",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert_eq!(committed.len(), 8 * 20 + 1, "rolled-back rows are gone");
    assert_eq!(
        committed
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        subjects,
        "the reader saw exactly the committed events"
    );
    let slow_seq = got.iter().find(|g| g.2 == "slow").expect("slow").0;
    assert!(slow_seq > base + 1, "numbered at commit, not at insert");
}

#[tokio::test]
async fn a_scoped_key_reads_only_its_project() {
    let app = TestApp::spawn().await;
    new_project(&app, json!({"project_id": "a"})).await;
    new_project(&app, json!({"project_id": "b"})).await;
    new_dataset(&app, "a", "da").await;
    new_dataset(&app, "b", "db").await;
    let viewer = new_key(&app, "viewer", Some("a")).await;
    let (status, page) = events(&app, "after=0&limit=1000", &viewer).await;
    assert_eq!(status, 200, "{page}");
    let projects: BTreeSet<&str> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["project_id"].as_str().unwrap_or("(none)"))
        .collect();
    assert_eq!(projects, BTreeSet::from(["a"]), "{page}");
    let (status, _) = events(&app, "project_id=b", &viewer).await;
    assert_eq!(status, 404);
    let (status, page) = events(&app, "project_id=b&limit=1000", OPERATOR).await;
    assert_eq!(status, 200);
    assert!(page["events"]
        .as_array()
        .expect("events")
        .iter()
        .all(|e| e["project_id"] == "b"));
}

/// One request the receiver got: the status it answered, the headers, the body.
type Delivery = (u16, HeaderMap, Vec<u8>);

/// An app whose webhooks may reach the receivers on 127.0.0.1.
async fn spawn_for_local_hooks() -> TestApp {
    TestApp::spawn_config(|c| c.events.webhook_allow_private = true).await
}

/// What the receiver was sent.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Delivery>>>);

/// A webhook receiver on 127.0.0.1 that answers 500 to its first `fail` requests.
async fn receiver(fail: usize) -> (String, Received) {
    let got = Received::default();
    let state = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let mut all = state.0.lock().expect("lock");
                let status = if all.len() < fail {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                };
                all.push((status.as_u16(), headers, body.to_vec()));
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum_serve(listener, app).await });
    (url, got)
}

fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let sig = headers["x-uplink-signature"].to_str().expect("ascii");
    let (t, v1) = sig
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .expect("t=…,v1=…");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&hex::decode(v1).expect("hex")).is_ok()
}

async fn wait_for(got: &Received, ok: usize) {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if got
            .0
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.0 == 204)
            .count()
            >= ok
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the webhook did not receive {ok} events in 30 s");
}

#[tokio::test]
async fn webhooks_get_every_event_of_their_project_signed_in_order_and_retried() {
    let app = spawn_for_local_hooks().await;
    new_project(&app, json!({"project_id": "p"})).await;
    new_project(&app, json!({"project_id": "q"})).await;
    let (url, got) = receiver(2).await;
    let admin = new_key(&app, "admin", Some("p")).await;
    let operator = new_key(&app, "operator", Some("p")).await;

    // Who may create one, and what is refused.
    let hook = |project: Option<&str>, url: &str| json!({"url": url, "project_id": project});
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(hook(Some("p"), &url)),
            &operator,
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = app
        .call(Method::POST, "/v1/webhooks", Some(hook(None, &url)), &admin)
        .await;
    assert_eq!(status, 403, "an unscoped webhook needs an unscoped admin");
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(hook(Some("q"), &url)),
            &admin,
        )
        .await;
    assert_eq!(status, 404);
    for bad in ["ftp://x/hook", "not a url", "/relative"] {
        let (status, p) = app
            .call(
                Method::POST,
                "/v1/webhooks",
                Some(hook(Some("p"), bad)),
                &admin,
            )
            .await;
        assert_eq!(
            (status, p["code"].as_str()),
            (422, Some("invalid_url")),
            "{bad}"
        );
    }
    let (status, p) = app
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(json!({"url": url, "project_id": "p", "after": 1_000_000})),
            &admin,
        )
        .await;
    assert_eq!((status, p["code"].as_str()), (422, Some("invalid_after")));

    let (status, created) = app
        .call(
            Method::POST,
            "/v1/webhooks",
            Some(hook(Some("p"), &url)),
            &admin,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["webhook_id"].as_str().expect("id").to_string();
    let secret = created["secret"]
        .as_str()
        .expect("secret shown once")
        .to_string();
    let start = created["cursor"].as_i64().expect("cursor");

    // Three events in p, one in q (not for this webhook).
    new_dataset(&app, "p", "d1").await;
    new_dataset(&app, "q", "dq").await;
    new_dataset(&app, "p", "d2").await;
    new_dataset(&app, "p", "d3").await;
    wait_for(&got, 4).await;

    let all = got.0.lock().expect("lock").clone();
    // The first event failed twice and was retried, not skipped.
    assert!(all.len() >= 5, "{} requests", all.len());
    let seq_of = |h: &HeaderMap| {
        h["x-uplink-event-seq"]
            .to_str()
            .expect("seq")
            .parse::<i64>()
            .expect("n")
    };
    assert_eq!(all[0].0, 500);
    assert_eq!(all[1].0, 500);
    assert_eq!(seq_of(&all[0].1), seq_of(&all[2].1));
    let delivered: Vec<Value> = all
        .iter()
        .filter(|r| r.0 == 204)
        .map(|r| {
            assert!(verify(&secret, &r.1, &r.2), "signature verifies");
            assert!(
                !verify("whsec_wrong", &r.1, &r.2),
                "a wrong secret does not"
            );
            assert_eq!(r.1["x-uplink-webhook-id"], id.as_str());
            let e: Value = serde_json::from_slice(&r.2).expect("json");
            assert_eq!(e["seq"].as_i64(), Some(seq_of(&r.1)));
            e
        })
        .collect();
    let names: Vec<&str> = delivered
        .iter()
        .map(|e| e["subject"].as_str().expect("subject"))
        .collect();
    // Its own creation is the first event it gets.
    let webhook_subject = format!("webhook:{id}");
    assert_eq!(
        names,
        [webhook_subject.as_str(), "p/d1", "p/d2", "p/d3"],
        "{delivered:?}"
    );
    let numbers: Vec<i64> = delivered
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]) && numbers[0] > start);

    // Its state: caught up, the failures forgotten; the secret is never shown again.
    let (status, w) = app
        .call(Method::GET, &format!("/v1/webhooks/{id}"), None, &admin)
        .await;
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["cursor"].as_i64(), numbers.last().copied());
    assert_eq!(w["failures"], 0);
    assert_eq!(w["last_error"], Value::Null);
    assert!(w.get("secret").is_none());
    let (_, list) = app.call(Method::GET, "/v1/webhooks", None, &admin).await;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert!(!list.to_string().contains(&secret));
    let stored: String =
        sqlx::query_scalar("SELECT detail::text FROM audit_events WHERE action = 'webhook.create'")
            .fetch_one(&app.state.store.pool)
            .await
            .expect("audit");
    assert!(
        !stored.contains(&secret),
        "the audit log never holds the secret"
    );
    let q_viewer = new_key(&app, "viewer", Some("q")).await;
    let (status, _) = app
        .call(Method::GET, &format!("/v1/webhooks/{id}"), None, &q_viewer)
        .await;
    assert_eq!(status, 404);

    // Deleted: nothing more is sent.
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/webhooks/{id}"),
            None,
            &operator,
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = app
        .call(Method::DELETE, &format!("/v1/webhooks/{id}"), None, &admin)
        .await;
    assert_eq!(status, 204);
    let before = got.0.lock().expect("lock").len();
    new_dataset(&app, "p", "d4").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(got.0.lock().expect("lock").len(), before);
    let (status, _) = app
        .call(Method::GET, &format!("/v1/webhooks/{id}"), None, &admin)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_failing_webhook_backs_off_and_says_why() {
    let app = spawn_for_local_hooks().await;
    new_project(&app, json!({"project_id": "p"})).await;
    let (url, got) = receiver(usize::MAX).await;
    let (status, created) = app
        .operator(
            Method::POST,
            "/v1/webhooks",
            Some(json!({"url": url, "actions": ["dataset.create"]})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["webhook_id"].as_str().expect("id");
    new_dataset(&app, "p", "d1").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, w) = app
        .operator(Method::GET, &format!("/v1/webhooks/{id}"), None)
        .await;
    let tries = got.0.lock().expect("lock").len();
    // 1 s, 2 s, 4 s: at most three tries in four seconds, all of the same event.
    assert!((2..=3).contains(&tries), "{tries} tries");
    assert_eq!(w["failures"].as_i64(), Some(tries as i64), "{w}");
    assert!(
        w["last_error"].as_str().expect("error").contains("500"),
        "{w}"
    );
    assert_eq!(w["cursor"], created["cursor"], "nothing skipped");
    let seqs: BTreeSet<String> = got
        .0
        .lock()
        .expect("lock")
        .iter()
        .map(|r| r.1["x-uplink-event-seq"].to_str().expect("seq").to_string())
        .collect();
    assert_eq!(seqs.len(), 1);
}

#[tokio::test]
async fn webhooks_to_addresses_that_are_not_public_are_refused() {
    // The default: webhooks may only reach public addresses.
    let app = TestApp::spawn().await;
    new_project(&app, json!({"project_id": "p"})).await;
    let (url, got) = receiver(0).await;
    let port = reqwest::Url::parse(&url)
        .expect("url")
        .port()
        .expect("port");
    for literal in [
        url.clone(),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        "http://169.254.169.254/latest/meta-data".to_string(),
        "http://10.0.0.1/hook".to_string(),
    ] {
        let (status, body) = app
            .operator(Method::POST, "/v1/webhooks", Some(json!({"url": literal})))
            .await;
        assert_eq!(status, 422, "{literal}: {body}");
        assert_eq!(body["code"], "url_not_public", "{body}");
    }
    // A name is checked when it is resolved: localhost is accepted, never reached, and the
    // webhook says why.
    let by_name = format!("http://localhost:{port}/hook");
    let (status, created) = app
        .operator(Method::POST, "/v1/webhooks", Some(json!({"url": by_name})))
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["webhook_id"].as_str().expect("id");
    new_dataset(&app, "p", "d1").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let w = loop {
        let (_, w) = app
            .operator(Method::GET, &format!("/v1/webhooks/{id}"), None)
            .await;
        if w["failures"].as_i64().unwrap_or(0) > 0 || tokio::time::Instant::now() > deadline {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        w["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not public")),
        "{w}"
    );
    assert_eq!(
        w["cursor"], created["cursor"],
        "nothing delivered, nothing skipped"
    );
    assert!(
        got.0.lock().expect("lock").is_empty(),
        "the receiver was reached"
    );
}
