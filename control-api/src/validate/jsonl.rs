//! The JSON Lines validator: every non-blank line one JSON value, checked a read at a time
//! with only the current line held.

use std::io;

use tokio::io::AsyncRead;

use super::{read_some, Rejection, Report, Verdict, READ_CHUNK};

pub(super) async fn jsonl<R: AsyncRead + Unpin>(mut r: R, max_line: usize) -> io::Result<Verdict> {
    let mut buf = vec![0u8; READ_CHUNK];
    // The current line when it spans reads; empty when lines are checked in place.
    let mut line: Vec<u8> = Vec::new();
    let mut lines: u64 = 0; // lines completed
    let mut records: u64 = 0;
    let mut bytes: u64 = 0; // read so far
    let mut line_start: u64 = 0; // offset of the current line's first byte
    loop {
        let n = read_some(&mut r, &mut buf).await?;
        if n == 0 {
            break;
        }
        let chunk_start = bytes;
        bytes += n as u64;
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let newline = rest.iter().position(|&b| b == b'\n');
            let part = &rest[..newline.unwrap_or(rest.len())];
            if line.len() + part.len() > max_line {
                return Ok(Err(Rejection::new(format!(
                    "line {}: longer than the limit of {max_line} bytes",
                    lines + 1
                ))));
            }
            let Some(i) = newline else {
                line.extend_from_slice(part);
                break;
            };
            lines += 1;
            let checked = if line.is_empty() {
                jsonl_line(lines, line_start, part)
            } else {
                line.extend_from_slice(part);
                let checked = jsonl_line(lines, line_start, &line);
                line.clear();
                checked
            };
            match checked {
                Ok(true) => records += 1,
                Ok(false) => {}
                Err(rejection) => return Ok(Err(rejection)),
            }
            let consumed = n - rest.len() + i + 1;
            line_start = chunk_start + consumed as u64;
            rest = &rest[i + 1..];
        }
    }
    if !line.is_empty() {
        match jsonl_line(lines + 1, line_start, &line) {
            Ok(true) => records += 1,
            Ok(false) => {}
            Err(rejection) => return Ok(Err(rejection)),
        }
    }
    Ok(Ok(Report { records, bytes }))
}

/// Checks one line (without its `\n`) starting at file offset `start`: `Ok(true)` for a
/// JSON value, `Ok(false)` for a blank line.
fn jsonl_line(number: u64, start: u64, line: &[u8]) -> Result<bool, Rejection> {
    let text = std::str::from_utf8(line).map_err(|e| {
        Rejection::new(format!(
            "line {number}: invalid UTF-8 at byte offset {}",
            start + e.valid_up_to() as u64
        ))
    })?;
    if text.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\r')) {
        return Ok(false);
    }
    if number == 1 && text.starts_with('\u{FEFF}') {
        return Err(Rejection::new(
            "line 1: starts with a UTF-8 byte order mark, which JSON does not allow",
        ));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| Rejection::new(format!("line {number}: {}", json_error(&e))))?;
    Ok(true)
}

/// serde_json's message with its position given as a column only: the text is one line.
fn json_error(e: &serde_json::Error) -> String {
    let full = e.to_string();
    if e.line() == 0 {
        return full;
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&suffix) {
        Some(message) => format!("{message} at column {}", e.column()),
        None => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::tests::{accepted, rejected, Trickle};
    use super::super::Validator;

    #[tokio::test]
    async fn jsonl_good() {
        let v = Validator::Jsonl;
        let file = "{\"a\":1,\"s\":\"caf\u{e9} \u{1F600}\"}\n[1,2]\n\n  \r\n\"text\"\r\n42\nnull\n{\"last\":true}";
        assert_eq!(accepted(v, file.as_bytes()).await, 6);
        assert_eq!(accepted(v, b"{}\n").await, 1);
        assert_eq!(accepted(v, b"").await, 0);
        assert_eq!(accepted(v, b"\n\n").await, 0);
    }

    #[tokio::test]
    async fn jsonl_bad_line_3() {
        let v = Validator::Jsonl;
        let file = b"{\"a\":1}\n{\"b\":2}\n,\n{\"c\":3}\n";
        assert_eq!(
            rejected(v, file).await,
            "line 3: expected value at column 1"
        );
        // Blank lines count as lines.
        assert_eq!(
            rejected(v, b"{}\n\n{\"a\":}\n").await,
            "line 3: expected value at column 6"
        );
        assert_eq!(
            rejected(v, b"{}\n{} {}\n").await,
            "line 2: trailing characters at column 4"
        );
        // A truncated last line.
        assert_eq!(
            rejected(v, b"{}\n{\"a\":[1,").await,
            "line 2: EOF while parsing a value at column 8"
        );
    }

    #[tokio::test]
    async fn jsonl_invalid_utf8() {
        let v = Validator::Jsonl;
        assert_eq!(
            rejected(v, b"{}\n\"ab\xFFc\"\n{}\n").await,
            "line 2: invalid UTF-8 at byte offset 6"
        );
        // Cut inside a character at the end of the file.
        assert_eq!(
            rejected(v, b"{}\n\"\xE2\x82").await,
            "line 2: invalid UTF-8 at byte offset 4"
        );
        assert_eq!(
            rejected(v, b"\xEF\xBB\xBF{}\n").await,
            "line 1: starts with a UTF-8 byte order mark, which JSON does not allow"
        );
    }

    #[tokio::test]
    async fn jsonl_line_limit() {
        let line = format!("\"{}\"", "x".repeat(98)); // 100 bytes
        let file = format!("{line}\n{line}\r\n");
        // The limit counts bytes before the `\n`, so `\r` too.
        let r = jsonl(file.as_bytes(), 101).await.expect("read");
        assert_eq!(r.map(|r| r.records), Ok(2));
        let r = jsonl(file.as_bytes(), 100).await.expect("read");
        assert_eq!(
            r.unwrap_err().reason,
            "line 2: longer than the limit of 100 bytes"
        );
        let r = jsonl(Trickle::new(file.as_bytes(), 3), 99)
            .await
            .expect("read");
        assert_eq!(
            r.unwrap_err().reason,
            "line 1: longer than the limit of 99 bytes"
        );
        // A line longer than one read, under the real limit.
        let long = format!("{{\"k\":\"{}\"}}\n{{}}\n", "y".repeat(3 * READ_CHUNK));
        assert_eq!(accepted(Validator::Jsonl, long.as_bytes()).await, 2);
    }
}
