//! Flow control on the wire: upload windows (`"22:00-06:00"`), job priorities and the body of
//! the signed `config` command, with the validation both the control API and the agent run.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Lowest job priority.
pub const PRIORITY_MIN: u8 = 0;
/// Highest job priority.
pub const PRIORITY_MAX: u8 = 9;
/// Priority of a job whose upload command names none.
pub const DEFAULT_PRIORITY: u8 = 5;
/// The smallest bandwidth cap (bytes/s) other than 0 (= unlimited): below it a single
/// 64 KiB chunk would take longer than the agent's idle timeout on a PUT.
pub const MIN_BANDWIDTH_BPS: u64 = 4096;
/// Highest `concurrency` and `per_job_concurrency`.
pub const MAX_CONCURRENCY: u32 = 64;
/// At most this many upload windows.
pub const MAX_WINDOWS: usize = 48;

const DAY_MINUTES: u16 = 24 * 60;

/// A daily time range in the gateway's local time, `HH:MM-HH:MM`, start inclusive, end
/// exclusive. A window whose end is before its start crosses midnight (`22:00-06:00`);
/// an end of `00:00` or `24:00` is midnight; `00:00-24:00` is the whole day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// Minutes after midnight, 0..1440.
    start: u16,
    /// Minutes after midnight, 1..=1440.
    end: u16,
}

impl Window {
    /// A window from `start` to `end` minutes after midnight (`end` up to 1440).
    pub fn new(start: u16, end: u16) -> Result<Window, String> {
        if start >= DAY_MINUTES {
            return Err(format!("start minute {start} is not before 24:00"));
        }
        if end == 0 || end > DAY_MINUTES {
            return Err(format!("end minute {end} is outside 00:01..=24:00"));
        }
        if start == end {
            return Err("start and end are equal (use 00:00-24:00 for the whole day)".into());
        }
        Ok(Window { start, end })
    }

    /// Whether `minute` (minutes after local midnight, 0..1440) is inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// Whether uploads may start at `minute` after local midnight: no windows means always.
pub fn in_windows(windows: &[Window], minute: u16) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.contains(minute))
}

fn parse_clock(s: &str, allow_24: bool) -> Result<u16, String> {
    let bytes = s.as_bytes();
    if bytes.len() != 5 || bytes[2] != b':' || !s.is_char_boundary(2) {
        return Err(format!("{s:?} is not HH:MM"));
    }
    let (h, m) = (&s[..2], &s[3..]);
    if !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not HH:MM"));
    }
    let (h, m): (u16, u16) = (
        h.parse().map_err(|_| format!("{s:?} is not HH:MM"))?,
        m.parse().map_err(|_| format!("{s:?} is not HH:MM"))?,
    );
    if h == 24 && m == 0 && allow_24 {
        return Ok(DAY_MINUTES);
    }
    if h > 23 || m > 59 {
        return Err(format!("{s:?} is not a time of day (00:00-23:59)"));
    }
    Ok(h * 60 + m)
}

