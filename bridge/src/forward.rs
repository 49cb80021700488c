//! Device → API: signed envelopes on `req`, `cmd/ack` and `progress` become
//! `POST /v1/device/{op}` calls; for `req` the answer goes back on `res`.
//!
//! The pure pieces (payload classification, header mapping, answer mapping) are plain
//! functions; [`handle`] is the I/O around them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use rumqttc::{AsyncClient, QoS};
use serde::Deserialize;
use tracing::{debug, info, warn, Instrument};
use uplink_protocol::envelope::{RequestEnvelope, ResponseEnvelope, MAX_PAYLOAD_BYTES};
use uplink_protocol::ops::Op;
use uplink_protocol::problem::Problem;
use uplink_protocol::topics::{self, Channel};
use uplink_protocol::{valid_request_id, VERSION};

use crate::api::{ApiClient, ApiError, HttpAnswer};
use crate::metrics::{Metrics, Outcome};

pub const HEADER_DEVICE: &str = "x-uplink-device";
pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const HEADER_TIMESTAMP: &str = "x-uplink-timestamp";
pub const HEADER_SIGNATURE: &str = "x-uplink-signature";
pub const HEADER_REQUEST_ID: &str = "x-request-id";
pub const HEADER_CONTENT_TYPE: &str = "content-type";

/// Why a payload is not forwarded, and the request id to answer when one could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub request_id: Option<String>,
    pub problem: Problem,
}

/// A payload that can be forwarded.
#[derive(Debug, Clone, PartialEq)]
pub struct Forwardable {
    pub op: Op,
    pub envelope: RequestEnvelope,
}

pub fn malformed(detail: impl Into<String>) -> Problem {
    Problem::new(
        400,
        "malformed_request",
        "Malformed request",
        Some(detail.into()),
    )
}

pub fn api_unavailable() -> Problem {
    Problem::new(
        503,
        "api_unavailable",
        "Control API unavailable",
        Some("the bridge could not reach the control API; retry with the same request_id".into()),
    )
}

/// Reads a payload from `req`, `cmd/ack` or `progress`.
pub fn classify(payload: &[u8]) -> Result<Forwardable, Box<Rejection>> {
    #[derive(Deserialize)]
    struct Probe {
        request_id: Option<serde_json::Value>,
    }
    let request_id = || {
        serde_json::from_slice::<Probe>(payload)
            .ok()
            .and_then(|p| p.request_id)
            .and_then(|v| v.as_str().map(str::to_string))
    };
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(Box::new(Rejection {
            request_id: request_id(),
            problem: Problem::new(
                413,
                "payload_too_large",
                "Payload too large",
                Some(format!(
                    "payload is {} bytes; at most {MAX_PAYLOAD_BYTES} are accepted",
                    payload.len()
                )),
            ),
        }));
    }
    let reject = |problem: Problem| {
        Box::new(Rejection {
            request_id: request_id(),
            problem,
        })
    };
    let envelope: RequestEnvelope = serde_json::from_slice(payload)
        .map_err(|e| reject(malformed(format!("not a request envelope: {e}"))))?;
    if envelope.v != VERSION {
        return Err(reject(malformed(format!(
            "unsupported version v={}; this bridge speaks v={VERSION}",
            envelope.v
        ))));
    }
    if !valid_request_id(&envelope.request_id) {
        return Err(reject(malformed(
            "request_id must be 1-64 of [A-Za-z0-9_-]",
        )));
    }
    if envelope.sig.is_empty() || !envelope.sig.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(reject(malformed("sig must be base64")));
    }
    let Some(op) = Op::parse(&envelope.op) else {
        return Err(reject(Problem::new(
            404,
            "unknown_op",
            "Unknown op",
            Some(format!("op `{}` is not known", envelope.op)),
        )));
    };
    Ok(Forwardable { op, envelope })
}

/// The `X-Request-Id` the bridge sends and logs: `{device}:{request_id}`.
pub fn trace_id(device_id: &str, request_id: &str) -> String {
    format!("{device_id}:{request_id}")
}

/// Headers of the device API call for `envelope`, sent by device `device_id`.
pub fn device_headers(device_id: &str, envelope: &RequestEnvelope) -> Vec<(&'static str, String)> {
    vec![
        (HEADER_DEVICE, device_id.to_string()),
        (HEADER_IDEMPOTENCY_KEY, envelope.request_id.clone()),
        (HEADER_TIMESTAMP, envelope.ts.to_string()),
        (HEADER_SIGNATURE, envelope.sig.clone()),
        (HEADER_CONTENT_TYPE, "application/json".to_string()),
        (HEADER_REQUEST_ID, trace_id(device_id, &envelope.request_id)),
    ]
}

