//! Parts presigned with their SHA-256 (`x-amz-checksum-sha256`) instead of their MD5, against
//! the real storage of the run (SeaweedFS, and Garage in the Garage step): a leaked URL
//! still writes only its part's exact bytes, a device may leave the whole file's SHA-256 to
//! the API, and only the API's read-back makes such an object a dedupe source.

mod common;

use base64::Engine as _;
use common::*;
use sha2::Sha256;
use uplink_protocol::plan::MIB;

fn sha256_b64(data: &[u8]) -> String {
    B64.encode(Sha256::digest(data))
}

/// `session.create` asking for SHA-256 parts, with the whole file's SHA-256 or without.
fn create(data: &[u8], claim: bool) -> Value {
    let mut b = json!({"job_id": Uuid::new_v4(), "file_name": "cam.mp4", "size": data.len(),
                       "part_size": 5 * MIB, "part_checksum": "sha256"});
    if claim {
        b["sha256"] = json!(sha256_hex(data));
    }
    b
}

fn manifest(device: &str, sid: &str, data: &[u8], sha256: Option<String>) -> Value {
    let digests: Vec<String> = parts_of(data).iter().map(|p| sha256_b64(p)).collect();
    let digest = uplink_protocol::ops::parts_digest(
        digests
            .iter()
            .enumerate()
            .map(|(i, d)| (i as u32 + 1, d.as_str())),
    );
    let mut m = json!({"device_id": device, "session_id": sid, "path": "/data/cam.mp4",
        "size": data.len(), "part_count": digests.len(), "parts_digest": digest});
    if let Some(s) = sha256 {
        m["sha256"] = json!(s);
    }
    m
}

async fn presign(app: &TestApp, key: &PrivateKey, device: &str, sid: &str, data: &[u8]) -> Value {
    let parts: Vec<Value> = parts_of(data)
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"number": i + 1, "sha256": sha256_b64(p)}))
        .collect();
    presign_parts(app, key, device, sid, parts).await
}

