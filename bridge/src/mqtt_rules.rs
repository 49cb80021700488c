//! Topic isolation on the embedded broker, as pure functions: MQTT 3.1.1 framing of what a
//! client sends, the fields of CONNECT, PUBLISH and SUBSCRIBE the gate ([`crate::gate`])
//! looks at, and the rule of which topics a device may use.
//!
//! rumqttd 0.20 has no per-topic ACL hook, so the gate reads every packet a device sends
//! before rumqttd does. A device (client id = username = device id) may publish only on
//! its own `req`, `cmd/ack`, `progress` and `status`, set a Last Will only on its own
//! `status`, and subscribe only to filters inside its own `uplink/v1/devices/{id}/` subtree.
//! Anything else closes its connection.

use uplink_protocol::topics::{self, Channel};

/// MQTT control packet types a client may send (MQTT 3.1.1 §2.2.1).
pub const CONNECT: u8 = 1;
pub const PUBLISH: u8 = 3;
pub const SUBSCRIBE: u8 = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("remaining length is not a valid variable byte integer")]
    BadLength,
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("packet is cut short")]
    Truncated,
    #[error("not an MQTT 3.1.1 CONNECT")]
    NotConnect,
    #[error("string is not UTF-8")]
    NotUtf8,
}

/// The length of the first complete packet in `buf` (fixed header included), `None` while
/// more bytes are needed. A remaining length over `max_remaining` is an error.
pub fn frame_len(buf: &[u8], max_remaining: usize) -> Result<Option<usize>, PacketError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if remaining > max_remaining {
                return Err(PacketError::TooLarge(remaining));
            }
            let total = 1 + (i + 1) + remaining;
            return Ok((buf.len() >= total).then_some(total));
        }
    }
    Err(PacketError::BadLength)
}

/// The packet type (high nibble of the first byte).
pub fn packet_type(frame: &[u8]) -> u8 {
    frame.first().map_or(0, |b| b >> 4)
}

/// The variable header and payload of a complete frame.
fn body(frame: &[u8]) -> &[u8] {
    let mut i = 1;
    while frame.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    frame.get(i + 1..).unwrap_or_default()
}

/// A cursor over a packet body.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PacketError> {
        let out = self
            .buf
            .get(self.at..self.at + n)
            .ok_or(PacketError::Truncated)?;
        self.at += n;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.take(1)?[0])
    }
    fn binary(&mut self) -> Result<&'a [u8], PacketError> {
        let len = self.take(2)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        self.take(len)
    }
    fn string(&mut self) -> Result<&'a str, PacketError> {
        std::str::from_utf8(self.binary()?).map_err(|_| PacketError::NotUtf8)
    }
    fn done(&self) -> bool {
        self.at >= self.buf.len()
    }
}

/// What the gate needs of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will_topic: Option<String>,
    /// Offset in the body where the login (username, then password: the last fields)
    /// starts.
    login_at: usize,
}

/// Parses an MQTT 3.1.1 CONNECT frame.
pub fn parse_connect(frame: &[u8]) -> Result<Connect, PacketError> {
    if packet_type(frame) != CONNECT {
        return Err(PacketError::NotConnect);
    }
    let mut r = Reader {
        buf: body(frame),
        at: 0,
    };
    if r.string()? != "MQTT" || r.u8()? != 4 {
        return Err(PacketError::NotConnect);
    }
    let flags = r.u8()?;
    r.take(2)?; // keep-alive
    let client_id = r.string()?.to_string();
    let will_topic = if flags & 0x04 != 0 {
        let topic = r.string()?.to_string();
        r.binary()?;
        Some(topic)
    } else {
        None
    };
    let login_at = r.at;
    let username = if flags & 0x80 != 0 {
        Some(r.string()?.to_string())
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(String::from_utf8_lossy(r.binary()?).into_owned())
    } else {
        None
    };
    Ok(Connect {
        client_id,
        username,
        password,
        will_topic,
        login_at,
    })
}

/// `frame` (a CONNECT) with its login replaced by `username` and `password`, whether it
/// carried one or not; `None` when they are longer than MQTT strings can be.
pub fn with_login(
    frame: &[u8],
    connect: &Connect,
    username: &str,
    password: &str,
) -> Option<Vec<u8>> {
    /// The connect flags' offset in the body: after the protocol name and level.
    const FLAGS_AT: usize = 7;
    let mut rest = body(frame).get(..connect.login_at)?.to_vec();
    *rest.get_mut(FLAGS_AT)? |= 0x80 | 0x40;
    for field in [username, password] {
        let len = u16::try_from(field.len()).ok()?;
        rest.extend_from_slice(&len.to_be_bytes());
        rest.extend_from_slice(field.as_bytes());
    }
    let mut out = vec![frame[0]];
    let mut n = rest.len();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&rest);
    Some(out)
}

