//! HTTP client for the control API: the device API (forwarded requests) and the bridge API
//! (MQTT auth, presence, due commands).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::{Deserialize, Serialize};
use uplink_protocol::envelope::CommandEnvelope;
use uplink_protocol::telemetry::Status;
use uuid::Uuid;

use crate::config::Secret;

pub mod devices;
pub use devices::RegisteredDevice;

/// Whole-request timeout for every call to the control API.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout for the control API.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `GET /healthz` of the control API may take during a readiness check.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("could not build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// Connect error, timeout or broken connection: the call may be retried.
    #[error("control API unreachable: {0}")]
    Unreachable(#[source] reqwest::Error),
    #[error("control API answered {status} to {what}: {body}")]
    Status {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("control API answer to {what} is not what was expected: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("header {name} has a value that HTTP cannot carry")]
    BadHeader { name: &'static str },
    #[error("api_ca_file: {0}")]
    CaFile(String),
}

impl ApiError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Unreachable(_) => true,
            ApiError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }
}

/// A raw answer of the device API, mapped to a response envelope by [`crate::forward`].
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// The API's signature over the answer (`X-Uplink-Answer-Signature`), passed on to the
    /// device in the `res` envelope.
    pub signature: Option<String>,
}

/// One entry of `POST /v1/bridge/commands/claim` (and `GET /v1/bridge/commands/due`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DueCommand {
    pub command_id: Uuid,
    pub device_id: String,
    pub envelope: CommandEnvelope,
}

#[derive(Serialize)]
struct ClaimRequest<'a> {
    bridge: &'a str,
    limit: usize,
    wait_ms: u64,
}

/// How an MQTT client proves it is the device it connects as.
#[derive(Debug)]
pub enum Login<'a> {
    /// The key-derived password of its CONNECT (checked by the API).
    Password {
        username: &'a str,
        password: &'a str,
    },
    /// A client certificate naming the device, verified by the bridge's TLS listener.
    Certificate,
}

impl Login<'_> {
    /// For logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Login::Password { .. } => "password",
            Login::Certificate => "certificate",
        }
    }
}

#[derive(Serialize)]
struct MqttAuthRequest<'a> {
    client_id: &'a str,
    username: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    client_certificate: bool,
}

#[derive(Deserialize)]
struct MqttAuthAnswer {
    allow: bool,
}