/// Stable problem code for an HTTP status that came without a problem document.
fn code_for_status(status: u16) -> (&'static str, &'static str) {
    match status {
        400 => ("bad_request", "Bad request"),
        401 => ("unauthorized", "Unauthorized"),
        403 => ("forbidden", "Forbidden"),
        404 => ("not_found", "Not found"),
        409 => ("conflict", "Conflict"),
        413 => ("payload_too_large", "Payload too large"),
        422 => ("unprocessable", "Unprocessable request"),
        429 => ("too_many_requests", "Too many requests"),
        502 => ("bad_gateway", "Bad gateway"),
        503 => ("api_unavailable", "Control API unavailable"),
        s if s >= 500 => ("api_error", "Control API error"),
        _ => ("http_error", "Unexpected HTTP status"),
    }
}

/// Maps the device API's answer to the response envelope published on `res`, with the
/// API's signature only when the envelope carries the API's own status and JSON: an answer
/// the bridge had to make up (or fill in) is unsigned.
pub fn response_from_api(request_id: &str, answer: &HttpAnswer) -> ResponseEnvelope {
    let (envelope, as_sent) = envelope_from_api(request_id, answer);
    // The signature covers what the API sent; a replaced answer keeps none.
    let same = as_sent && envelope.status == answer.status;
    envelope.with_sig(answer.signature.clone().filter(|_| same))
}

/// The envelope, and whether it carries the API's answer as sent.
fn envelope_from_api(request_id: &str, answer: &HttpAnswer) -> (ResponseEnvelope, bool) {
    let status = answer.status;
    if (200..300).contains(&status) {
        if answer.body.iter().all(u8::is_ascii_whitespace) {
            let envelope = ResponseEnvelope::ok(request_id, status, serde_json::json!({}));
            return (envelope, false);
        }
        return match serde_json::from_slice::<serde_json::Value>(&answer.body) {
            Ok(json) => (ResponseEnvelope::ok(request_id, status, json), true),
            Err(_) => (
                ResponseEnvelope::problem(
                    request_id,
                    Problem::new(
                        502,
                        "bad_gateway",
                        "Bad gateway",
                        Some(format!(
                            "control API answered {status} with a body that is not JSON"
                        )),
                    ),
                ),
                false,
            ),
        };
    }
    let sent = serde_json::from_slice::<Problem>(&answer.body)
        .ok()
        .filter(|p| (400..600).contains(&p.status));
    let as_sent = sent.is_some();
    let problem = sent.unwrap_or_else(|| {
        // A status below 400 that is not 2xx (a redirect) is not an answer either.
        let shown = if status >= 400 { status } else { 502 };
        let (code, title) = code_for_status(shown);
        Problem::new(
            shown,
            code,
            title,
            Some(format!("control API answered {status}")),
        )
    });
    (ResponseEnvelope::problem(request_id, problem), as_sent)
}

/// What [`handle`] needs.
#[derive(Clone)]
pub struct Forwarder {
    pub api: ApiClient,
    pub mqtt: AsyncClient,
    pub metrics: Arc<Metrics>,
}

impl Forwarder {
    /// Handles one payload from `channel` (`Req`, `CmdAck` or `Progress`) of `device_id`.
    pub async fn handle(&self, device_id: &str, channel: Channel, payload: &[u8]) {
        self.handle_classified(device_id, channel, classify(payload))
            .await
    }

    /// [`Forwarder::handle`] for a payload [`classify`] has already read.
    pub async fn handle_classified(
        &self,
        device_id: &str,
        channel: Channel,
        classified: Result<Forwardable, Box<Rejection>>,
    ) {
        let Forwardable { op, envelope } = match classified {
            Ok(f) => f,
            Err(rejection) => return self.reject(device_id, channel, *rejection).await,
        };
        let expected = match channel {
            Channel::CmdAck => Some(Op::CommandAck),
            Channel::Progress => Some(Op::Progress),
            _ => None,
        };
        if expected.is_some_and(|e| e != op) {
            warn!(
                device_id,
                channel = channel.suffix(),
                op = op.as_str(),
                "Op does not belong on this topic; dropped"
            );
            return;
        }
        let span = tracing::info_span!(
            "forward",
            request_id = %trace_id(device_id, &envelope.request_id),
            op = op.as_str(),
        );
        self.forward(device_id, channel, op, envelope)
            .instrument(span)
            .await
    }

