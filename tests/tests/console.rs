//! The web console (`/console`) in a real browser: Debian's headless Chromium driven over
//! WebDriver ([`uplink_e2e::browser`]) against the real stack (API, bridge, agents,
//! PostgreSQL, S3). Presigned URLs point at the test proxy, which slows uploads enough to
//! steer them.
//!
//! - an operator signs in, sees a device go online, sends it an upload command, pauses and
//!   resumes the session, watches the bar reach 100 % with the verified SHA-256, downloads
//!   the object through the session page's link, and aborts another upload;
//! - a viewer key sees no write button or form, and a write forged from the page is refused
//!   (403) and changes nothing;
//! - a multi-part file uploaded from the browser, with the page reloaded mid-way, resumes
//!   (only missing parts are sent) and arrives byte-identical.

use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uplink_e2e::browser::Browser;
use uplink_e2e::files::{s3_download, sha256_file, write_random_file};
use uplink_e2e::{AgentOptions, Stack, StackOptions, MIB};

const SLOW: Duration = Duration::from_secs(90);

async fn key(stack: &Stack, role: &str) -> String {
    let reply = stack
        .operator(
            reqwest::Method::POST,
            "/v1/keys",
            Some(json!({"name": format!("console {role}"), "role": role, "project_id": "default"})),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    reply.body["token"].as_str().expect("token").to_string()
}

/// Sends an upload command from the uploads page; returns the new session's id.
async fn command_from_page(b: &Browser, device: &str, path: &str, known: &[String]) -> String {
    b.goto_hash("#/uploads").await;
    b.find("#cmd-device option").await;
    b.find("#cmd-device")
        .await
        .select_by_value(device)
        .await
        .expect("pick the device");
    b.fill("#cmd-path", path).await;
    b.fill("#cmd-priority", "7").await;
    b.click("#command button[type=submit]").await;
    let deadline = tokio::time::Instant::now() + SLOW;
    loop {
        let ids = b
            .eval("return [...document.querySelectorAll('tr[data-session]')].map(r => r.dataset.session)")
            .await;
        if let Some(id) = ids
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|id| !known.iter().any(|k| k == id))
        {
            return id.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no session row for {path}; page:\n{}",
            b.page_text().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_state(b: &Browser, session: &str, state: &str) {
    b.find_within(
        &format!("tr[data-session='{session}'][data-state='{state}']"),
        SLOW,
    )
    .await;
}

/// `fetch` from the page with the signed-in key; returns the HTTP status.
async fn forged(b: &Browser, method: &str, path: &str) -> u64 {
    let v = b
        .client
        .execute_async(
            "const [method, path, done] = arguments;
             fetch(path, {method, headers: {Authorization: 'Bearer ' + sessionStorage.getItem('uplink.token'),
                                            'Content-Type': 'application/json'}, body: '{}'})
               .then(r => done(r.status), e => done(String(e)));",
            vec![json!(method), json!(path)],
        )
        .await
        .expect("forged fetch");
    v.as_u64().unwrap_or_else(|| panic!("fetch failed: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_steers_uploads_and_a_viewer_cannot() {
    let stack = Stack::start(StackOptions::default()).await;
    let viewer = key(&stack, "viewer").await;
    let b = Browser::start().await;

    // The console's own answers: a strict policy, no inline code, known types.
    let page = reqwest::get(format!("{}/console/", stack.api_url))
        .await
        .expect("GET /console/");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let js = reqwest::get(format!("{}/console/js/app.js", stack.api_url))
        .await
        .expect("GET app.js");
    assert!(js.headers()["content-type"]
        .to_str()
        .expect("type")
        .starts_with("text/javascript"));
    let missing = reqwest::get(format!("{}/console/js/nope.js", stack.api_url))
        .await
        .expect("GET missing");
    assert_eq!(missing.status(), 404);

    b.sign_in(&stack.api_url, &stack.operator_token).await;
    assert_eq!(b.attr("#who", "data-role").await.as_deref(), Some("admin"));
    // The key is in this tab's session storage only: no cookie, nothing in the URL.
    assert_eq!(b.eval("return document.cookie").await, json!(""));
    assert!(!b
        .client
        .current_url()
        .await
        .expect("url")
        .as_str()
        .contains("operator-"));

    // A device goes online, and reports its free disk space; the page shows both without a
    // reload (it re-reads nothing on a timer: the live feed brings the change).
    b.goto_hash("#/fleet").await;
    let dev = stack.add_device(&AgentOptions::default()).await;
    b.wait_text(
        &format!("tr[data-device='{}'] td.presence", dev.id),
        SLOW,
        |t| t.contains("online"),
    )
    .await;
    b.wait_text(
        &format!("tr[data-device='{}'] td.free-disk", dev.id),
        SLOW,
        |t| t.ends_with('B'),
    )
    .await;
    b.snapshot("console-fleet").await;

    // An upload command from the page; slowed so that it can be paused and resumed.
    stack.proxy.set_rate(Some(MIB));
    let file = stack.source_file(&dev, "rec/console-1.bin", 12 * MIB).await;
    let s1 = command_from_page(&b, &dev.id, file.path_str(), &[]).await;
    b.find_within(
        &format!("tr[data-session='{s1}'][data-state='uploading']"),
        SLOW,
    )
    .await;
    b.snapshot("console-uploads").await;
    b.click(&format!(
        "tr[data-session='{s1}'] button[data-action=pause]"
    ))
    .await;
    wait_state(&b, &s1, "paused").await;

    // A viewer: no write button or form, and a forged write is refused.
    b.click("#signout").await;
    b.sign_in(&stack.api_url, &viewer).await;
    assert_eq!(b.attr("#who", "data-role").await.as_deref(), Some("viewer"));
    b.goto_hash("#/uploads").await;
    wait_state(&b, &s1, "paused").await;
    for hidden in ["button[data-action]", "#command", "#nav a[href='#/upload']"] {
        assert!(!b.visible(hidden).await, "a viewer sees {hidden}");
    }
    b.goto_hash("#/fleet").await;
    b.find(&format!("tr[data-device='{}']", dev.id)).await;
    assert!(
        !b.visible("#register").await,
        "a viewer sees the register form"
    );
    assert!(
        !b.visible("tr[data-device] button").await,
        "a viewer sees device buttons"
    );
    assert_eq!(
        forged(&b, "POST", &format!("/v1/sessions/{s1}/resume")).await,
        403
    );
    assert_eq!(
        forged(&b, "PATCH", &format!("/v1/devices/{}", dev.id)).await,
        403
    );
    assert_eq!(stack.session(&s1).await["state"], "paused");

    // The operator resumes it and watches it reach 100 % with the verified SHA-256.
    b.click("#signout").await;
    b.sign_in(&stack.api_url, &stack.operator_token).await;
    b.goto_hash("#/uploads").await;
    b.click(&format!(
        "tr[data-session='{s1}'] button[data-action=resume]"
    ))
    .await;
    stack.proxy.set_rate(Some(4 * MIB));
    wait_state(&b, &s1, "completed").await;
    b.wait_text(
        &format!("tr[data-session='{s1}'] [data-percent]"),
        SLOW,
        |t| t.trim() == "100%",
    )
    .await;
    b.click(&format!("tr[data-session='{s1}'] a")).await;
    b.wait_text("#digest-check", SLOW, |t| t.contains("verified"))
        .await;
    assert_eq!(b.text("#sha256").await, file.sha256);
    assert_eq!(b.text("#stored-sha256").await, file.sha256);
    b.snapshot("console-session").await;
    // The download link is a presigned GET of exactly those bytes.
    b.click("#get-download").await;
    let url = b.attr("#download-link", "href").await.expect("href");
    let bytes = reqwest::get(&url)
        .await
        .expect("download")
        .bytes()
        .await
        .expect("body");
    assert_eq!(hex::encode(Sha256::digest(&bytes)), file.sha256);

    // Another upload, aborted from the page.
    stack.proxy.set_rate(Some(MIB / 2));
    let other = stack.source_file(&dev, "rec/console-2.bin", 8 * MIB).await;
    let s2 = command_from_page(&b, &dev.id, other.path_str(), std::slice::from_ref(&s1)).await;
    b.click(&format!(
        "tr[data-session='{s2}'] button[data-action=abort]"
    ))
    .await;
    wait_state(&b, &s2, "aborted").await;
    stack.proxy.set_rate(None);
    assert_eq!(stack.session(&s2).await["state"], "aborted");
    b.goto_hash("#/projects").await;
    b.find("section[data-project='default'] .bar").await;
    b.snapshot("console-projects").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_upload_resumes_after_a_reload_and_arrives_intact() {
    let stack = Stack::start(StackOptions::default()).await;
    let b = Browser::start().await;
    b.sign_in(&stack.api_url, &stack.operator_token).await;
    let file =
        write_random_file(&stack.dir.path().join("browser").join("scan.bin"), 13 * MIB).await;

    // Parts of 5, 5 and 3 MiB, all at once, slowed: the page is reloaded once one is stored.
    stack.proxy.set_rate(Some(3 * MIB));
    b.goto_hash("#/upload").await;
    b.fill("#up-part-size", "5").await;
    b.find("#up-file")
        .await
        .send_keys(file.path_str())
        .await
        .expect("pick the file");
    b.click("#up-start").await;
    b.wait_text("#up-state", SLOW, |t| t.contains("stored"))
        .await;
    // Parts still in flight die with the page: their connections are cut (bytes already in
    // socket buffers would otherwise still reach storage).
    stack.proxy.set_stalled(true);
    stack.proxy.drop_connections();
    b.client.refresh().await.expect("reload");
    stack.proxy.set_stalled(false);
    stack.proxy.set_rate(None);

    // Still signed in (the tab's session storage); the page knows the unfinished upload.
    b.find("#up-pending").await;
    b.fill("#up-part-size", "5").await;
    b.find("#up-file")
        .await
        .send_keys(file.path_str())
        .await
        .expect("pick the file again");
    b.click("#up-start").await;
    b.wait_text("#up-state", SLOW, |t| t.contains("Completed"))
        .await;
    b.snapshot("console-browser-upload").await;
    assert_eq!(b.text("#up-sha256").await, file.sha256);
    let skipped: u64 = b
        .attr("#up-state", "data-skipped")
        .await
        .and_then(|s| s.parse().ok())
        .expect("data-skipped");
    assert!(
        (1..3).contains(&skipped),
        "resumed with {skipped} of 3 parts already stored"
    );

    // Byte-identical in storage, in a session owned by the operator, digest verified.
    let id = b
        .attr("#up-session", "href")
        .await
        .and_then(|h| h.rsplit('/').next().map(str::to_owned))
        .expect("session link");
    let session = stack.wait_digest_checked(&id).await;
    assert_eq!(session["digest_check"], "verified", "{session}");
    assert_eq!(session["part_count"], 3, "{session}");
    let dest = stack.dir.path().join("downloaded.bin");
    let code = s3_download(
        &stack.env,
        session["bucket"].as_str().expect("bucket"),
        session["object_key"].as_str().expect("key"),
        &dest,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        std::fs::read(&dest).expect("read"),
        std::fs::read(&file.path).expect("read")
    );
    assert_eq!(sha256_file(&dest).0, file.sha256);
    b.close().await;
}
