//! The control API over HTTP: bearer token, problem documents, retries of what is safe to
//! retry.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::config::Target;
use crate::error::{usage, CtlError, Result};

#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

/// Path segments are percent-encoded; ids never need it, but a typo should not become
/// another path.
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `?a=1&b=x` of the pairs whose value is set.
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut url = reqwest::Url::parse("http://x/").expect("static URL");
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in pairs {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
    }
    url.query().map(|q| format!("?{q}")).unwrap_or_default()
}

impl Api {
    /// The API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn new(target: &Target) -> Result<Api> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", target.token.expose()))
            .map_err(|_| usage("the token holds characters an HTTP header cannot carry"))?;
        // Kept out of reqwest's and hyper's debug output.
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("uplinkctl/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            // A redirect to another host would carry the bearer token there.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CtlError::Unavailable(format!("cannot build the HTTP client: {e}")))?;
        Ok(Api {
            base: target.api_url.clone(),
            http,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call(Method::GET, path, None, Duration::from_secs(30))
            .await
    }

    /// A GET that may be held by the server (`wait` seconds of long-poll).
    pub async fn get_long(&self, path: &str, wait: u64) -> Result<Value> {
        self.call(Method::GET, path, None, Duration::from_secs(wait + 30))
            .await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> Result<Value> {
        self.call(Method::POST, path, body, Duration::from_secs(30))
            .await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Result<Value> {
        self.call(Method::PATCH, path, Some(body), Duration::from_secs(30))
            .await
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.call(Method::DELETE, path, None, Duration::from_secs(30))
            .await
    }

    /// One request. A state-changing one carries an `Idempotency-Key`, so it is retried
    /// (connection failures, 502/503/504) without being carried out twice; a GET is retried
    /// the same way. At most 3 tries, 0.5 s then 1 s apart.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let key = (method != Method::GET).then(|| uuid::Uuid::new_v4().simple().to_string());
        let mut last = None;
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500 << (attempt - 1))).await;
            }
            let mut req = self.http.request(method.clone(), &url).timeout(timeout);
            if let Some(k) = &key {
                req = req.header("Idempotency-Key", k);
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    ) && attempt < 2
                    {
                        last = Some(answer(&method, path, resp).await);
                        continue;
                    }
                    return answer(&method, path, resp).await;
                }
                Err(e) => {
                    let what = if e.is_timeout() {
                        "timed out".to_string()
                    } else if e.is_connect() {
                        "cannot connect".to_string()
                    } else {
                        // Without the URL: only the cause.
                        let e = e.without_url();
                        format!("{e}")
                    };
                    last = Some(Err(CtlError::Unavailable(format!(
                        "{method} {path}: API at {} unreachable: {what}",
                        self.base
                    ))));
                }
            }
        }
        last.unwrap_or_else(|| Err(CtlError::Unavailable("no answer".into())))
    }
}

/// The body of a 2xx (`null` for 204), or the error a problem document stands for.
async fn answer(method: &Method, path: &str, resp: reqwest::Response) -> Result<Value> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| {
        CtlError::Unavailable(format!(
            "{method} {path}: the answer was cut off: {}",
            e.without_url()
        ))
    })?;
    if status.is_success() {
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        return serde_json::from_slice(&bytes).map_err(|e| {
            CtlError::Unavailable(format!(
                "{method} {path}: {status} with a body that is not JSON: {e}"
            ))
        });
    }
    let problem: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let code = problem["code"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
                .replace(' ', "_")
        });
    let detail = problem["detail"]
        .as_str()
        .or_else(|| problem["title"].as_str())
        .map(|d| d.to_string())
        .unwrap_or_else(|| {
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                .trim()
                .to_string()
        });
    if status.is_server_error() {
        return Err(CtlError::Unavailable(format!(
            "{} {code}: {detail}",
            status.as_u16()
        )));
    }
    Err(CtlError::Refused {
        status: status.as_u16(),
        code,
        detail: one_line(&detail),
        problem,
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