/// The topic of a PUBLISH frame.
pub fn publish_topic(frame: &[u8]) -> Result<&str, PacketError> {
    Reader {
        buf: body(frame),
        at: 0,
    }
    .string()
}

/// The topic filters of a SUBSCRIBE frame.
pub fn subscribe_filters(frame: &[u8]) -> Result<Vec<&str>, PacketError> {
    let mut r = Reader {
        buf: body(frame),
        at: 0,
    };
    r.take(2)?; // packet id
    let mut filters = Vec::new();
    while !r.done() {
        filters.push(r.string()?);
        r.u8()?;
    }
    Ok(filters)
}

/// Whether `device_id` may publish on `topic`: its own `req`, `cmd/ack`, `progress`, `status`.
pub fn may_publish(device_id: &str, topic: &str) -> bool {
    matches!(
        topics::parse(topic),
        Some((id, Channel::Req | Channel::CmdAck | Channel::Progress | Channel::Status))
            if id == device_id
    )
}

/// Whether `device_id` may subscribe to `filter`: only inside its own subtree (wildcards
/// after the device id match nothing of another device).
pub fn may_subscribe(device_id: &str, filter: &str) -> bool {
    filter
        .strip_prefix(topics::ROOT)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.strip_prefix(device_id))
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|rest| !rest.is_empty())
        && topics::valid_device_id(device_id)
}

