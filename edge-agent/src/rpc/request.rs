//! Requests over `req`/`res`: signed, correlated by request id, re-sent while unanswered
//! and retried with backoff; answers are routed to their waiting request only when the
//! control API signed them for this device.

use std::time::Duration;

use rumqttc::QoS;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use tracing::{debug, warn};
use uplink_protocol::envelope::{RequestEnvelope, ResponseEnvelope};
use uplink_protocol::ops::Op;
use uplink_protocol::sign::SignError;
use uplink_protocol::topics::{self, Channel};
use uplink_protocol::unix_now;

use super::{Link, Pending, RpcError};

impl Link {
    fn envelope(&self, op: Op, request_id: &str, body: &str) -> Vec<u8> {
        let env = RequestEnvelope::sign(
            &self.key,
            &self.device_id,
            op.as_str(),
            request_id,
            unix_now(),
            body.to_string(),
        );
        serde_json::to_vec(&env).unwrap_or_default()
    }

    /// Publishes a signed one-way message (`command.ack` on `cmd/ack`, `progress` on
    /// `progress`). QoS 0 messages are dropped when the link is congested.
    pub async fn send_signed<B: Serialize>(
        &self,
        channel: Channel,
        op: Op,
        request_id: &str,
        body: &B,
        qos: QoS,
    ) -> Result<(), RpcError> {
        let body = serde_json::to_string(body)?;
        let payload = self.envelope(op, request_id, &body);
        let topic = topics::topic(&self.device_id, channel);
        if qos == QoS::AtMostOnce {
            if let Err(e) = self.client.try_publish(topic, qos, false, payload) {
                debug!(op = op.as_str(), error = %e, "Message dropped; link congested");
            }
            return Ok(());
        }
        match tokio::time::timeout(
            self.policy.request_timeout,
            self.client.publish(topic, qos, false, payload),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                warn!(op = op.as_str(), error = %e, "Message not queued");
                Ok(())
            }
            Err(_) => {
                warn!(op = op.as_str(), "Message not queued in time; link is down");
                Ok(())
            }
        }
    }

    /// Publishes a signed QoS 0 message now, or drops it when the link is congested.
    pub fn send_signed_now<B: Serialize>(
        &self,
        channel: Channel,
        op: Op,
        request_id: &str,
        body: &B,
    ) {
        let Ok(body) = serde_json::to_string(body) else {
            return;
        };
        let payload = self.envelope(op, request_id, &body);
        let topic = topics::topic(&self.device_id, channel);
        if let Err(e) = self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, payload)
        {
            debug!(op = op.as_str(), error = %e, "Message dropped; link congested");
        }
    }

    /// Sends a request and waits for its answer, re-sending as the policy says.
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        op: Op,
        request_id: &str,
        body: &B,
    ) -> Result<R, RpcError> {
        let body = serde_json::to_string(body)?;
        let answer = self.call_raw(op, request_id, &body).await?;
        let result = answer.result.unwrap_or(serde_json::Value::Null);
        serde_json::from_value(result).map_err(|e| RpcError::BadAnswer {
            op: op.as_str(),
            detail: e.to_string(),
        })
    }

    async fn call_raw(
        &self,
        op: Op,
        request_id: &str,
        body: &str,
    ) -> Result<ResponseEnvelope, RpcError> {
        let _guard = PendingGuard {
            pending: &self.pending,
            request_id,
        };
        let started = tokio::time::Instant::now();
        let deadline = started + self.policy.budget;
        let mut backoff = self.policy.backoff();
        let topic = topics::topic(&self.device_id, Channel::Req);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let (tx, rx) = oneshot::channel();
            if let Ok(mut map) = self.pending.lock() {
                map.insert(request_id.to_string(), tx);
            }
            let payload = self.envelope(op, request_id, body);
            debug!(op = op.as_str(), request_id, attempt, "Sending request");
            let wait = async {
                // Queue the publish (may block while the link is down), then wait for the answer.
                self.client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await
                    .map_err(|_| ())?;
                rx.await.map_err(|_| ())
            };
            let outcome = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(RpcError::Shutdown),
                r = tokio::time::timeout(self.policy.request_timeout, wait) => r,
            };
            let retry_delay = match outcome {
                Ok(Ok(answer)) if answer.status < 400 => return Ok(answer),
                Ok(Ok(answer)) => {
                    let (code, detail) = match &answer.problem {
                        Some(p) => (
                            p.code.clone(),
                            p.detail.clone().unwrap_or_else(|| p.title.clone()),
                        ),
                        None => ("unknown".to_string(), format!("status {}", answer.status)),
                    };
                    if !(answer.status >= 500 || answer.status == 429 || answer.status == 408) {
                        if answer.status == 401 && code == "stale_request" {
                            self.stale_request(&answer);
                        }
                        return Err(RpcError::Refused {
                            op: op.as_str(),
                            status: answer.status,
                            code,
                            detail,
                        });
                    }
                    let delay = backoff.next().unwrap_or(self.policy.max_backoff);
                    if tokio::time::Instant::now() + delay >= deadline {
                        return Err(RpcError::Unavailable {
                            op: op.as_str(),
                            status: answer.status,
                            detail,
                        });
                    }
                    warn!(op = op.as_str(), request_id, status = answer.status, %code, retry_in_ms = delay.as_millis() as u64, "Request answered with a retryable error");
                    delay
                }
                Ok(Err(())) | Err(_) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(RpcError::Timeout {
                            op: op.as_str(),
                            budget_secs: self.policy.budget.as_secs(),
                        });
                    }
                    warn!(
                        op = op.as_str(),
                        request_id, attempt, "No answer in time; re-sending"
                    );
                    crate::metrics::request_resent();
                    Duration::ZERO
                }
            };
            if !retry_delay.is_zero() {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Err(RpcError::Shutdown),
                    _ = tokio::time::sleep(retry_delay) => {}
                }
            }
        }
    }

    /// Routes an answer from `res` to its waiting request. Only answers the control API
    /// signed for this device count; an unsigned one only as "retry later" (a 5xx the
    /// bridge made when it could not reach the API). Anything else on `res` is someone
    /// else's and is dropped: the request is re-sent and gets the API's answer.
    pub(super) fn deliver(&self, answer: ResponseEnvelope) {
        let authentic = match answer.verify(&self.command_key, &self.device_id) {
            Ok(()) => true,
            Err(SignError::Missing) => answer.status >= 500,
            Err(_) => false,
        };
        if !authentic {
            warn!(request_id = %answer.request_id, status = answer.status, "Answer not signed by the control API; ignored");
            return;
        }
        let tx = self
            .pending
            .lock()
            .ok()
            .and_then(|mut map| map.remove(&answer.request_id));
        match tx {
            Some(tx) => {
                let _ = tx.send(answer);
            }
            None => {
                debug!(request_id = %answer.request_id, "Answer for no waiting request; ignored")
            }
        }
    }
}