#[tokio::test]
async fn a_sha256_session_admits_only_each_parts_bytes_and_the_api_takes_the_stored_digest() {
    let app = TestApp::spawn().await;
    let key = app.register("cam-1").await;
    let data = file(5 * MIB as usize + 1000, 11);
    let (status, created) = app
        .device(
            &key,
            "cam-1",
            "session.create",
            &rid(),
            &create(&data, false),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["part_checksum"], "sha256");
    let sid = created["session_id"].as_str().expect("id").to_string();

    // The session's digest and nothing else: an MD5, both, or a short digest is refused.
    for parts in [
        json!([{"number": 1, "md5": md5_b64(&data[..5 * MIB as usize])}]),
        json!([{"number": 1, "md5": md5_b64(b"x"), "sha256": sha256_b64(b"x")}]),
        json!([{"number": 1, "sha256": md5_b64(b"x")}]),
    ] {
        let (status, p) = app
            .device(
                &key,
                "cam-1",
                "parts.presign",
                &rid(),
                &json!({"session_id": sid, "parts": parts}),
            )
            .await;
        assert_eq!((status, &p["code"]), (422, &json!("invalid_sha256")), "{p}");
    }

    let presigned = presign(&app, &key, "cam-1", &sid, &data).await;
    let part1 = &presigned["parts"][0];
    let headers = part1["headers"].as_array().expect("headers");
    assert!(
        headers
            .iter()
            .any(|h| h[0] == "x-amz-checksum-sha256"
                && h[1] == sha256_b64(&data[..5 * MIB as usize])),
        "{part1}"
    );
    assert!(!headers.iter().any(|h| h[0] == "content-md5"), "{part1}");
    // A leaked URL writes nothing but its part's bytes: the same length, other content.
    let mut forged = data[..5 * MIB as usize].to_vec();
    forged[17] ^= 1;
    let resp = put(&app.http, part1, forged).await;
    assert!(
        resp.status().is_client_error(),
        "storage took other bytes: {}",
        resp.status()
    );
    // Nor can a re-presign swap the part's digest.
    let (status, p) = app
        .device(
            &key,
            "cam-1",
            "parts.presign",
            &rid(),
            &json!({"session_id": sid, "parts": [{"number": 1, "sha256": sha256_b64(b"other")}]}),
        )
        .await;
    assert_eq!(
        (status, &p["code"]),
        (409, &json!("part_digest_mismatch")),
        "{p}"
    );
    for (i, part) in parts_of(&data).iter().enumerate() {
        let resp = put(&app.http, &presigned["parts"][i], part.to_vec()).await;
        assert_eq!(resp.status().as_u16(), 200, "part {}", i + 1);
    }

    // Without the file's SHA-256 the manifest is required, and must not claim MD5 parts.
    let (status, p) = app
        .device(
            &key,
            "cam-1",
            "session.complete",
            &rid(),
            &json!({"session_id": sid}),
        )
        .await;
    assert_eq!(
        (status, &p["code"]),
        (422, &json!("manifest_required")),
        "{p}"
    );
    let mut wrong = manifest("cam-1", &sid, &data, None);
    wrong["parts_digest"] = json!("00");
    let (status, p) = app
        .device(
            &key,
            "cam-1",
            "session.complete",
            &rid(),
            &json!({"session_id": sid, "manifest": wrong}),
        )
        .await;
    assert_eq!(
        (status, &p["code"]),
        (422, &json!("manifest_mismatch")),
        "{p}"
    );
    let (status, done) = app
        .device(
            &key,
            "cam-1",
            "session.complete",
            &rid(),
            &json!({"session_id": sid, "manifest": manifest("cam-1", &sid, &data, None)}),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "completed");
    // The digest comes from the API's read-back of the stored object.
    assert!(done.get("sha256").is_none(), "{done}");
    check_digests(&app).await;
    let (_, view) = app
        .operator(reqwest::Method::GET, &format!("/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(view["digest_check"], "verified", "{view}");
    assert_eq!(view["sha256"], sha256_hex(&data), "{view}");
    let (_, custody) = app
        .operator(
            reqwest::Method::GET,
            &format!("/v1/sessions/{sid}/manifest"),
            None,
        )
        .await;
    assert_eq!(custody["part_checksum"], "sha256", "{custody}");
    assert_eq!(custody["parts_digest_valid"], true, "{custody}");

    // Verified, it answers a later upload of the same content without a byte sent.
    let (status, again) = app
        .device(
            &key,
            "cam-1",
            "session.create",
            &rid(),
            &create(&data, true),
        )
        .await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["state"], "completed", "{again}");
}

#[tokio::test]
async fn a_claimed_digest_and_an_empty_object_work_with_sha256_parts() {
    let app = TestApp::spawn().await;
    let key = app.register("cam-2").await;
    for data in [file(7 * MIB as usize, 3), Vec::new()] {
        let (status, created) = app
            .device(
                &key,
                "cam-2",
                "session.create",
                &rid(),
                &create(&data, true),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["part_checksum"], "sha256");
        let sid = created["session_id"].as_str().expect("id").to_string();
        let presigned = presign(&app, &key, "cam-2", &sid, &data).await;
        for (i, part) in parts_of(&data).iter().enumerate() {
            let resp = put(&app.http, &presigned["parts"][i], part.to_vec()).await;
            assert_eq!(resp.status().as_u16(), 200, "part {}", i + 1);
        }
        let (status, st) = app
            .device(
                &key,
                "cam-2",
                "session.status",
                &rid(),
                &json!({"session_id": sid}),
            )
            .await;
        assert_eq!(status, 200, "{st}");
        let (status, done) = app
            .device(
                &key,
                "cam-2",
                "session.complete",
                &rid(),
                &json!({"session_id": sid, "manifest": manifest("cam-2", &sid, &data, Some(sha256_hex(&data)))}),
            )
            .await;
        assert_eq!(status, 200, "{done}");
        assert_eq!(done["sha256"], sha256_hex(&data));
        check_digests(&app).await;
        let (_, view) = app
            .operator(reqwest::Method::GET, &format!("/v1/sessions/{sid}"), None)
            .await;
        assert_eq!(view["digest_check"], "verified", "{view}");
    }
}

#[tokio::test]
async fn md5_storage_and_devices_that_ask_for_nothing_keep_md5_parts() {
    let app =
        TestApp::spawn_config(|c| c.s3.part_checksum = uplink_protocol::ops::PartChecksum::Md5)
            .await;
    let key = app.register("cam-3").await;
    let data = file(MIB as usize, 5);
    let (status, created) = app
        .device(
            &key,
            "cam-3",
            "session.create",
            &rid(),
            &create(&data, false),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["part_checksum"], "md5");
    let sid = created["session_id"].as_str().expect("id").to_string();
    put_parts(&app, &key, "cam-3", &sid, &data).await;
    // An MD5 session needs the device's SHA-256 of the file.
    let mut m = manifest("cam-3", &sid, &data, None);
    m["parts_digest"] = json!(uplink_protocol::ops::parts_digest([(
        1,
        md5_b64(&data).as_str()
    )]));
    let (status, p) = app
        .device(
            &key,
            "cam-3",
            "session.complete",
            &rid(),
            &json!({"session_id": sid, "manifest": m}),
        )
        .await;
    assert_eq!(
        (status, &p["code"]),
        (422, &json!("manifest_mismatch")),
        "{p}"
    );

    let app = TestApp::spawn().await;
    let key = app.register("cam-4").await;
    let (status, created) = app
        .device(
            &key,
            "cam-4",
            "session.create",
            &rid(),
            &create_body(Uuid::new_v4(), &data, 5 * MIB as usize),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["part_checksum"], "md5");
}
