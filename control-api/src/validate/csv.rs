//! The CSV validator: a header record and the same field count in every record, quotes
//! closed, UTF-8; csv-core fed a read at a time, in bounded memory whatever the file.

use std::io;

use tokio::io::AsyncRead;

use super::{read_some, Rejection, Report, Verdict, READ_CHUNK};

/// CSV field bytes are decoded into this buffer and thrown away, a buffer-full at a time.
const CSV_FIELD_BUFFER: usize = 8 << 10;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

pub(super) async fn csv<R: AsyncRead + Unpin>(mut r: R) -> io::Result<Verdict> {
    let mut buf = vec![0u8; READ_CHUNK];
    // Read at least 3 bytes first, so that a byte order mark is seen whole however the
    // reader splits the stream.
    let mut filled = 0;
    let mut eof = false;
    while filled < UTF8_BOM.len() {
        let n = read_some(&mut r, &mut buf[filled..]).await?;
        if n == 0 {
            eof = true;
            break;
        }
        filled += n;
    }
    let mut bytes = filled as u64;
    let mut check = CsvCheck::new();
    let start = if buf[..filled].starts_with(UTF8_BOM) {
        UTF8_BOM.len()
    } else {
        0
    };
    if let Err(rejection) = check.push(&buf[start..filled]) {
        return Ok(Err(rejection));
    }
    while !eof {
        let n = read_some(&mut r, &mut buf).await?;
        if n == 0 {
            eof = true;
            continue;
        }
        bytes += n as u64;
        if let Err(rejection) = check.push(&buf[..n]) {
            return Ok(Err(rejection));
        }
    }
    Ok(check.finish().map(|records| Report { records, bytes }))
}

/// The CSV checker, fed the file (less any byte order mark) in pieces of any size. The
/// result does not depend on how the file is cut: UTF-8 is checked first, and csv-core is
/// fed only the bytes before an invalid sequence, so a record ending before it is judged
/// first, as when the file comes in one piece.
struct CsvCheck {
    rdr: csv_core::Reader,
    /// Field bytes land here and are dropped: only the counts matter.
    out: Vec<u8>,
    utf8: Utf8Stream,
    quotes: QuoteState,
    /// The header's field count, once read.
    header: Option<u64>,
    /// Fields so far in the current record.
    fields: u64,
    /// Data records completed.
    records: u64,
    /// No byte of the current record read yet (only blank lines between records).
    at_record_start: bool,
    /// The line where the current record starts.
    record_line: u64,
}

impl CsvCheck {
    fn new() -> Self {
        CsvCheck {
            rdr: csv_core::Reader::new(),
            out: vec![0u8; CSV_FIELD_BUFFER],
            utf8: Utf8Stream::default(),
            quotes: QuoteState::default(),
            header: None,
            fields: 0,
            records: 0,
            at_record_start: true,
            record_line: 1,
        }
    }

    fn push(&mut self, data: &[u8]) -> Result<(), Rejection> {
        let (valid, bad_utf8) = match self.utf8.push(data) {
            Ok(()) => (data, None),
            Err(Utf8Invalid { valid, offset }) => (&data[..valid], Some(offset)),
        };
        if !valid.is_empty() {
            // An empty input would tell csv-core the file has ended.
            self.feed(valid)?;
            self.quotes.push(valid);
        }
        match bad_utf8 {
            None => Ok(()),
            Some(offset) => Err(Rejection::new(format!(
                "line {}: invalid UTF-8 at byte offset {offset}",
                self.quotes.lines + 1
            ))),
        }
    }

    /// The number of data records, or why the file is rejected.
    fn finish(mut self) -> Result<u64, Rejection> {
        if let Some(offset) = self.utf8.unfinished() {
            return Err(Rejection::new(format!(
                "line {}: invalid UTF-8 at byte offset {offset} (the file ends inside a character)",
                self.quotes.lines + 1
            )));
        }
        if self.quotes.state == At::Quoted {
            return Err(Rejection::new(format!(
                "line {}: quoted field not closed at the end of the file (truncated?)",
                self.quotes.open_line
            )));
        }
        self.feed(&[])?;
        match self.header {
            None => Err(Rejection::new(
                "empty file: a CSV file needs at least a header record",
            )),
            Some(_) => Ok(self.records),
        }
    }

