//! `doctor`: checks the configuration, the device key, the state directory and its free
//! space, the MQTT connection and the clock against the API's, one line each.

use std::path::Path;
use std::time::Duration;

use uplink_protocol::sign;
use uplink_protocol::unix_now;
use uuid::Uuid;

use super::{human_bytes, EXIT_FAIL, EXIT_OK};
use crate::config::{self, Config, Secret};

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Ok(String),
    NotChecked(String),
    Fail(String),
}

impl Check {
    pub fn line(&self, name: &str) -> String {
        match self {
            Check::Ok(d) if d.is_empty() => format!("{name:<20} ok"),
            Check::Ok(d) => format!("{name:<20} ok: {d}"),
            Check::NotChecked(why) => format!("{name:<20} ok: not checked ({why})"),
            Check::Fail(why) => format!("{name:<20} FAIL: {why}"),
        }
    }
}

/// Parses an HTTP `Date` (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`) to Unix seconds.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let mut w = s.split_whitespace().skip(1);
    let day: i64 = w.next()?.parse().ok()?;
    let month = match w.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = w.next()?.parse().ok()?;
    let mut hms = w.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if w.next()? != "GMT" {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// Largest clock difference with the API that `doctor` accepts.
pub const MAX_SKEW_SECS: i64 = 60;
/// The control API's default replay window: signed requests and MQTT passwords further
/// than this from its clock are refused.
pub const REPLAY_WINDOW_SECS: i64 = 300;
/// Free space below this fails `doctor` (parts are read from the files, but SQLite and logs
/// need room).
pub const MIN_FREE_BYTES: u64 = 256 * 1024 * 1024;

fn free_bytes(dir: &Path) -> Result<u64, String> {
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run df: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "df failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: u64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "cannot read df's output".to_string())?;
    Ok(kib * 1024)
}

fn check_state_dir(dir: &Path) -> Check {
    if let Err(e) = std::fs::create_dir_all(dir) {
        return Check::Fail(format!("cannot create {}: {e}", dir.display()));
    }
    let probe = dir.join(format!(".doctor-{}", Uuid::new_v4().simple()));
    match std::fs::write(&probe, b"ok") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            Check::Ok(format!("{} is writable", dir.display()))
        }
        Err(e) => Check::Fail(format!("cannot write in {}: {e}", dir.display())),
    }
}

