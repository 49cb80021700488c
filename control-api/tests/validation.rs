//! Dataset validators end to end: datasets with the `jsonl`, `csv` and `parquet` validators,
//! objects uploaded and completed by a device, read back from a real S3 server by the
//! validation worker, verdicts in PostgreSQL, the session answers, the audit log, seal and
//! the dataset manifest.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use reqwest::Method;
use tokio_util::sync::CancellationToken;
use uplink_api::validation::{run_once, Outcome, Pass};

/// Creates dataset `name` in project `p` with `validator`.
async fn dataset(app: &TestApp, name: &str, validator: &str) {
    let (status, body) = app
        .operator(
            Method::POST,
            "/v1/projects/p/datasets",
            Some(json!({"name": name, "validator": validator})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["validator"], validator);
}

/// A project `p` with a device `dev`; returns its key.
async fn setup(app: &TestApp) -> PrivateKey {
    new_project(app, json!({"project_id": "p"})).await;
    register_in(app, "p", "dev").await
}

fn id(session: &Value) -> String {
    session["session_id"]
        .as_str()
        .expect("session_id")
        .to_string()
}

async fn session(app: &TestApp, sid: &str) -> Value {
    let (status, s) = app
        .operator(Method::GET, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(status, 200, "{s}");
    s
}

/// Waits (at most 30 s) for the worker's verdict on `sid`; returns the session.
async fn verdict(app: &TestApp, sid: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = session(app, sid).await;
        if s["validation"] != "pending" {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session {sid} still pending after 30 s: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `session.validated` audit events of `sid`.
async fn validated_events(app: &TestApp, sid: &str) -> Vec<Value> {
    let (status, events) = app
        .operator(Method::GET, &format!("/v1/audit?subject={sid}"), None)
        .await;
    assert_eq!(status, 200, "{events}");
    events
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["action"] == "session.validated")
        .cloned()
        .collect()
}

/// A Parquet file of `rows` rows: an INT64 `id` and a UTF8 `name`.
fn parquet_file(rows: i64) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;

    let schema = parquet::schema::parser::parse_message_type(
        "message m { REQUIRED INT64 id; REQUIRED BYTE_ARRAY name (UTF8); }",
    )
    .expect("schema");
    let mut file = Vec::new();
    let mut writer = SerializedFileWriter::new(
        &mut file,
        Arc::new(schema),
        Arc::new(WriterProperties::builder().build()),
    )
    .expect("writer");
    let mut group = writer.next_row_group().expect("row group");
    let ids: Vec<i64> = (0..rows).collect();
    let mut column = group.next_column().expect("column").expect("id");
    column
        .typed::<Int64Type>()
        .write_batch(&ids, None, None)
        .expect("ids");
    column.close().expect("close");
    let names: Vec<ByteArray> = ids
        .iter()
        .map(|i| ByteArray::from(format!("row {i}").as_str()))
        .collect();
    let mut column = group.next_column().expect("column").expect("name");
    column
        .typed::<ByteArrayType>()
        .write_batch(&names, None, None)
        .expect("names");
    column.close().expect("close");
    group.close().expect("close group");
    writer.close().expect("close file");
    file
}

/// A JSONL file over 5 MiB (two parts, so the worker reads a multipart object as one
/// stream); with `bad_line`, that line is broken.
fn big_jsonl(bad_line: Option<usize>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut line = 1;
    while out.len() < 6 * MIB {
        if Some(line) == bad_line {
            out.extend_from_slice(b"{\"seq\": 1, \"text\": \"unterminated}\n");
        } else {
            out.extend_from_slice(
                format!("{{\"seq\":{line},\"text\":\"{}\"}}\n", "x".repeat(100)).as_bytes(),
            );
        }
        line += 1;
    }
    out
}

/// A file to upload: dataset, file name, bytes, and the expected verdict: `Ok(records)`, or
/// `Err(part of the reason)`.
type Case = (
    &'static str,
    &'static str,
    Vec<u8>,
    Result<u64, &'static str>,
);

#[tokio::test]
async fn each_validator_accepts_good_files_and_rejects_bad_ones_with_the_reason() {
    // The worker polls only hourly here: every verdict below comes from the wake-up that
    // completion sends.
    let app = TestApp::spawn_config(|c| c.validation.interval_secs = 3600).await;
    let key = setup(&app).await;
    dataset(&app, "j", "jsonl").await;
    dataset(&app, "c", "csv").await;
    dataset(&app, "q", "parquet").await;

    let pq = parquet_file(1000);
    let big = big_jsonl(None);
    let big_bad = big_jsonl(Some(40_000));
    let cases: Vec<Case> = vec![
        (
            "j",
            "good.jsonl",
            b"{\"a\":1}\n[2]\n\n\"three\"\n".to_vec(),
            Ok(3),
        ),
        (
            "j",
            "bad.jsonl",
            b"{\"a\":1}\n{\"a\":2}\n{\"a\":\n".to_vec(),
            Err("line 3: "),
        ),
        (
            "j",
            "big.jsonl",
            big.clone(),
            Ok(big.iter().filter(|b| **b == b'\n').count() as u64),
        ),
        ("j", "big-bad.jsonl", big_bad, Err("line 40000: ")),
        ("c", "good.csv", b"a,b\n1,2\n\"x,y\",3\n".to_vec(), Ok(2)),
        (
            "c",
            "ragged.csv",
            b"a,b,c\n1,2,3\n4,5\n".to_vec(),
            Err("line 3 (record 2): 2 fields where the header has 3 fields"),
        ),
        ("q", "good.parquet", pq.clone(), Ok(1000)),
        (
            "q",
            "not.parquet",
            b"id,name\n1,a\n2,b\n".to_vec(),
            Err("does not start with the Parquet magic"),
        ),
        (
            "q",
            "truncated.parquet",
            pq[..pq.len() / 2].to_vec(),
            Err("does not end with the Parquet magic"),
        ),
    ];
    let mut sids = Vec::new();
    for (ds, name, data, _) in &cases {
        let done = upload(&app, &key, "dev", Some(ds), name, data).await;
        // The device's completion answer already says the object waits for validation.
        assert_eq!(done["validation"], "pending", "{name}: {done}");
        sids.push(id(&done));
    }
    for ((ds, name, data, expected), sid) in cases.iter().zip(&sids) {
        let s = verdict(&app, sid).await;
        let events = validated_events(&app, sid).await;
        assert_eq!(events.len(), 1, "{name}: {events:?}");
        let detail = &events[0]["detail"];
        assert_eq!(detail["validator"], app_validator(ds), "{name}");
        assert_eq!(events[0]["actor"], "system:validation");
        match expected {
            Ok(records) => {
                assert_eq!(s["validation"], "accepted", "{name}: {s}");
                assert_eq!(s["validation_error"], Value::Null, "{name}");
                assert_eq!(detail["verdict"], "accepted", "{name}");
                assert_eq!(detail["records"], *records, "{name}: {detail}");
                assert_eq!(detail["bytes"], data.len(), "{name}: {detail}");
            }
            Err(reason) => {
                assert_eq!(s["validation"], "rejected", "{name}: {s}");
                let got = s["validation_error"].as_str().expect("reason");
                assert!(got.contains(reason), "{name}: {got:?} lacks {reason:?}");
                assert_eq!(detail["verdict"], "rejected", "{name}");
                assert_eq!(detail["reason"], got, "{name}");
            }
        }
        // The session stays `completed`: the verdict is about the content.
        assert_eq!(s["state"], "completed", "{name}");
    }

    // The device sees the verdict in session.status.
    let ragged = &sids[5];
    let (status, st) = app
        .device(
            &key,
            "dev",
            "session.status",
            &rid(),
            &json!({"session_id": ragged}),
        )
        .await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["validation"], "rejected");
    assert_eq!(
        st["validation_error"],
        "line 3 (record 2): 2 fields where the header has 3 fields"
    );

    // Nothing is left pending, and a rejected object is not in the manifest.
    let (pending,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM sessions WHERE validation = 'pending'")
            .fetch_one(&app.state.store.pool)
            .await
            .expect("count");
    assert_eq!(pending, 0);
    let metrics = app.metrics().await;
    for sample in [
        "uplink_objects_validation{validation=\"accepted\"} 4",
        "uplink_objects_validation{validation=\"rejected\"} 5",
    ] {
        assert!(metrics.contains(sample), "{sample} not in {metrics}");
    }
    assert!(!metrics.contains("validation=\"pending\""), "{metrics}");
    for (ds, good, bad) in [
        (
            "j",
            vec!["big.jsonl", "good.jsonl"],
            vec!["bad.jsonl", "big-bad.jsonl"],
        ),
        ("c", vec!["good.csv"], vec!["ragged.csv"]),
        (
            "q",
            vec!["good.parquet"],
            vec!["not.parquet", "truncated.parquet"],
        ),
    ] {
        let (status, m) = app
            .operator(
                Method::POST,
                &format!("/v1/projects/p/datasets/{ds}/seal"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{m}");
        let mut names: Vec<&str> = m["objects"]
            .as_array()
            .expect("objects")
            .iter()
            .map(|o| o["file_name"].as_str().expect("name"))
            .collect();
        names.sort();
        assert_eq!(names, good, "{ds}: {m} (rejected: {bad:?})");
        for o in m["objects"].as_array().expect("objects") {
            assert_eq!(o["validation"], "accepted", "{o}");
        }
    }
}

fn app_validator(dataset: &str) -> &'static str {
    match dataset {
        "j" => "jsonl",
        "c" => "csv",
        _ => "parquet",
    }
}

#[tokio::test]
async fn seal_waits_while_objects_are_pending() {
    // No worker: this test runs the passes itself.
    let app = TestApp::spawn_config(|c| c.validation.interval_secs = 0).await;
    let key = setup(&app).await;
    dataset(&app, "c", "csv").await;
    let good = upload(&app, &key, "dev", Some("c"), "a.csv", b"x,y\n1,2\n").await;
    let bad = upload(&app, &key, "dev", Some("c"), "b.csv", b"x,y\n1,2,3\n").await;
    let (status, p) = app
        .operator(Method::POST, "/v1/projects/p/datasets/c/seal", None)
        .await;
    assert_eq!(
        (status, p["code"].as_str()),
        (409, Some("dataset_busy")),
        "{p}"
    );
    assert!(
        p["detail"]
            .as_str()
            .expect("detail")
            .contains("2 objects wait for validation"),
        "{p}"
    );

    let none = CancellationToken::new();
    let first = run_once(&app.state, &none).await.expect("pass");
    let second = run_once(&app.state, &none).await.expect("pass");
    let mut outcomes = [first.validated.clone(), second.validated.clone()];
    outcomes.sort_by_key(|o| o.as_ref().map(|(sid, _)| sid.to_string() != id(&good)));
    assert!(
        matches!(
            &outcomes[0],
            Some((
                _,
                Outcome::Accepted {
                    records: 1,
                    bytes: 8
                }
            ))
        ),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[1], Some((_, Outcome::Rejected(r))) if r.contains("3 fields where the header has 2")),
        "{outcomes:?}"
    );
    assert_eq!(
        run_once(&app.state, &none).await.expect("pass"),
        Pass::default()
    );

    let (status, m) = app
        .operator(Method::POST, "/v1/projects/p/datasets/c/seal", None)
        .await;
    assert_eq!(status, 200, "{m}");
    let objects = m["objects"].as_array().expect("objects");
    assert_eq!(objects.len(), 1, "{m}");
    assert_eq!(objects[0]["session_id"], id(&good).as_str());
    assert_eq!(m["total_bytes"], 8);
    assert_eq!(session(&app, &id(&bad)).await["validation"], "rejected");
}

#[tokio::test]
async fn read_errors_retry_later_and_never_reject() {
    let app = TestApp::spawn_config(|c| {
        c.validation.interval_secs = 0;
        // Longer than the SDK's own retries against the dead endpoint take.
        c.validation.retry_initial_secs = 600;
        c.validation.retry_max_secs = 600;
    })
    .await;
    let key = setup(&app).await;
    dataset(&app, "c", "csv").await;
    dataset(&app, "q", "parquet").await;
    let csv = upload(&app, &key, "dev", Some("c"), "bad.csv", b"x,y\n\"open\n").await;
    let pq = upload(&app, &key, "dev", Some("q"), "t.parquet", &parquet_file(10)).await;

    // The same database, but storage is down (nothing listens there).
    let mut config = (*app.state.config).clone();
    config.s3.endpoint = "http://127.0.0.1:9".into();
    let mut down = app.state.clone();
    down.storage = uplink_api::storage::Storage::new(&config.s3, &config.s3.endpoint);
    down.config = Arc::new(config);

    let none = CancellationToken::new();
    for _ in 0..2 {
        let pass = run_once(&down, &none).await.expect("pass");
        assert!(
            matches!(pass.validated, Some((_, Outcome::Retry { .. }))),
            "{pass:?}"
        );
    }
    // Both wait for their next attempt: nothing more to do now.
    assert_eq!(run_once(&down, &none).await.expect("pass"), Pass::default());
    for sid in [id(&csv), id(&pq)] {
        let s = session(&app, &sid).await;
        assert_eq!(s["validation"], "pending", "{s}");
        assert_eq!(s["validation_error"], Value::Null, "{s}");
        assert!(validated_events(&app, &sid).await.is_empty());
        let (attempts, waits): (i32, bool) = sqlx::query_as(
            "SELECT validation_attempts, validation_after > now() FROM sessions WHERE session_id = $1::uuid",
        )
        .bind(&sid)
        .fetch_one(&app.state.store.pool)
        .await
        .expect("row");
        assert_eq!((attempts, waits), (1, true));
    }
    // Busy while pending.
    let (status, _) = app
        .operator(Method::POST, "/v1/projects/p/datasets/c/seal", None)
        .await;
    assert_eq!(status, 409);

    // Storage is back and the retry time has come.
    sqlx::query("UPDATE sessions SET validation_after = now() WHERE validation = 'pending'")
        .execute(&app.state.store.pool)
        .await
        .expect("update");
    for _ in 0..2 {
        let pass = run_once(&app.state, &none).await.expect("pass");
        assert!(pass.validated.is_some(), "{pass:?}");
    }
    let s = session(&app, &id(&csv)).await;
    assert_eq!(s["validation"], "rejected", "{s}");
    assert!(
        s["validation_error"]
            .as_str()
            .expect("reason")
            .contains("quoted field"),
        "{s}"
    );
    assert_eq!(session(&app, &id(&pq)).await["validation"], "accepted");
}

#[tokio::test]
async fn a_dead_workers_claim_is_taken_again_when_its_lease_runs_out() {
    let app = TestApp::spawn_config(|c| c.validation.interval_secs = 0).await;
    let key = setup(&app).await;
    dataset(&app, "j", "jsonl").await;
    let done = upload(&app, &key, "dev", Some("j"), "a.jsonl", b"{}\n{}\n").await;
    let sid = id(&done);
    // Another worker claimed it and died: its lease still runs.
    sqlx::query(
        "UPDATE sessions SET validation_claim = gen_random_uuid(), validation_attempts = 1,
                             validation_after = now() + interval '1 hour'
         WHERE session_id = $1::uuid",
    )
    .bind(&sid)
    .execute(&app.state.store.pool)
    .await
    .expect("claim");
    let none = CancellationToken::new();
    assert_eq!(
        run_once(&app.state, &none).await.expect("pass"),
        Pass::default()
    );
    assert_eq!(session(&app, &sid).await["validation"], "pending");
    // The lease ran out.
    sqlx::query("UPDATE sessions SET validation_after = now() - interval '1 second' WHERE session_id = $1::uuid")
        .bind(&sid)
        .execute(&app.state.store.pool)
        .await
        .expect("expire");
    let pass = run_once(&app.state, &none).await.expect("pass");
    assert_eq!(
        pass.validated,
        Some((
            sid.parse().expect("uuid"),
            Outcome::Accepted {
                records: 2,
                bytes: 6
            }
        ))
    );
    let (attempts, claim): (i32, Option<Uuid>) = sqlx::query_as(
        "SELECT validation_attempts, validation_claim FROM sessions WHERE session_id = $1::uuid",
    )
    .bind(&sid)
    .fetch_one(&app.state.store.pool)
    .await
    .expect("row");
    assert_eq!((attempts, claim), (2, None));
    assert_eq!(validated_events(&app, &sid).await.len(), 1);
}

#[tokio::test]
async fn deduplicated_sessions_take_their_originals_verdict() {
    let app = TestApp::spawn_config(|c| c.validation.interval_secs = 0).await;
    let key = setup(&app).await;
    dataset(&app, "j", "jsonl").await;
    let good: &[u8] = b"{\"ok\":true}\n";
    let bad: &[u8] = b"not json\n";
    let first = upload(&app, &key, "dev", Some("j"), "a.jsonl", good).await;
    check_digests(&app).await;
    // Same content while the first is still pending: deduplicated, pending too.
    let copy = upload(&app, &key, "dev", Some("j"), "b.jsonl", good).await;
    assert_eq!(copy["validation"], "pending", "{copy}");
    let copy_row = session(&app, &id(&copy)).await;
    assert_eq!(copy_row["deduplicated_from"], id(&first).as_str());
    let rejected = upload(&app, &key, "dev", Some("j"), "c.jsonl", bad).await;

    let none = CancellationToken::new();
    // The worker reads each object once: two objects, two passes, then nothing.
    // The copy gets its verdict with the original's, in the same pass.
    let mut read = Vec::new();
    for _ in 0..2 {
        let pass = run_once(&app.state, &none).await.expect("pass");
        assert_eq!(pass.copied, 0, "{pass:?}");
        read.push(pass.validated.expect("validated").0.to_string());
        let copy_now = session(&app, &id(&copy)).await["validation"].clone();
        let want = if read.contains(&id(&first)) {
            "accepted"
        } else {
            "pending"
        };
        assert_eq!(copy_now, want, "after validating {read:?}");
    }
    read.sort();
    let mut want = vec![id(&first), id(&rejected)];
    want.sort();
    assert_eq!(read, want);
    assert_eq!(
        run_once(&app.state, &none).await.expect("pass"),
        Pass::default()
    );
    let c = session(&app, &id(&copy)).await;
    assert_eq!(c["validation"], "accepted", "{c}");
    let events = validated_events(&app, &id(&copy)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0]["detail"]["original_session_id"],
        id(&first).as_str()
    );

    // A rejected object is never a dedupe target: the same bad bytes are uploaded again.
    check_digests(&app).await;
    assert_eq!(
        session(&app, &id(&rejected)).await["digest_check"],
        "verified"
    );
    let again = upload(&app, &key, "dev", Some("j"), "d.jsonl", bad).await;
    assert_eq!(again["validation"], "pending");
    let row = session(&app, &id(&again)).await;
    assert_eq!(row["deduplicated_from"], Value::Null, "{row}");

    // A copy made while its original was being validated takes the verdict on the next pass.
    sqlx::query("UPDATE sessions SET validation = 'pending' WHERE session_id = $1::uuid")
        .bind(id(&copy))
        .execute(&app.state.store.pool)
        .await
        .expect("reset");
    let pass = run_once(&app.state, &none).await.expect("pass");
    assert_eq!(pass.copied, 1, "{pass:?}");
    assert_eq!(session(&app, &id(&copy)).await["validation"], "accepted");
}