    /// Feeds csv-core; an empty `data` is the end of the file.
    fn feed(&mut self, mut data: &[u8]) -> Result<(), Rejection> {
        let eof = data.is_empty();
        loop {
            let line_before = self.rdr.line();
            let (result, nin, _) = self.rdr.read_field(data, &mut self.out);
            let consumed = &data[..nin];
            if self.at_record_start {
                // csv-core skips blank lines before a record: the record starts at its
                // first byte that is not a line end.
                if let Some(i) = consumed.iter().position(|&b| b != b'\r' && b != b'\n') {
                    self.record_line = line_before + count_newlines(&consumed[..i]);
                    self.at_record_start = false;
                }
            }
            data = &data[nin..];
            match result {
                csv_core::ReadFieldResult::InputEmpty | csv_core::ReadFieldResult::End => {
                    return Ok(())
                }
                csv_core::ReadFieldResult::OutputFull => {}
                csv_core::ReadFieldResult::Field { record_end } => {
                    self.fields += 1;
                    if record_end {
                        self.end_record()?;
                    }
                }
            }
            if data.is_empty() && !eof {
                // Calling again with nothing would tell csv-core the file has ended.
                return Ok(());
            }
        }
    }

    fn end_record(&mut self) -> Result<(), Rejection> {
        let found = std::mem::take(&mut self.fields);
        self.at_record_start = true;
        let Some(expected) = self.header else {
            self.header = Some(found);
            return Ok(());
        };
        self.records += 1;
        if found == expected {
            return Ok(());
        }
        Err(Rejection::new(format!(
            "line {} (record {}): {} where the header has {}",
            self.record_line,
            self.records,
            fields(found),
            fields(expected),
        )))
    }
}

fn fields(n: u64) -> String {
    if n == 1 {
        "1 field".to_owned()
    } else {
        format!("{n} fields")
    }
}

fn count_newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
/// Where [`QuoteState`] is in the CSV syntax.
enum At {
    /// At the start of a field (or of a record).
    #[default]
    FieldStart,
    /// In a field that did not start with a quote (quotes in it are plain bytes).
    Unquoted,
    /// In a quoted field.
    Quoted,
    /// A quote in a quoted field: a closing quote, or the first of `""`.
    QuoteInQuoted,
}

/// Tracks whether the file ends inside a quoted field, which csv-core accepts silently.
/// Follows csv-core's own state machine for the default dialect (`,` `"` doubled quotes).
#[derive(Debug, Default)]
struct QuoteState {
    state: At,
    /// Newlines seen.
    lines: u64,
    /// The line where the last quoted field opened.
    open_line: u64,
}

impl QuoteState {
    fn push(&mut self, data: &[u8]) {
        for &b in data {
            self.state = match (self.state, b) {
                (At::Quoted, b'"') => At::QuoteInQuoted,
                (At::Quoted, _) => At::Quoted,
                (At::QuoteInQuoted, b'"') => At::Quoted,
                (At::FieldStart, b'"') => {
                    self.open_line = self.lines + 1;
                    At::Quoted
                }
                (_, b',' | b'\r' | b'\n') => At::FieldStart,
                _ => At::Unquoted,
            };
            if b == b'\n' {
                self.lines += 1;
            }
        }
    }
}

/// Where a stream stops being UTF-8.
#[derive(Debug, PartialEq, Eq)]
struct Utf8Invalid {
    /// The pushed bytes before this index may be used.
    valid: usize,
    /// File offset of the first byte of the invalid sequence.
    offset: u64,
}

/// UTF-8 validation of a stream cut anywhere, even inside a character.
#[derive(Debug, Default)]
struct Utf8Stream {
    /// The start of a character cut by the end of the last push.
    carry: [u8; 4],
    carried: usize,
    /// Bytes pushed so far.
    offset: u64,
}

impl Utf8Stream {
    fn push(&mut self, data: &[u8]) -> Result<(), Utf8Invalid> {
        let base = self.offset;
        self.offset += data.len() as u64;
        let mut rest = data;
        if self.carried > 0 {
            let carry_offset = base - self.carried as u64;
            let need = utf8_width(self.carry[0]);
            let take = need.saturating_sub(self.carried).min(data.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&data[..take]);
            self.carried += take;
            match std::str::from_utf8(&self.carry[..self.carried]) {
                Ok(_) => self.carried = 0,
                // A valid start, still cut: `data` was too short to finish it.
                Err(e) if e.error_len().is_none() && take == data.len() => return Ok(()),
                Err(_) => {
                    return Err(Utf8Invalid {
                        valid: 0,
                        offset: carry_offset,
                    })
                }
            }
            rest = &data[take..];
        }
        let skipped = data.len() - rest.len();
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            Err(e) => {
                let valid = skipped + e.valid_up_to();
                if e.error_len().is_none() {
                    let tail = &data[valid..];
                    self.carry[..tail.len()].copy_from_slice(tail);
                    self.carried = tail.len();
                    Ok(())
                } else {
                    Err(Utf8Invalid {
                        valid,
                        offset: base + valid as u64,
                    })
                }
            }
        }
    }

    /// At the end of the stream: the offset of a character left unfinished, if any.
    fn unfinished(&self) -> Option<u64> {
        (self.carried > 0).then(|| self.offset - self.carried as u64)
    }
}