/// Whether a device's packet stays inside its own topics; `Err` says why not.
pub fn check_packet(device_id: &str, frame: &[u8]) -> Result<(), String> {
    match packet_type(frame) {
        PUBLISH => {
            let topic = publish_topic(frame).map_err(|e| format!("bad PUBLISH: {e}"))?;
            if may_publish(device_id, topic) {
                Ok(())
            } else {
                Err(format!("PUBLISH on {topic}"))
            }
        }
        SUBSCRIBE => {
            let filters = subscribe_filters(frame).map_err(|e| format!("bad SUBSCRIBE: {e}"))?;
            match filters.iter().find(|f| !may_subscribe(device_id, f)) {
                Some(f) => Err(format!("SUBSCRIBE to {f}")),
                None => Ok(()),
            }
        }
        CONNECT => Err("a second CONNECT".into()),
        // PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBSCRIBE, PINGREQ, DISCONNECT.
        4..=7 | 10 | 12 | 14 => Ok(()),
        other => Err(format!("packet type {other} from a client")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4::{Connect as RConnect, LastWill, Login, Publish, Subscribe};
    use rumqttc::mqttbytes::QoS;

    fn connect_frame(will: Option<&str>, login: Option<(&str, &str)>) -> Vec<u8> {
        let mut c = RConnect::new("robot-17");
        c.keep_alive = 30;
        c.last_will = will.map(|t| LastWill::new(t, "offline", QoS::AtLeastOnce, true));
        c.login = login.map(|(u, p)| Login::new(u, p));
        let mut buf = BytesMut::new();
        c.write(&mut buf).unwrap();
        buf.to_vec()
    }

    #[test]
    fn frames_are_delimited_and_bounded() {
        let frame = connect_frame(None, Some(("robot-17", "pw")));
        assert_eq!(frame_len(&frame, 1000), Ok(Some(frame.len())));
        assert_eq!(frame_len(&frame[..frame.len() - 1], 1000), Ok(None));
        assert_eq!(frame_len(&frame[..1], 1000), Ok(None));
        let mut two = frame.clone();
        two.extend_from_slice(&[0xc0, 0x00]);
        assert_eq!(frame_len(&two, 1000), Ok(Some(frame.len())));
        assert_eq!(
            frame_len(&[0x30, 0xff, 0xff, 0x7f], 1000),
            Err(PacketError::TooLarge(2_097_151))
        );
        assert_eq!(
            frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff], usize::MAX),
            Err(PacketError::BadLength)
        );
    }

    #[test]
    fn connect_fields_and_password_rewrite() {
        let frame = connect_frame(
            Some("uplink/v1/devices/robot-17/status"),
            Some(("robot-17", "v1.1.sig")),
        );
        let c = parse_connect(&frame).unwrap();
        assert_eq!(c.client_id, "robot-17");
        assert_eq!(c.username.as_deref(), Some("robot-17"));
        assert_eq!(c.password.as_deref(), Some("v1.1.sig"));
        assert_eq!(
            c.will_topic.as_deref(),
            Some("uplink/v1/devices/robot-17/status")
        );
        // A longer password crosses the one-byte remaining-length boundary.
        let long = "x".repeat(200);
        let rewritten = with_login(&frame, &c, "robot-17", &long).unwrap();
        assert_eq!(frame_len(&rewritten, 1000), Ok(Some(rewritten.len())));
        let back = parse_connect(&rewritten).unwrap();
        assert_eq!(back.password.as_deref(), Some(long.as_str()));
        assert_eq!(
            (&back.client_id, &back.username, &back.will_topic),
            (&c.client_id, &c.username, &c.will_topic)
        );
        // A CONNECT without a login (a client with a certificate) gets one, its will kept.
        for will in [None, Some("uplink/v1/devices/robot-17/status")] {
            let bare = connect_frame(will, None);
            let parsed = parse_connect(&bare).unwrap();
            assert_eq!((&parsed.username, &parsed.password), (&None, &None));
            let logged_in = with_login(&bare, &parsed, "robot-17", "secret").unwrap();
            assert_eq!(frame_len(&logged_in, 1000), Ok(Some(logged_in.len())));
            let back = parse_connect(&logged_in).unwrap();
            assert_eq!(back.username.as_deref(), Some("robot-17"));
            assert_eq!(back.password.as_deref(), Some("secret"));
            assert_eq!(back.will_topic.as_deref(), will);
            assert_eq!(back.client_id, "robot-17");
        }
        assert_eq!(with_login(&frame, &c, &long.repeat(400), "x"), None);
        assert_eq!(parse_connect(&[0x30, 0x00]), Err(PacketError::NotConnect));
        assert_eq!(
            parse_connect(&frame[..frame.len() - 3]),
            Err(PacketError::Truncated)
        );
    }

    fn publish(topic: &str) -> Vec<u8> {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, "x");
        p.pkid = 3;
        let mut buf = BytesMut::new();
        p.write(&mut buf).unwrap();
        buf.to_vec()
    }

    fn subscribe(filters: &[&str]) -> Vec<u8> {
        let mut s = Subscribe::new(filters[0], QoS::AtLeastOnce);
        for f in &filters[1..] {
            s.add((*f).to_string(), QoS::AtLeastOnce);
        }
        s.pkid = 7;
        let mut buf = BytesMut::new();
        s.write(&mut buf).unwrap();
        buf.to_vec()
    }

    #[test]
    fn a_device_stays_in_its_own_topics() {
        let me = "robot-17";
        for ch in ["req", "cmd/ack", "progress", "status"] {
            assert_eq!(
                check_packet(me, &publish(&format!("uplink/v1/devices/{me}/{ch}"))),
                Ok(())
            );
            assert!(
                check_packet(me, &publish(&format!("uplink/v1/devices/robot-18/{ch}"))).is_err()
            );
        }
        for topic in [
            "uplink/v1/devices/robot-17/cmd",
            "uplink/v1/devices/robot-17/res",
            "other",
            "uplink/v1/devices/robot-17/x",
        ] {
            assert!(check_packet(me, &publish(topic)).is_err(), "{topic}");
        }
        assert_eq!(
            check_packet(
                me,
                &subscribe(&[
                    "uplink/v1/devices/robot-17/cmd",
                    "uplink/v1/devices/robot-17/#"
                ])
            ),
            Ok(())
        );
        for filter in [
            "#",
            "+/#",
            "uplink/#",
            "uplink/v1/devices/+/res",
            "uplink/v1/devices/robot-17",
            "uplink/v1/devices/robot-17/",
            "uplink/v1/devices/robot-178/res",
            "$share/g/uplink/v1/devices/robot-17/res",
            "uplink/v1/devices/robot-18/cmd",
        ] {
            let frame = subscribe(&["uplink/v1/devices/robot-17/res", filter]);
            assert!(check_packet(me, &frame).is_err(), "{filter}");
        }
        assert!(check_packet(me, &connect_frame(None, None)).is_err());
        assert_eq!(check_packet(me, &[0xc0, 0x00]), Ok(())); // PINGREQ
        assert_eq!(check_packet(me, &[0xe0, 0x00]), Ok(())); // DISCONNECT
        assert!(check_packet(me, &[0x20, 0x02, 0, 0]).is_err()); // CONNACK from a client
    }
}
