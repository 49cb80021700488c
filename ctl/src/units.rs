//! Sizes and rates as people write them (`256KiB/s`, `1.5GB`) and as tables show them.

/// Parses `262144`, `256KiB`, `256 KiB/s`, `2MB`, `1.5GiB`, `64k` into bytes. Binary units:
/// `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` (×1024); decimal: `KB`, `MB`, `GB`, `TB`
/// (×1000); `B` or nothing: bytes. A trailing `/s` is allowed (rates). Case-insensitive.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let s = s
        .strip_suffix("/s")
        .or_else(|| s.strip_suffix("/S"))
        .unwrap_or(s)
        .trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let bad = || {
        format!(
            "{text:?} is not a size: write e.g. 262144, 256KiB, 2MB or 1.5GiB (a rate may end in /s)"
        )
    };
    if number.is_empty() {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// `1.5 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `1h02m03s`, `4m05s`, `7s`.
pub fn human_secs(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates() {
        assert_eq!(parse_bytes("262144"), Ok(262144));
        assert_eq!(parse_bytes("256KiB/s"), Ok(262144));
        assert_eq!(parse_bytes("256 kib/s"), Ok(262144));
        assert_eq!(parse_bytes("256k"), Ok(262144));
        assert_eq!(parse_bytes("2MB"), Ok(2_000_000));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("1TB"), Ok(1_000_000_000_000));
        assert_eq!(parse_bytes("0"), Ok(0));
        for bad in ["", "KiB", "1.2.3", "12 parsecs", "-1", "0.5B", "1e9"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
        assert_eq!(human_secs(7), "7s");
        assert_eq!(human_secs(245), "4m05s");
        assert_eq!(human_secs(3723), "1h02m03s");
    }
}