#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Secret,
    /// Whether the last call got an answer below 500 (shared by all clones).
    last_ok: Arc<AtomicBool>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// `base` is the API URL without a trailing slash.
    /// `ca_file`: CA certificates (PEM) to trust besides the built-in roots.
    pub fn new(base: String, token: Secret, ca_file: Option<&Path>) -> Result<Self, ApiError> {
        let roots = match ca_file {
            Some(file) => uplink_service::tls::https_roots(file).map_err(ApiError::CaFile)?,
            None => Vec::new(),
        };
        let http = roots
            .into_iter()
            .fold(reqwest::Client::builder(), |b, cert| {
                b.add_root_certificate(cert)
            })
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("uplink-bridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ApiError::Client)?;
        Ok(ApiClient {
            http,
            base,
            token,
            last_ok: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Whether the last call to the control API got an answer below 500.
    pub fn last_call_ok(&self) -> bool {
        self.last_ok.load(Ordering::Relaxed)
    }

    /// Sends `req`, remembering whether the API answered (below 500).
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ApiError> {
        let result = req.send().await;
        let ok = result
            .as_ref()
            .is_ok_and(|res| !res.status().is_server_error());
        self.last_ok.store(ok, Ordering::Relaxed);
        result.map_err(ApiError::Unreachable)
    }

    /// Whether `GET /healthz` of the control API answers 2xx within [`HEALTH_TIMEOUT`].
    pub async fn healthz(&self) -> bool {
        let req = self
            .http
            .get(format!("{}/healthz", self.base))
            .timeout(HEALTH_TIMEOUT);
        let ok = req.send().await.is_ok_and(|res| res.status().is_success());
        self.last_ok.store(ok, Ordering::Relaxed);
        ok
    }

    fn bridge_request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header(AUTHORIZATION, format!("Bearer {}", self.token.expose()))
    }

    /// Forwards a device request: `POST {path}` with `headers` and `body` verbatim.
    /// Any HTTP answer is returned as is; only a failure to get one is an error.
    pub async fn device_call(
        &self,
        path: &str,
        headers: &[(&'static str, String)],
        body: String,
    ) -> Result<HttpAnswer, ApiError> {
        let mut req = self.http.post(format!("{}{path}", self.base));
        for (name, value) in headers {
            let value = HeaderValue::from_str(value).map_err(|_| ApiError::BadHeader { name })?;
            req = req.header(HeaderName::from_static(name), value);
        }
        // The API's span joins this request's trace when spans are exported.
        for (name, value) in uplink_service::otel::inject() {
            req = req.header(name, value);
        }
        let res = self.send(req.body(body)).await?;
        let status = res.status().as_u16();
        let content_type = res
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let signature = res
            .headers()
            .get("x-uplink-answer-signature")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = res.bytes().await.map_err(ApiError::Unreachable)?;
        Ok(HttpAnswer {
            status,
            content_type,
            body,
            signature,
        })
    }

    /// `POST /v1/bridge/mqtt-auth`: whether the broker may accept this client.
    pub async fn mqtt_auth(&self, client_id: &str, login: &Login<'_>) -> Result<bool, ApiError> {
        const WHAT: &str = "mqtt-auth";
        let body = match login {
            Login::Password { username, password } => MqttAuthRequest {
                client_id,
                username,
                password: Some(password),
                client_certificate: false,
            },
            Login::Certificate => MqttAuthRequest {
                client_id,
                username: client_id,
                password: None,
                client_certificate: true,
            },
        };
        let req = self
            .bridge_request(reqwest::Method::POST, "/v1/bridge/mqtt-auth")
            .json(&body);
        let res = self.send(req).await?;
        let res = check(WHAT, res).await?;
        let answer: MqttAuthAnswer = res.json().await.map_err(|e| ApiError::Decode {
            what: WHAT,
            reason: e.to_string(),
        })?;
        Ok(answer.allow)
    }

    /// `PUT /v1/bridge/devices/{device_id}/presence`.
    pub async fn put_presence(&self, device_id: &str, status: &Status) -> Result<(), ApiError> {
        let req = self
            .bridge_request(
                reqwest::Method::PUT,
                &format!("/v1/bridge/devices/{device_id}/presence"),
            )
            .json(status);
        let res = self.send(req).await?;
        check("presence", res).await.map(drop)
    }

    /// `POST /v1/bridge/commands/claim`: at most `limit` due commands, leased to `bridge`;
    /// when none is due the API holds the call up to `wait` for one.
    pub async fn claim_commands(
        &self,
        bridge: &str,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<DueCommand>, ApiError> {
        const WHAT: &str = "commands/claim";
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let req = self
            .bridge_request(reqwest::Method::POST, "/v1/bridge/commands/claim")
            .timeout(wait + REQUEST_TIMEOUT)
            .json(&ClaimRequest {
                bridge,
                limit,
                wait_ms,
            });
        let res = self.send(req).await?;
        let res = check(WHAT, res).await?;
        res.json().await.map_err(|e| ApiError::Decode {
            what: WHAT,
            reason: e.to_string(),
        })
    }

    /// `POST /v1/bridge/commands/published`: the commands of one pass, published.
    pub async fn mark_published(&self, command_ids: &[Uuid]) -> Result<(), ApiError> {
        let req = self
            .bridge_request(reqwest::Method::POST, "/v1/bridge/commands/published")
            .json(&serde_json::json!({ "command_ids": command_ids }));
        let res = self.send(req).await?;
        check("commands/published", res).await.map(drop)
    }
}

/// Turns a non-2xx answer of a bridge endpoint into [`ApiError::Status`].
async fn check(what: &'static str, res: reqwest::Response) -> Result<reqwest::Response, ApiError> {
    let status = res.status();
    if status.is_success() {
        return Ok(res);
    }
    let mut body = res.text().await.unwrap_or_default();
    if body.len() > 512 {
        let mut cut = 512;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    Err(ApiError::Status {
        what,
        status: status.as_u16(),
        body,
    })
}