impl FromStr for Window {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| format!("upload window {s:?}: {why}");
        let (start, end) = s
            .split_once('-')
            .ok_or_else(|| err("expected HH:MM-HH:MM, e.g. 22:00-06:00".into()))?;
        let start = parse_clock(start, false).map_err(err)?;
        let end = match parse_clock(end, true).map_err(err)? {
            // `22:00-00:00` ends at midnight; `00:00-00:00` stays refused as ambiguous.
            0 if start != 0 => DAY_MINUTES,
            end => end,
        };
        Window::new(start, end).map_err(err)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

/// Parses a list of windows; every bad entry is named.
pub fn parse_windows(list: &[String]) -> Result<Vec<Window>, String> {
    if list.len() > MAX_WINDOWS {
        return Err(format!(
            "{} upload windows; at most {MAX_WINDOWS}",
            list.len()
        ));
    }
    let mut windows = Vec::with_capacity(list.len());
    let mut errors = Vec::new();
    for s in list {
        match s.parse::<Window>() {
            Ok(w) => windows.push(w),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(windows)
    } else {
        Err(errors.join("; "))
    }
}

/// Checks a job priority.
pub fn check_priority(p: u8) -> Result<u8, String> {
    if (PRIORITY_MIN..=PRIORITY_MAX).contains(&p) {
        Ok(p)
    } else {
        Err(format!(
            "priority {p} is outside {PRIORITY_MIN}..={PRIORITY_MAX} (higher goes first)"
        ))
    }
}

/// Checks a bandwidth cap: 0 (unlimited) or at least [`MIN_BANDWIDTH_BPS`].
pub fn check_bandwidth(bps: u64) -> Result<u64, String> {
    if bps == 0 || bps >= MIN_BANDWIDTH_BPS {
        Ok(bps)
    } else {
        Err(format!(
            "{bps} bytes/s is below the minimum of {MIN_BANDWIDTH_BPS} (use 0 for unlimited)"
        ))
    }
}

/// Checks a concurrency (global or per job).
pub fn check_concurrency(n: u32) -> Result<u32, String> {
    if (1..=MAX_CONCURRENCY).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is outside 1..={MAX_CONCURRENCY}"))
    }
}

/// Body of the `config` command: flow settings that override the agent's configuration file
/// at run time. Absent fields keep their current value; `reset` first drops every earlier
/// override (back to the file), then applies the fields given. The agent keeps the
/// overrides in its database, so they outlive restarts.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// Upload rate cap over all parts of all jobs, bytes/s; 0 = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_upload_bytes_per_sec: Option<u64>,
    /// `HH:MM-HH:MM` in the gateway's local time; `[]` = always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_windows: Option<Vec<String>>,
    /// Parts in flight over all jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Parts in flight of any one job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_job_concurrency: Option<u32>,
    /// Drop earlier overrides first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
}

impl FlowConfig {
    /// Whether the command changes nothing at all.
    pub fn is_empty(&self) -> bool {
        !self.reset
            && self.max_upload_bytes_per_sec.is_none()
            && self.upload_windows.is_none()
            && self.concurrency.is_none()
            && self.per_job_concurrency.is_none()
    }