struct PendingGuard<'a> {
    pending: &'a Pending,
    request_id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.pending.lock() {
            map.remove(self.request_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{LinkSettings, RetryPolicy};
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;
    use uplink_protocol::problem::Problem;
    use uplink_protocol::sign;

    #[tokio::test]
    async fn only_answers_the_api_signed_for_this_device_reach_a_request() {
        let api = sign::generate();
        let shutdown = CancellationToken::new();
        let parts = Link::start(
            LinkSettings {
                device_id: "robot-17".into(),
                host: "127.0.0.1".into(),
                port: 9,
                username: None,
                password: None,
                key: sign::generate(),
                command_key: api.verifying_key().into(),
                policy: RetryPolicy::new(Duration::from_secs(10)),
                tls: None,
            },
            shutdown.clone(),
        );
        let link = parts.link;
        let wait = |id: &str| {
            let (tx, rx) = oneshot::channel();
            link.pending.lock().unwrap().insert(id.into(), tx);
            rx
        };
        let answer = || ResponseEnvelope::ok("r1", 200, serde_json::json!({"url": "http://x"}));
        let mut rx = wait("r1");
        link.deliver(answer());
        link.deliver(answer().sign(&sign::generate(), "robot-17"));
        link.deliver(answer().sign(&api, "robot-18"));
        link.deliver(ResponseEnvelope::problem(
            "r1",
            Problem::new(409, "x", "x", None),
        ));
        assert!(
            rx.try_recv().is_err(),
            "unsigned or forged answers are dropped"
        );
        link.deliver(answer().sign(&api, "robot-17"));
        assert_eq!(rx.try_recv().unwrap().status, 200);
        // An unsigned 5xx (a bridge that could not reach the API) only means "retry".
        let mut rx = wait("r2");
        link.deliver(ResponseEnvelope::problem(
            "r2",
            Problem::new(503, "api_unavailable", "x", None),
        ));
        assert_eq!(rx.try_recv().unwrap().status, 503);
        shutdown.cancel();
    }
}
