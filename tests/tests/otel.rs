//! Optional OpenTelemetry export: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the API and the
//! bridge send their spans to an OTLP/HTTP collector (here a minimal one in the test), and a
//! device request forwarded by the bridge is one trace across both services. A collector
//! that is down costs spans, never uploads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use uplink_e2e::{AgentOptions, Stack, StackOptions};

#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// Requests that were not a decodable `POST /v1/traces`.
    bad: Vec<String>,
}

/// Accepts OTLP/HTTP protobuf exports on `POST /v1/traces` and answers 200.
async fn collector() -> (String, Arc<Mutex<Received>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = Arc::new(Mutex::new(Received::default()));
    let shared = got.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let got = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(sock, &got).await {
                    got.lock()
                        .expect("collector state")
                        .bad
                        .push(format!("connection: {e}"));
                }
            });
        }
    });
    (format!("http://{addr}"), got)
}

async fn serve(sock: TcpStream, got: &Mutex<Received>) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut request_line = String::new();
        if r.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let mut len = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).await?;
        record(
            request_line.trim_end(),
            &body,
            &mut got.lock().expect("collector state"),
        );
        w.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        )
        .await?;
    }
}

fn record(request_line: &str, body: &[u8], got: &mut Received) {
    if !request_line.starts_with("POST /v1/traces ") {
        got.bad.push(request_line.to_owned());
        return;
    }
    let export = match ExportTraceServiceRequest::decode(body) {
        Ok(e) => e,
        Err(e) => {
            got.bad.push(format!("undecodable export: {e}"));
            return;
        }
    };
    for rs in export.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            got.spans.push(Span {
                service: service.clone(),
                name: span.name,
                trace_id: span.trace_id,
                span_id: span.span_id,
                parent_span_id: span.parent_span_id,
            });
        }
    }
}

/// An API `request` span whose parent is a bridge `forward` span of the same trace.
fn joined(spans: &[Span]) -> Option<(Span, Span)> {
    spans
        .iter()
        .filter(|s| s.service == "uplink-api" && s.name == "request")
        .find_map(|api| {
            spans
                .iter()
                .find(|b| {
                    b.service == "uplink-bridge"
                        && b.name == "forward"
                        && b.trace_id == api.trace_id
                        && b.span_id == api.parent_span_id
                })
                .map(|bridge| (bridge.clone(), api.clone()))
        })
}

fn otel_env(endpoint: &str) -> Vec<(String, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.into()),
        // Export every 100 ms instead of every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_are_one_trace_across_bridge_and_api() {
    let (endpoint, got) = collector().await;
    let stack = Stack::start(StackOptions {
        service_env: otel_env(&endpoint),
        ..StackOptions::default()
    })
    .await;
    let dev = stack.add_device(&AgentOptions::default()).await;
    let file = stack.source_file(&dev, "rec/traced.bin", 4096).await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(60))
        .await;

    let deadline = Instant::now() + Duration::from_secs(20);
    let (bridge, api) = loop {
        if let Some(pair) = joined(&got.lock().expect("collector state").spans) {
            break pair;
        }
        if Instant::now() > deadline {
            let got = got.lock().expect("collector state");
            let seen: Vec<_> = got
                .spans
                .iter()
                .map(|s| format!("{}/{}", s.service, s.name))
                .collect();
            panic!(
                "no API request span joined a bridge forward span within 20 s; spans seen: \
                 {seen:?}; bad requests: {:?}",
                got.bad
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(api.trace_id.len(), 16, "a W3C trace id");
    assert_ne!(bridge.trace_id, vec![0; 16]);
    let got = got.lock().expect("collector state");
    assert!(got.bad.is_empty(), "malformed exports: {:?}", got.bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_go_on_when_the_collector_is_down() {
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let stack = Stack::start(StackOptions {
        service_env: otel_env(&format!("http://127.0.0.1:{closed}")),
        ..StackOptions::default()
    })
    .await;
    let dev = stack.add_device(&AgentOptions::default()).await;
    let file = stack.source_file(&dev, "rec/untraced.bin", 4096).await;
    stack
        .upload_and_verify(&dev, &file, Duration::from_secs(60))
        .await;
}