/// The length of the UTF-8 sequence a (valid) lead byte starts.
fn utf8_width(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::tests::{accepted, rejected};
    use super::super::Validator;

    #[tokio::test]
    async fn csv_good() {
        let v = Validator::Csv;
        assert_eq!(accepted(v, b"a,b,c\n1,2,3\n4,5,6\n").await, 2);
        // No final newline, CRLF, blank lines, empty fields.
        assert_eq!(accepted(v, b"a,b\r\n1,2\r\n\r\n\n,\r\n3,4").await, 3);
        assert_eq!(
            accepted(v, b"\xEF\xBB\xBFid,name\n1,caf\xC3\xA9\n").await,
            1
        );
        assert_eq!(accepted(v, b"only,a,header\n").await, 0);
        assert_eq!(accepted(v, b"single\nvalue\n\"quoted\"\n").await, 2);
    }

    #[tokio::test]
    async fn csv_quoted_fields() {
        let v = Validator::Csv;
        let file = b"id,text,n\n\
            1,\"with, comma\",2\n\
            2,\"with\nnewline, and \"\"quotes\"\"\",3\n\
            3,\"\",4\n\
            4,\"a\r\n\r\nb\",5\n";
        assert_eq!(accepted(v, file).await, 4);
        // A quoted field bigger than the read and field buffers.
        let big = format!("h1,h2\n\"{}\",x\n", "ab,\n\"\"".repeat(READ_CHUNK / 2));
        assert_eq!(accepted(v, big.as_bytes()).await, 1);
    }

    #[tokio::test]
    async fn csv_short_and_long_rows() {
        let v = Validator::Csv;
        assert_eq!(
            rejected(v, b"a,b,c\n1,2,3\n4,5\n6,7,8\n").await,
            "line 3 (record 2): 2 fields where the header has 3 fields"
        );
        assert_eq!(
            rejected(v, b"a,b\n1,2,3\n").await,
            "line 2 (record 1): 3 fields where the header has 2 fields"
        );
        // The last record, without its newline.
        assert_eq!(
            rejected(v, b"a,b\n1,2\n3").await,
            "line 3 (record 2): 1 field where the header has 2 fields"
        );
        // Lines inside quoted fields and blank lines are counted: the record starts on
        // line 6.
        assert_eq!(
            rejected(v, b"a,b\n\"x\ny\",1\n\n\r\n4,5,6\n").await,
            "line 6 (record 2): 3 fields where the header has 2 fields"
        );
    }

    #[tokio::test]
    async fn csv_invalid() {
        let v = Validator::Csv;
        assert_eq!(
            rejected(v, b"a,b\n1,2\n3,\xC3(\n").await,
            "line 3: invalid UTF-8 at byte offset 10"
        );
        // A record ending before the bad byte is judged first, however the file is cut.
        assert_eq!(
            rejected(v, b"a,b\n1\n\xFF,2\n").await,
            "line 2 (record 1): 1 field where the header has 2 fields"
        );
        assert_eq!(
            rejected(v, b"a,b\n1,\xF0\x9F\x98").await,
            "line 2: invalid UTF-8 at byte offset 6 (the file ends inside a character)"
        );
        assert_eq!(
            rejected(v, b"a,b\n1,\"unclosed\n2,3\n").await,
            "line 2: quoted field not closed at the end of the file (truncated?)"
        );
        assert_eq!(
            rejected(v, b"").await,
            "empty file: a CSV file needs at least a header record"
        );
        assert_eq!(
            rejected(v, b"\n\r\n").await,
            "empty file: a CSV file needs at least a header record"
        );
    }

    #[test]
    fn utf8_stream_matches_std() {
        let samples: [&[u8]; 6] = [
            "a\u{e9}\u{20ac}\u{1F600}z".as_bytes(),
            b"ab\xE2\x82",                    // cut at the end
            b"\xE2\x28\xA1",                  // bad continuation
            b"x\xF0\x9F\x98\x80\xF0\x9F\x98", // good then cut
            b"\xF4\x90\x80\x80",              // above U+10FFFF
            b"\xED\xA0\x80",                  // surrogate
        ];
        for sample in samples {
            let expected = match std::str::from_utf8(sample) {
                Ok(_) => None,
                Err(e) => Some(e.valid_up_to() as u64),
            };
            for chunk in 1..=4 {
                let mut stream = Utf8Stream::default();
                let mut found = None;
                for piece in sample.chunks(chunk) {
                    if let Err(e) = stream.push(piece) {
                        found = Some(e.offset);
                        break;
                    }
                }
                let found = found.or_else(|| stream.unfinished());
                assert_eq!(found, expected, "{sample:?} in pieces of {chunk}");
            }
        }
    }
}