    async fn reject(&self, device_id: &str, channel: Channel, rejection: Rejection) {
        let Rejection {
            request_id,
            problem,
        } = rejection;
        match (channel, request_id) {
            (Channel::Req, Some(request_id)) => {
                info!(device_id, %request_id, code = %problem.code, "Request refused");
                if self
                    .respond(device_id, ResponseEnvelope::problem(&request_id, problem))
                    .await
                {
                    self.metrics.problem_published();
                }
            }
            (_, request_id) => warn!(
                device_id,
                channel = channel.suffix(),
                ?request_id,
                code = %problem.code,
                detail = problem.detail.as_deref().unwrap_or(""),
                "Payload dropped"
            ),
        }
    }

    async fn forward(&self, device_id: &str, channel: Channel, op: Op, envelope: RequestEnvelope) {
        let headers = device_headers(device_id, &envelope);
        let path = op.http_path();
        let call = || self.api.device_call(&path, &headers, envelope.body.clone());
        let started = Instant::now();
        let result = match channel {
            // Acks matter and are idempotent (same request id): retry a little here; the
            // agent does not expect an answer to them.
            Channel::CmdAck => {
                call.retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(200))
                        .with_max_delay(Duration::from_secs(2))
                        .with_max_times(3)
                        .with_jitter(),
                )
                .when(|e: &ApiError| e.is_transient())
                .await
            }
            _ => call().await,
        };
        let outcome = match &result {
            Ok(answer) => Outcome::of_status(answer.status),
            Err(_) => Outcome::Failed,
        };
        self.metrics.forwarded(outcome, started.elapsed());
        match (channel, result) {
            (Channel::Req, Ok(answer)) => {
                let response = response_from_api(&envelope.request_id, &answer);
                debug!(status = answer.status, "Request answered");
                self.respond(device_id, response).await;
            }
            (Channel::Req, Err(e)) => {
                warn!(error = %e, "Control API unreachable; answering 503");
                self.respond(
                    device_id,
                    ResponseEnvelope::problem(&envelope.request_id, api_unavailable()),
                )
                .await;
            }
            (_, Ok(answer)) if (200..300).contains(&answer.status) => {
                debug!(status = answer.status, "Forwarded");
            }
            (_, Ok(answer)) => {
                let problem = response_from_api(&envelope.request_id, &answer).problem;
                warn!(
                    status = answer.status,
                    code = problem.as_ref().map(|p| p.code.as_str()).unwrap_or(""),
                    "Control API refused a forwarded message"
                );
            }
            (_, Err(e)) => warn!(error = %e, "Could not forward message"),
        }
    }

    /// Publishes `response` on the device's `res` topic; `false` when that failed.
    async fn respond(&self, device_id: &str, response: ResponseEnvelope) -> bool {
        let payload = match serde_json::to_vec(&response) {
            Ok(p) => p,
            Err(e) => {
                warn!(device_id, error = %e, "Could not serialise a response");
                return false;
            }
        };
        if payload.len() > MAX_PAYLOAD_BYTES {
            warn!(
                device_id,
                bytes = payload.len(),
                "Response is larger than the device payload limit"
            );
        }
        let topic = topics::topic(device_id, Channel::Res);
        if let Err(e) = self
            .mqtt
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            warn!(device_id, error = %e, "Could not publish a response");
            return false;
        }
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn env(op: &str) -> RequestEnvelope {
        RequestEnvelope {
            v: VERSION,
            request_id: "req-1".into(),
            op: op.into(),
            ts: 1_700_000_000,
            body: "{\"session_id\":\"x\"}".into(),
            sig: "c2ln".into(),
        }
    }

    fn bytes(e: &RequestEnvelope) -> Vec<u8> {
        serde_json::to_vec(e).unwrap()
    }

    #[test]
    fn valid_envelopes_are_forwardable() {
        for op in Op::ALL {
            let f = classify(&bytes(&env(op.as_str()))).unwrap();
            assert_eq!(f.op, op);
            assert_eq!(f.envelope, env(op.as_str()));
        }
    }

    #[test]
    fn malformed_payloads_get_400_with_request_id_when_readable() {
        let r = classify(b"not json").unwrap_err();
        assert_eq!(r.request_id, None);
        assert_eq!(r.problem.status, 400);
        assert_eq!(r.problem.code, "malformed_request");

        let r = classify(br#"{"v":1,"request_id":"abc","op":"session.status"}"#).unwrap_err();
        assert_eq!(r.request_id.as_deref(), Some("abc"));
        assert_eq!(r.problem.status, 400);

        let r = classify(br#"{"request_id":7}"#).unwrap_err();
        assert_eq!(r.request_id, None);

        let mut e = env("session.status");
        e.v = 2;
        let r = classify(&bytes(&e)).unwrap_err();
        assert_eq!(r.problem.code, "malformed_request");
        assert_eq!(r.request_id.as_deref(), Some("req-1"));

        let mut e = env("session.status");
        e.request_id = "bad id\n".into();
        let r = classify(&bytes(&e)).unwrap_err();
        assert_eq!(r.problem.code, "malformed_request");

        let mut e = env("session.status");
        e.sig = "a\r\nX-Evil: 1".into();
        assert_eq!(classify(&bytes(&e)).unwrap_err().problem.status, 400);
    }

    #[test]
    fn unknown_ops_get_404() {
        let r = classify(&bytes(&env("session.delete"))).unwrap_err();
        assert_eq!(r.problem.status, 404);
        assert_eq!(r.problem.code, "unknown_op");
        assert_eq!(r.request_id.as_deref(), Some("req-1"));
    }

    #[test]
    fn oversized_payloads_get_413() {
        let mut e = env("session.create");
        e.body = "x".repeat(MAX_PAYLOAD_BYTES);
        let r = classify(&bytes(&e)).unwrap_err();
        assert_eq!(r.problem.status, 413);
        assert_eq!(r.problem.code, "payload_too_large");
        assert_eq!(r.request_id.as_deref(), Some("req-1"));
        let r = classify(&vec![b'{'; MAX_PAYLOAD_BYTES + 1]).unwrap_err();
        assert_eq!((r.problem.status, r.request_id), (413, None));
    }

    #[test]
    fn headers_map_from_envelope_and_topic() {
        let h = device_headers("robot-17", &env("session.status"));
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("x-uplink-device"), Some("robot-17"));
        assert_eq!(get("idempotency-key"), Some("req-1"));
        assert_eq!(get("x-uplink-timestamp"), Some("1700000000"));
        assert_eq!(get("x-uplink-signature"), Some("c2ln"));
        assert_eq!(get("content-type"), Some("application/json"));
        assert_eq!(get("x-request-id"), Some("robot-17:req-1"));
        for (name, _) in &h {
            reqwest::header::HeaderName::from_static(name);
        }
    }

    fn answer(status: u16, ct: &str, body: &str) -> HttpAnswer {
        HttpAnswer {
            status,
            content_type: Some(ct.into()),
            body: Bytes::from(body.to_string()),
            signature: None,
        }
    }

    #[test]
    fn api_answers_map_to_responses() {
        let r = response_from_api("r", &answer(201, "application/json", r#"{"a":1}"#));
        assert_eq!(
            r,
            ResponseEnvelope::ok("r", 201, serde_json::json!({"a": 1}))
        );

        let r = response_from_api("r", &answer(204, "", ""));
        assert_eq!(r, ResponseEnvelope::ok("r", 204, serde_json::json!({})));

        // The API's signature goes along; an answer the bridge replaces carries none.
        let signed = |status, body: &str| HttpAnswer {
            signature: Some("c2ln".into()),
            ..answer(status, "application/json", body)
        };
        let r = response_from_api("r", &signed(201, r#"{"a":1}"#));
        assert_eq!(r.sig.as_deref(), Some("c2ln"));
        let r = response_from_api("r", &signed(200, "not json"));
        assert_eq!((r.status, r.sig), (502, None));
        // A problem made up for a body that was not one keeps the status, not the signature.
        let r = response_from_api("r", &signed(422, "nope"));
        assert_eq!((r.status, r.sig), (422, None));
        let r = response_from_api("r", &signed(204, ""));
        assert_eq!((r.status, r.sig), (204, None));
        let p = Problem::new(409, "session_paused", "Conflict", None);
        let r = response_from_api("r", &signed(409, &serde_json::to_string(&p).unwrap()));
        assert_eq!(r.sig.as_deref(), Some("c2ln"));

        let p = Problem::new(
            409,
            "conflict",
            "Conflict",
            Some("session is completed".into()),
        );
        let r = response_from_api(
            "r",
            &answer(
                409,
                "application/problem+json",
                &serde_json::to_string(&p).unwrap(),
            ),
        );
        assert_eq!(r, ResponseEnvelope::problem("r", p));

        let r = response_from_api("r", &answer(500, "text/html", "<h1>oops</h1>"));
        assert_eq!(r.status, 500);
        assert_eq!(r.problem.unwrap().code, "api_error");

        let r = response_from_api("r", &answer(422, "text/plain", "nope"));
        assert_eq!(r.status, 422);
        assert_eq!(r.problem.unwrap().code, "unprocessable");

        let r = response_from_api("r", &answer(200, "text/plain", "not json"));
        assert_eq!(r.status, 502);
        assert!(r.result.is_none());
    }
}