    /// Every problem at once, `field: reason; …`.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.is_empty() {
            problems.push("the config command sets nothing (give a field or reset)".to_string());
        }
        if let Some(bps) = self.max_upload_bytes_per_sec {
            if let Err(e) = check_bandwidth(bps) {
                problems.push(format!("max_upload_bytes_per_sec: {e}"));
            }
        }
        if let Some(list) = &self.upload_windows {
            if let Err(e) = parse_windows(list) {
                problems.push(format!("upload_windows: {e}"));
            }
        }
        if let Some(n) = self.concurrency {
            if let Err(e) = check_concurrency(n) {
                problems.push(format!("concurrency: {e}"));
            }
        }
        if let Some(n) = self.per_job_concurrency {
            if let Err(e) = check_concurrency(n) {
                problems.push(format!("per_job_concurrency: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// The overrides after applying `change` on top of `self` (both valid).
    pub fn merged(&self, change: &FlowConfig) -> FlowConfig {
        let base = if change.reset {
            FlowConfig::default()
        } else {
            self.clone()
        };
        FlowConfig {
            max_upload_bytes_per_sec: change
                .max_upload_bytes_per_sec
                .or(base.max_upload_bytes_per_sec),
            upload_windows: change.upload_windows.clone().or(base.upload_windows),
            concurrency: change.concurrency.or(base.concurrency),
            per_job_concurrency: change.per_job_concurrency.or(base.per_job_concurrency),
            reset: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(s: &str) -> Window {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_windows() {
        assert_eq!(w("22:00-06:00"), Window::new(1320, 360).unwrap());
        assert_eq!(w("00:00-24:00").to_string(), "00:00-24:00");
        assert_eq!(w("09:05-17:30").to_string(), "09:05-17:30");
        assert_eq!(w("22:00-00:00"), w("22:00-24:00"));
        assert!(w("22:00-00:00").contains(23 * 60 + 59) && !w("22:00-00:00").contains(0));
        for bad in [
            "",
            "22:00",
            "22:00-",
            "-06:00",
            "2200-0600",
            "22:00-06:00-07:00",
            "24:00-06:00",
            "22:60-06:00",
            "25:00-06:00",
            "10:00-10:00",
            "9:00-10:00",
            "09:00-10:0",
            "+9:00-10:00",
            "09:00 - 10:00",
            "aa:bb-cc:dd",
            "09:00-24:01",
            "00:00-00:00",
            "１2:00-13:00",
        ] {
            let err = bad.parse::<Window>().unwrap_err();
            assert!(err.contains("upload window"), "{bad}: {err}");
        }
    }

    #[test]
    fn windows_cross_midnight() {
        let night = w("22:00-06:00");
        assert!(night.contains(22 * 60));
        assert!(night.contains(23 * 60 + 59));
        assert!(night.contains(0));
        assert!(night.contains(5 * 60 + 59));
        assert!(!night.contains(6 * 60));
        assert!(!night.contains(12 * 60));
        assert!(!night.contains(21 * 60 + 59));
        let day = w("00:00-24:00");
        assert!((0..1440).all(|m| day.contains(m)));
        let lunch = w("12:00-13:00");
        assert!(lunch.contains(720) && !lunch.contains(780) && !lunch.contains(719));
        assert!(in_windows(&[], 5));
        assert!(in_windows(&[lunch, night], 23 * 60));
        assert!(!in_windows(&[lunch, night], 18 * 60));
    }

    proptest! {
        #[test]
        fn window_contains_exactly_its_minutes(start in 0u16..1440, len in 1u16..1440, m in 0u16..1440) {
            let end = (start + len - 1) % 1440 + 1;
            let win = Window::new(start, end).unwrap();
            // Inside iff the minute is fewer than `len` minutes after the start, mod a day.
            let after = (m + 1440 - start) % 1440;
            prop_assert_eq!(win.contains(m), after < len);
            // Printing and parsing give the same window back.
            prop_assert_eq!(win.to_string().parse::<Window>().unwrap(), win);
        }

        #[test]
        fn window_parser_never_panics(s in "\\PC{0,16}") {
            let _ = s.parse::<Window>();
        }
    }

    #[test]
    fn config_validation_names_each_bad_field() {
        assert!(FlowConfig::default()
            .validate()
            .unwrap_err()
            .contains("sets nothing"));
        let reset = FlowConfig {
            reset: true,
            ..FlowConfig::default()
        };
        assert_eq!(reset.validate(), Ok(()));
        let bad = FlowConfig {
            max_upload_bytes_per_sec: Some(100),
            upload_windows: Some(vec!["22:00-06:00".into(), "25:00-01:00".into()]),
            concurrency: Some(0),
            per_job_concurrency: Some(65),
            reset: false,
        };
        let err = bad.validate().unwrap_err();
        for field in [
            "max_upload_bytes_per_sec",
            "upload_windows: upload window \"25:00-01:00\"",
            "concurrency: 0",
            "per_job_concurrency: 65",
        ] {
            assert!(err.contains(field), "{field} in {err}");
        }
        let good = FlowConfig {
            max_upload_bytes_per_sec: Some(0),
            upload_windows: Some(vec![]),
            concurrency: Some(1),
            per_job_concurrency: Some(64),
            reset: false,
        };
        assert_eq!(good.validate(), Ok(()));
        assert!(check_priority(10).is_err() && check_priority(9).is_ok());
    }

    #[test]
    fn overrides_merge_and_reset() {
        let first = FlowConfig {
            max_upload_bytes_per_sec: Some(10_000),
            concurrency: Some(2),
            ..FlowConfig::default()
        };
        let stored = FlowConfig::default().merged(&first);
        let second = FlowConfig {
            upload_windows: Some(vec!["22:00-06:00".into()]),
            concurrency: Some(3),
            ..FlowConfig::default()
        };
        let stored = stored.merged(&second);
        assert_eq!(stored.max_upload_bytes_per_sec, Some(10_000));
        assert_eq!(stored.concurrency, Some(3));
        assert_eq!(stored.upload_windows, Some(vec!["22:00-06:00".into()]));
        let reset = FlowConfig {
            reset: true,
            per_job_concurrency: Some(1),
            ..FlowConfig::default()
        };
        assert_eq!(
            stored.merged(&reset),
            FlowConfig {
                per_job_concurrency: Some(1),
                ..FlowConfig::default()
            }
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<FlowConfig>(r#"{"bandwith":1}"#).is_err());
        let c: FlowConfig = serde_json::from_str(r#"{"concurrency":2}"#).unwrap();
        assert_eq!(c.concurrency, Some(2));
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"concurrency":2}"#);
    }
}
