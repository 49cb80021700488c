//! The OpenAPI document: it parses, every operation it lists is served by the router (and
//! every route is registered with its description, so none is missing), and every refusal
//! is a problem document.

mod common;
use common::*;

/// Every route goes through `routes!(handler)` in http/mod.rs, which registers the handler's
/// `#[utoipa::path]` with the document; a plain `.route(...)` would serve an undocumented path.
#[test]
fn every_route_is_registered_with_its_description() {
    let src = include_str!("../src/http/mod.rs");
    let plain: Vec<&str> = src
        .lines()
        .filter(|l| l.contains(".route(") || l.contains(".route_service(") || l.contains(".nest("))
        .collect();
    assert!(
        plain.is_empty(),
        "routes registered without their OpenAPI description (use .routes(routes!(handler)) \
         with #[utoipa::path] on the handler): {plain:#?}"
    );
}

/// A path of the document with its parameters filled in.
fn concrete(path: &str, op: &Value) -> String {
    let mut out = path.to_string();
    for p in op["parameters"].as_array().into_iter().flatten() {
        if p["in"] != "path" {
            continue;
        }
        let name = p["name"].as_str().expect("parameter name");
        let schema = &p["schema"];
        let value = if schema["format"] == "uuid" {
            Uuid::new_v4().to_string()
        } else if let Some(first) = schema["enum"].get(0) {
            first.as_str().expect("enum value").to_string()
        } else {
            "x".to_string()
        };
        out = out.replace(&format!("{{{name}}}"), &value);
    }
    out
}

#[tokio::test]
async fn document_lists_every_route_and_each_answers() {
    let app = TestApp::spawn().await;
    let r = app
        .http
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .expect("openapi.json");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let text = r.text().await.expect("body");
    let doc: Value = serde_json::from_str(&text).expect("json");
    // The served document is the one the code builds.
    assert_eq!(
        doc,
        serde_json::to_value(uplink_api::http::openapi()).expect("document")
    );
    assert!(doc["paths"].as_object().expect("paths").len() >= 30);
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["operator"]["scheme"], "bearer");
    assert_eq!(schemes["bridge"]["scheme"], "bearer");

    let mut seen = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            seen += 1;
            let what = format!("{} {path}", method.to_uppercase());
            // Every refusal the operation documents is a problem document.
            for (status, resp) in op["responses"].as_object().expect("responses") {
                if status.starts_with('4') || status.starts_with('5') {
                    let reference = resp["$ref"].as_str().unwrap_or_default();
                    let name = reference.rsplit('/').next().unwrap_or_default();
                    let resp = &doc["components"]["responses"][name];
                    assert!(
                        resp["content"]["application/problem+json"].is_object(),
                        "{what}: {status} is not a problem document"
                    );
                }
            }
            let security = op["security"].to_string();
            if path.starts_with("/v1/bridge/") {
                assert!(security.contains("bridge"), "{what}: {security}");
            } else if path.starts_with("/v1/")
                && !path.starts_with("/v1/device/")
                && path != "/v1/command-key"
            {
                assert!(security.contains("operator"), "{what}: {security}");
            }
            // The router serves it: no credentials gets 401 (or the public answer), never the
            // fallback's 404 `not_found` or a 405.
            let url = format!("{}{}", app.base, concrete(path, op));
            let method =
                reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let r = app
                .http
                .request(method, &url)
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or_default().to_string())
                .unwrap_or_default();
            let body = r.text().await.expect("body");
            assert_ne!(status, 405, "{what}: not routed for this method");
            if status >= 400 {
                assert_eq!(ct, "application/problem+json", "{what}: {status} {body}");
                let problem: Value = serde_json::from_str(&body).expect("problem json");
                assert_ne!(problem["code"], "not_found", "{what}: not routed");
            }
            assert!(
                op["responses"][status.to_string()].is_object(),
                "{what}: answered {status}, which it does not document"
            );
        }
    }
    assert!(seen >= 38, "{seen} operations");
}

#[tokio::test]
async fn docs_page_and_refusals_are_problem_documents() {
    let app = TestApp::spawn().await;
    let r = app
        .http
        .get(format!("{}/docs", app.base))
        .send()
        .await
        .expect("docs");
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("text/html"));
    let html = r.text().await.expect("html");
    assert!(html.contains("openapi.json"));
    // The viewer script from the CDN is pinned to a release and checked by the browser.
    let script = html
        .split("<script")
        .find(|tag| tag.contains("src=\"https://"))
        .expect("the viewer script");
    assert!(script.contains("@scalar/api-reference@1."), "{script}");
    assert!(script.contains("integrity=\"sha384-"), "{script}");

    // A method the path does not have: 405 with Allow, as a problem document.
    let r = app
        .http
        .delete(format!("{}/v1/devices", app.base))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 405);
    let allow = r.headers()["allow"].to_str().expect("allow").to_string();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().await.expect("problem");
    assert_eq!(p["code"], "method_not_allowed");

    // A path or query parameter of the wrong type: 400 problem documents.
    for url in ["/v1/sessions/not-a-uuid", "/v1/audit?after=soon"] {
        let r = app
            .http
            .get(format!("{}{url}", app.base))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 400, "{url}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let p: Value = r.json().await.expect("problem");
        assert_eq!(p["code"], "invalid_parameter", "{url}");
    }
}
