//! MQTT topics. The bridge and the agent build every topic through this module.

/// Root of every device topic.
pub const ROOT: &str = "uplink/v1/devices";

/// Shared-subscription group used by bridge instances on an external broker.
pub const SHARE_GROUP: &str = "uplink-bridge";

/// The per-device channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// cloud → device, QoS 1: signed commands.
    Cmd,
    /// device → cloud, QoS 1: signed command acks.
    CmdAck,
    /// device → cloud, QoS 1: signed requests.
    Req,
    /// cloud → device, QoS 1: responses to requests.
    Res,
    /// device → cloud, QoS 0: signed progress reports.
    Progress,
    /// device → cloud, QoS 1 retained: online/offline (offline is the Last Will).
    Status,
}

impl Channel {
    pub const ALL: [Channel; 6] = [
        Channel::Cmd,
        Channel::CmdAck,
        Channel::Req,
        Channel::Res,
        Channel::Progress,
        Channel::Status,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Channel::Cmd => "cmd",
            Channel::CmdAck => "cmd/ack",
            Channel::Req => "req",
            Channel::Res => "res",
            Channel::Progress => "progress",
            Channel::Status => "status",
        }
    }
}

/// Topic of `channel` for `device_id`.
pub fn topic(device_id: &str, channel: Channel) -> String {
    format!("{ROOT}/{device_id}/{}", channel.suffix())
}

/// Filter matching `channel` of every device.
pub fn filter_all(channel: Channel) -> String {
    format!("{ROOT}/+/{}", channel.suffix())
}

/// Shared-subscription filter for `channel` of every device (load-balanced between bridges).
pub fn shared_filter_all(channel: Channel) -> String {
    format!("$share/{SHARE_GROUP}/{}", filter_all(channel))
}

/// Splits a topic into its device id and channel, or `None` when it is not a device topic.
pub fn parse(topic: &str) -> Option<(&str, Channel)> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let (device, suffix) = rest.split_once('/')?;
    if !valid_device_id(device) {
        return None;
    }
    let channel = Channel::ALL.into_iter().find(|c| c.suffix() == suffix)?;
    Some((device, channel))
}

/// Device ids are 1–64 of `[A-Za-z0-9._-]`, not starting with a dot: safe in topics,
/// object keys, file names and URLs.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        for c in Channel::ALL {
            let t = topic("robot-17", c);
            assert_eq!(parse(&t), Some(("robot-17", c)), "{t}");
        }
        assert_eq!(
            topic("robot-17", Channel::CmdAck),
            "uplink/v1/devices/robot-17/cmd/ack"
        );
        assert_eq!(filter_all(Channel::Req), "uplink/v1/devices/+/req");
        assert_eq!(
            shared_filter_all(Channel::Req),
            "$share/uplink-bridge/uplink/v1/devices/+/req"
        );
    }

    #[test]
    fn rejects_foreign_topics() {
        assert_eq!(parse("uplink/v1/devices/robot/unknown"), None);
        assert_eq!(parse("uplink/v2/devices/robot/req"), None);
        assert_eq!(parse("uplink/v1/devices/+/req"), None);
        assert_eq!(parse("uplink/v1/devices/a b/req"), None);
        assert_eq!(parse("uplink/v1/devices//req"), None);
    }

    #[test]
    fn device_ids() {
        assert!(valid_device_id("robot-17"));
        assert!(valid_device_id("gw_3.site-a"));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id(".hidden"));
        assert!(!valid_device_id("a/b"));
        assert!(!valid_device_id("a+b"));
        assert!(!valid_device_id(&"x".repeat(65)));
    }
}
