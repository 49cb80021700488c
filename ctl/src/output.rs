//! Human tables and `--json` output.

use serde_json::Value;

use crate::units::human_bytes;

/// A column: its header and how to get its cell from a row.
pub struct Col {
    pub header: &'static str,
    pub cell: fn(&Value) -> String,
}

pub const fn col(header: &'static str, cell: fn(&Value) -> String) -> Col {
    Col { header, cell }
}

/// A field as text: strings bare, `null` as `-`, anything else as compact JSON.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        other => other.to_string(),
    }
}

/// A byte count field as `1.5 MiB` (`-` when absent).
pub fn bytes(v: &Value) -> String {
    v.as_u64().map_or_else(|| text(v), human_bytes)
}

/// An RFC 3339 time as `2026-12-06 06:18:59` (UTC, seconds).
pub fn time(v: &Value) -> String {
    match v.as_str() {
        Some(s) if s.len() >= 19 => format!("{} {}", &s[..10], &s[11..19]),
        _ => text(v),
    }
}

/// Prints `rows` as a table with a header, columns two spaces apart; the last column is
/// not padded.
pub fn table(rows: &[Value], cols: &[Col]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| (c.cell)(r).replace(['\n', '\t'], " "))
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = cols.iter().map(|c| c.header.len()).collect();
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        println!("{}", out.trim_end());
    };
    line(cols.iter().map(|c| c.header).collect());
    for row in &cells {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints an object as `key: value` lines, in the API's field order.
pub fn fields(v: &Value) {
    match v.as_object() {
        Some(map) => {
            let width = map.keys().map(|k| k.len()).max().unwrap_or(0);
            for (k, val) in map {
                let shown = match (k.as_str(), val) {
                    (k, Value::Number(_))
                        if k.ends_with("bytes") || k == "size" || k == "bytes_done" =>
                    {
                        format!("{} ({})", text(val), bytes(val))
                    }
                    _ => text(val),
                };
                println!("{k:width$}  {shown}");
            }
        }
        None => println!("{}", text(v)),
    }
}

/// One JSON document on one line.
pub fn json_line(v: &Value) {
    println!(
        "{}",
        serde_json::to_string(v).unwrap_or_else(|_| "null".into())
    );
}

/// Prints one object: `--json` as it came, else `key  value` lines.
pub fn show(v: &Value, json: bool) {
    if json {
        json_line(v);
    } else {
        fields(v);
    }
}

/// Prints a list: `--json` as it came (one array), else a table.
pub fn list(v: &Value, json: bool, cols: &[Col]) {
    if json {
        json_line(v);
    } else {
        table(v.as_array().map(Vec::as_slice).unwrap_or(&[]), cols);
    }
}

/// A `key: value` confirmation, or the object with `--json`.
pub fn said(v: &Value, json: bool, line: String) {
    if json {
        json_line(v);
    } else {
        println!("{line}");
    }
}