async fn check_mqtt(cfg: &Config, key: &sign::PrivateKey, password: Option<&Secret>) -> Check {
    use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet};
    let mut opts = MqttOptions::new(cfg.device_id.clone(), cfg.mqtt.host.clone(), cfg.mqtt.port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(true);
    let user = cfg
        .mqtt
        .username
        .clone()
        .unwrap_or_else(|| cfg.device_id.clone());
    let password = match password {
        Some(p) => p.expose().to_string(),
        None => sign::mqtt_password(key, &cfg.device_id, unix_now()),
    };
    opts.set_credentials(user, password);
    if let Some(files) = crate::tls::mqtt_files(&cfg.mqtt) {
        match crate::tls::transport(&files) {
            Ok(t) => {
                opts.set_transport(t);
            }
            Err(e) => return Check::Fail(format!("TLS settings: {e}")),
        }
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let check = match outcome {
        Ok(Ok(())) => Check::Ok(format!("CONNECT as {} accepted", cfg.device_id)),
        Ok(Err(ConnectionError::ConnectionRefused(code))) => {
            Check::Fail(format!("CONNECT refused: {code:?}"))
        }
        Ok(Err(e)) => match uplink_service::tls::explain(&e) {
            Some(why) => Check::Fail(format!(
                "TLS handshake with {}:{} failed: {why}",
                cfg.mqtt.host, cfg.mqtt.port
            )),
            None => Check::Fail(format!("CONNECT failed: {e}")),
        },
        Err(_) => Check::Fail("no CONNACK within 5 s".into()),
    };
    if matches!(check, Check::Ok(_)) {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    check
}

async fn check_clock(api_url: Option<&str>, https_ca_file: Option<&Path>) -> Check {
    let Some(url) = api_url else {
        return Check::NotChecked("set api_url to compare with the API's clock".into());
    };
    let builder = match crate::tls::https(reqwest::Client::builder(), https_ca_file) {
        Ok(b) => b,
        Err(e) => return Check::Fail(format!("https_ca_file: {e}")),
    };
    let client = match builder.timeout(Duration::from_secs(5)).build() {
        Ok(c) => c,
        Err(e) => return Check::Fail(format!("HTTP client: {e}")),
    };
    let response = match client.get(url).send().await {
        Ok(r) => r,
        Err(e) => {
            let why = uplink_service::tls::explain(&e)
                .map_or_else(|| e.without_url().to_string(), |w| format!("TLS: {w}"));
            return Check::Fail(format!("cannot reach api_url: {why}"));
        }
    };
    let Some(remote) = response
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date)
    else {
        return Check::NotChecked("the API sent no Date header".into());
    };
    let skew = unix_now() - remote;
    if skew.abs() > REPLAY_WINDOW_SECS {
        Check::Fail(format!(
            "{skew:+} s: {}",
            crate::clock::describe(skew, Some(REPLAY_WINDOW_SECS as u64))
        ))
    } else if skew.abs() > MAX_SKEW_SECS {
        Check::Fail(format!(
            "{skew:+} s (more than {MAX_SKEW_SECS} s): {}",
            crate::clock::describe(skew, None)
        ))
    } else {
        Check::Ok(format!("{skew:+} s from the API"))
    }
}

/// `doctor`: runs every check, prints one line each; exit 0 when all are ok, 1 otherwise.
pub async fn doctor(file: Option<&Path>) -> u8 {
    let mut failed = false;
    let mut report = |name: &str, check: Check| {
        failed |= matches!(check, Check::Fail(_));
        println!("{}", check.line(name));
    };
    let cfg = match config::load(file) {
        Ok(c) => c,
        Err(e) => {
            report("config", Check::Fail(e.to_string().replace('\n', " ")));
            return EXIT_FAIL;
        }
    };
    match config::load_and_validate(file) {
        Ok(_) => report("config", Check::Ok(String::new())),
        Err(e) => report("config", Check::Fail(e.to_string().replace('\n', " "))),
    }
    let key = match std::fs::read_to_string(&cfg.key_file) {
        Ok(text) => match sign::decode_private(&text) {
            Ok(k) => {
                report(
                    "key file",
                    Check::Ok(format!(
                        "{}, public key {}",
                        cfg.key_file.display(),
                        sign::encode_public(&k.verifying_key())
                    )),
                );
                Some(k)
            }
            Err(e) => {
                report(
                    "key file",
                    Check::Fail(format!("{}: {e}", cfg.key_file.display())),
                );
                None
            }
        },
        Err(e) => {
            report(
                "key file",
                Check::Fail(format!("cannot read {}: {e}", cfg.key_file.display())),
            );
            None
        }
    };
    match sign::decode_public(&cfg.command_public_key) {
        Ok(_) => report("command public key", Check::Ok(String::new())),
        Err(e) => report("command public key", Check::Fail(e.to_string())),
    }
    report("state dir", check_state_dir(&cfg.state_dir));
    report(
        "disk space",
        match free_bytes(&cfg.state_dir) {
            Ok(free) if free < MIN_FREE_BYTES => Check::Fail(format!(
                "only {} free under {}",
                human_bytes(free),
                cfg.state_dir.display()
            )),
            Ok(free) => Check::Ok(format!("{} free", human_bytes(free))),
            Err(e) => Check::Fail(e),
        },
    );
    let addr = format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port);
    let reachable = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(&addr),
    )
    .await;
    let tcp_ok = matches!(reachable, Ok(Ok(_)));
    report(
        "broker tcp",
        match reachable {
            Ok(Ok(_)) => Check::Ok(format!("{addr} reachable")),
            Ok(Err(e)) => Check::Fail(format!("{addr}: {e}")),
            Err(_) => Check::Fail(format!("{addr}: no answer within 3 s")),
        },
    );
    let mqtt = match (&key, tcp_ok, cfg.mqtt.static_password()) {
        (_, _, Err(problem)) => Check::Fail(problem.to_string()),
        (Some(key), true, Ok(password)) => check_mqtt(&cfg, key, password.as_ref()).await,
        (None, _, _) => Check::Fail("no usable device key".into()),
        (_, false, _) => Check::Fail("broker not reachable".into()),
    };
    report("mqtt connect", mqtt);
    report(
        "clock",
        check_clock(cfg.api_url.as_deref(), cfg.https_ca_file.as_deref()).await,
    );
    if failed {
        EXIT_FAIL
    } else {
        EXIT_OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Mon, 23 Nov 2026 12:43:25 GMT"),
            Some(1_795_437_805)
        );
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
        assert_eq!(parse_http_date("yesterday"), None);
    }

    #[test]
    fn check_lines() {
        assert_eq!(
            Check::Ok(String::new()).line("config"),
            format!("{:<20} ok", "config")
        );
        assert!(Check::Fail("nope".into()).line("x").ends_with("FAIL: nope"));
        assert!(Check::NotChecked("why".into())
            .line("clock")
            .ends_with("ok: not checked (why)"));
    }
}
