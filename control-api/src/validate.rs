//! Per-dataset validators: after a session completes, the API reads the completed object
//! back from storage and checks that it is a well-formed file of the dataset's kind. A bad
//! file is rejected with a [`Rejection`] naming what is wrong and where.
//!
//! Pure logic: no axum, sqlx or AWS types. The caller turns the S3 GetObject body into an
//! [`AsyncRead`] ([`validate_stream`]) or serves ranged GETs ([`validate_parquet`]).
//!
//! Each validator returns `io::Result<Verdict>`: the outer error means the object could
//! not be *read* (storage unreachable, connection reset; retry later, the file is not at
//! fault); the inner [`Verdict`] is the judgement on the file itself.
//!
//! | validator | reads | memory | checks |
//! | --- | --- | --- | --- |
//! | [`Validator::Jsonl`] | the whole object, streamed | 64 KiB + the longest line (at most [`MAX_JSONL_LINE_BYTES`]) | every non-blank line is one JSON value, UTF-8 |
//! | [`Validator::Csv`] | the whole object, streamed | 72 KiB, whatever the file | a header record, the same field count in every record, quotes closed, UTF-8 |
//! | [`Validator::Parquet`] | the first 4 bytes and the footer, by range | the footer metadata (at most [`MAX_PARQUET_METADATA_BYTES`]) | magic numbers, footer length, metadata decodes, column chunks and page indexes inside the file, row counts add up; pages are not decoded |

use std::fmt;
use std::future::Future;
use std::io;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The kind of file a dataset holds, and so how its uploads are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Validator {
    /// JSON Lines: one JSON value per line.
    Jsonl,
    /// Comma-separated values with a header record (RFC 4180 quoting).
    Csv,
    /// Apache Parquet.
    Parquet,
}

impl Validator {
    pub const ALL: [Validator; 3] = [Validator::Jsonl, Validator::Csv, Validator::Parquet];

    /// `"jsonl"`, `"csv"` or `"parquet"` (exactly, lowercase); anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "jsonl" => Some(Validator::Jsonl),
            "csv" => Some(Validator::Csv),
            "parquet" => Some(Validator::Parquet),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Validator::Jsonl => "jsonl",
            Validator::Csv => "csv",
            Validator::Parquet => "parquet",
        }
    }

    /// True when the validator needs ranged reads ([`validate_parquet`]) rather than a
    /// stream ([`validate_stream`]).
    pub fn needs_ranges(self) -> bool {
        matches!(self, Validator::Parquet)
    }
}

impl fmt::Display for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a validator found in an accepted file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Report {
    /// JSONL: non-blank lines. CSV: data records (the header not counted). Parquet: rows,
    /// as the footer counts them.
    pub records: u64,
    /// Bytes of the object: read from the stream, or the `size` given for Parquet.
    pub bytes: u64,
}

/// Why a file was rejected, for the session's `rejected` state and the operator, e.g.
/// `line 3: expected value at column 1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    pub reason: String,
}

impl Rejection {
    pub fn new(reason: impl Into<String>) -> Self {
        Rejection {
            reason: reason.into(),
        }
    }
}

/// The judgement on one file.
pub type Verdict = Result<Report, Rejection>;

/// A JSONL line longer than this (bytes, without its newline) is rejected.
pub const MAX_JSONL_LINE_BYTES: usize = 16 << 20;

/// Parquet footer metadata longer than this is rejected rather than read into memory.
pub const MAX_PARQUET_METADATA_BYTES: u64 = 64 << 20;

/// Bytes asked of the reader at a time.
const READ_CHUNK: usize = 64 << 10;

/// CSV field bytes are decoded into this buffer and thrown away, a buffer-full at a time.
const CSV_FIELD_BUFFER: usize = 8 << 10;

/// The last bytes of a Parquet file read in one go: the footer and, usually, all the
/// metadata, so that most files take two ranged reads.
const PARQUET_TAIL_PREFETCH: u64 = 64 << 10;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Checks a JSONL or CSV object read from `r`, in bounded memory whatever its size.
///
/// # JSONL
/// Every line that is not blank (empty or only spaces, tabs and `\r`) must hold exactly one
/// JSON value. Any value is accepted, not only objects: `[1,2]`, `"text"` and `42` are
/// lines as good as `{"a":1}`. Lines end with `\n` (or `\r\n`); the last line may lack its
/// newline. The file must be UTF-8 without a byte order mark; a line longer than
/// [`MAX_JSONL_LINE_BYTES`] (counting a `\r` before its `\n`) is rejected, and so is a value
/// nested deeper than serde_json's limit of 128. An empty file is accepted with 0 records.
/// The reason names the 1-based line (blank lines count): `line 3: expected value at
/// column 1`.
///
/// # CSV
/// Comma-separated, `"` quotes with `""` inside quoted fields, records ending with `\n`,
/// `\r\n` or `\r`; blank lines are skipped; a UTF-8 byte order mark at the start is
/// allowed. The first record is the header; every later record must have as many fields
/// as the header. A quoted field still open at the end of the file (a truncated file) is
/// rejected. The file must be UTF-8. An empty file (no header) is rejected; a header
/// alone is accepted with 0 records. The reason names the line where the record starts,
/// the record's 1-based number (the header not counted) and both field counts.
///
/// # Parquet
/// Parquet needs random access: use [`validate_parquet`]. Given here, it fails with an
/// [`io::ErrorKind::InvalidInput`] error.
pub async fn validate_stream<R: AsyncRead + Unpin>(v: Validator, r: R) -> io::Result<Verdict> {
    match v {
        Validator::Jsonl => jsonl(r, MAX_JSONL_LINE_BYTES).await,
        Validator::Csv => csv(r).await,
        Validator::Parquet => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the parquet validator needs ranged reads: use validate_parquet",
        )),
    }
}

/// Reads into `buf`, retrying interruptions; 0 is the end of the stream.
async fn read_some<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf).await {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

// ---------------------------------------------------------------------------------------
// JSONL

async fn jsonl<R: AsyncRead + Unpin>(mut r: R, max_line: usize) -> io::Result<Verdict> {
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

// ---------------------------------------------------------------------------------------
// CSV

async fn csv<R: AsyncRead + Unpin>(mut r: R) -> io::Result<Verdict> {
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

// ---------------------------------------------------------------------------------------
// Parquet

/// Checks a Parquet object of `size` bytes through `read_range(offset, len)`, which must
/// return exactly the `len` bytes at `offset` (an S3 ranged GET of `bytes=offset-(offset+len-1)`).
///
/// Only the first 4 bytes and the footer are read, usually in two reads: the last 64 KiB,
/// then the metadata if it is longer. Checks: at least 12 bytes; `PAR1` at the start and
/// the end (an encrypted footer, `PARE`, is rejected as unsupported); a footer length that
/// fits in the file and is at most [`MAX_PARQUET_METADATA_BYTES`]; the FileMetaData
/// decodes; every row group has a chunk for each column of the schema; every column
/// chunk, and every page index and bloom filter the metadata points to, lies in this file
/// between the leading magic and the metadata (bytes lost from the middle of a file show
/// up here); row counts are not negative and the row groups' add up to the footer's.
/// [`Report::records`] is that row count. Column chunks in other files (`file_path`) are
/// rejected.
///
/// Page data is not decoded: a file whose footer is sound but whose pages are corrupt
/// (bad compression, wrong encodings) is accepted.
pub async fn validate_parquet<F, Fut>(size: u64, read_range: F) -> io::Result<Verdict>
where
    F: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = io::Result<Bytes>>,
{
    parquet(size, read_range, PARQUET_TAIL_PREFETCH).await
}

async fn read_exact_range<F, Fut>(read_range: &mut F, offset: u64, len: u64) -> io::Result<Bytes>
where
    F: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = io::Result<Bytes>>,
{
    let bytes = read_range(offset, len).await?;
    if bytes.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "a read of {len} bytes at offset {offset} returned {} bytes",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// `bytes` for a message: text when printable ASCII, else hex.
fn show(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| b.is_ascii_graphic()) {
        format!("{:?}", String::from_utf8_lossy(bytes))
    } else {
        format!("0x{}", hex::encode(bytes))
    }
}

const PARQUET_MAGIC: &[u8] = b"PAR1";
const PARQUET_MAGIC_ENCRYPTED: &[u8] = b"PARE";
/// Metadata length (4 bytes, little-endian) and the magic.
const PARQUET_FOOTER: u64 = 8;

async fn parquet<F, Fut>(size: u64, mut read_range: F, prefetch: u64) -> io::Result<Verdict>
where
    F: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = io::Result<Bytes>>,
{
    macro_rules! reject {
        ($($arg:tt)*) => { return Ok(Err(Rejection::new(format!($($arg)*)))) };
    }
    let magic = PARQUET_MAGIC.len() as u64;
    if size < magic + PARQUET_FOOTER {
        reject!("{size} bytes: too short for a Parquet file (at least 12)");
    }
    let head = read_exact_range(&mut read_range, 0, magic).await?;
    if &head[..] != PARQUET_MAGIC {
        reject!(
            "does not start with the Parquet magic \"PAR1\" (found {})",
            show(&head)
        );
    }
    let tail_len = size.min(prefetch.max(PARQUET_FOOTER));
    let tail = read_exact_range(&mut read_range, size - tail_len, tail_len).await?;
    let footer = &tail[tail.len() - PARQUET_FOOTER as usize..];
    match &footer[4..] {
        PARQUET_MAGIC => {}
        PARQUET_MAGIC_ENCRYPTED => {
            reject!("encrypted footer (magic \"PARE\"): encrypted Parquet files are not supported")
        }
        other => reject!(
            "does not end with the Parquet magic \"PAR1\" (found {}): truncated or not Parquet",
            show(other)
        ),
    }
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&footer[..4]);
    let meta_len = u64::from(u32::from_le_bytes(len_bytes));
    let room = size - magic - PARQUET_FOOTER;
    if meta_len == 0 || meta_len > room {
        reject!(
            "the footer gives a metadata length of {meta_len} bytes, but {room} bytes lie between the magic numbers"
        );
    }
    if meta_len > MAX_PARQUET_METADATA_BYTES {
        reject!(
            "the footer gives a metadata length of {meta_len} bytes, over the limit of {MAX_PARQUET_METADATA_BYTES}"
        );
    }
    let meta_start = size - PARQUET_FOOTER - meta_len;
    let meta = if meta_len + PARQUET_FOOTER <= tail_len {
        let end = tail.len() - PARQUET_FOOTER as usize;
        tail.slice(end - meta_len as usize..end)
    } else {
        read_exact_range(&mut read_range, meta_start, meta_len).await?
    };
    // The decoder checks list lengths against the bytes left, but it is fed untrusted
    // input: a panic in it rejects the file rather than unwinding through the caller.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&meta)
    }));
    let metadata = match decoded {
        Ok(Ok(metadata)) => metadata,
        Ok(Err(e)) => reject!("the footer metadata does not decode: {e}"),
        Err(_) => reject!("the footer metadata does not decode (the decoder panicked)"),
    };
    Ok(
        parquet_layout(&metadata, size, magic, meta_start).map(|records| Report {
            records,
            bytes: size,
        }),
    )
}

/// Checks the decoded metadata against the file: `data_start..data_end` is where column
/// chunks may lie. Returns the row count.
fn parquet_layout(
    metadata: &parquet::file::metadata::ParquetMetaData,
    size: u64,
    data_start: u64,
    data_end: u64,
) -> Result<u64, Rejection> {
    let columns = metadata.file_metadata().schema_descr().num_columns();
    let mut rows: u64 = 0;
    for (g, group) in metadata.row_groups().iter().enumerate() {
        let group_rows = u64::try_from(group.num_rows()).map_err(|_| {
            Rejection::new(format!(
                "row group {g}: negative row count {}",
                group.num_rows()
            ))
        })?;
        rows = rows
            .checked_add(group_rows)
            .ok_or_else(|| Rejection::new("the row groups' row counts overflow"))?;
        if group.num_columns() != columns {
            return Err(Rejection::new(format!(
                "row group {g}: {} column chunks where the schema has {columns} columns",
                group.num_columns()
            )));
        }
        for chunk in group.columns() {
            let at = || format!("row group {g}, column {}", chunk.column_path().string());
            if let Some(path) = chunk.file_path() {
                return Err(Rejection::new(format!(
                    "{}: data in another file ({path:?})",
                    at()
                )));
            }
            let data_page = chunk.data_page_offset();
            let len = chunk.compressed_size();
            // The chunk starts with its dictionary page when it has one. Some writers put
            // 0 there for "none": only an offset before the first data page counts.
            let start = match chunk.dictionary_page_offset() {
                Some(dictionary) if dictionary > 0 && dictionary < data_page => dictionary,
                _ => data_page,
            };
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(len).ok())
                .and_then(|(s, l)| s.checked_add(l).map(|e| (s, e)));
            match end {
                Some((s, e))
                    if s >= data_start && e <= data_end && (data_page as u64) < e => {}
                _ => {
                    return Err(Rejection::new(format!(
                        "{}: column chunk at offset {start}, {len} bytes (first data page at {data_page}) is not within bytes {data_start}..{data_end} of this {size}-byte file",
                        at()
                    )))
                }
            }
        }
    }
    // Then the page indexes and bloom filters, which writers put after the column chunks.
    for (g, group) in metadata.row_groups().iter().enumerate() {
        for chunk in group.columns() {
            let at = || format!("row group {g}, column {}", chunk.column_path().string());
            let structures = [
                (
                    "column index",
                    chunk.column_index_offset(),
                    chunk.column_index_length(),
                ),
                (
                    "offset index",
                    chunk.offset_index_offset(),
                    chunk.offset_index_length(),
                ),
                (
                    "bloom filter",
                    chunk.bloom_filter_offset(),
                    chunk.bloom_filter_length(),
                ),
            ];
            for (what, offset, len) in structures {
                let Some(offset) = offset else { continue };
                // A bloom filter's length is optional: then at least its first byte.
                let len = len.map_or(1, i64::from);
                let inside = u64::try_from(offset)
                    .ok()
                    .zip(u64::try_from(len).ok())
                    .and_then(|(o, l)| Some((o, o.checked_add(l.max(1))?)))
                    .is_some_and(|(o, e)| o >= data_start && e <= data_end);
                if !inside {
                    return Err(Rejection::new(format!(
                        "{}: {what} at offset {offset}, {len} bytes, is not within bytes {data_start}..{data_end} of this {size}-byte file",
                        at()
                    )));
                }
            }
        }
    }
    let footer_rows = metadata.file_metadata().num_rows();
    if u64::try_from(footer_rows).ok() != Some(rows) {
        return Err(Rejection::new(format!(
            "the footer counts {footer_rows} rows but its row groups add up to {rows}"
        )));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    /// Delivers `chunk` bytes per read, returning `Pending` before each one.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
        ready: bool,
    }

    impl Trickle {
        fn new(data: &[u8], chunk: usize) -> Self {
            Trickle {
                data: data.to_vec(),
                pos: 0,
                chunk,
                ready: false,
            }
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if !self.ready {
                self.ready = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.ready = false;
            let n = self
                .chunk
                .min(buf.remaining())
                .min(self.data.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.data[start..start + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    /// The verdict on `data`, read whole and in pieces of several sizes; the pieces must
    /// not change it.
    async fn check(v: Validator, data: &[u8]) -> Verdict {
        let whole = validate_stream(v, data).await.expect("read");
        for chunk in [1, 2, 3, 5, 7, 4096] {
            let cut = validate_stream(v, Trickle::new(data, chunk))
                .await
                .expect("read");
            assert_eq!(cut, whole, "{v} in pieces of {chunk} bytes");
        }
        whole
    }

    async fn accepted(v: Validator, data: &[u8]) -> u64 {
        let report = check(v, data)
            .await
            .unwrap_or_else(|r| panic!("{v} rejected: {r}"));
        assert_eq!(report.bytes, data.len() as u64);
        report.records
    }

    async fn rejected(v: Validator, data: &[u8]) -> String {
        match check(v, data).await {
            Ok(report) => panic!("{v} accepted with {report:?}"),
            Err(rejection) => rejection.reason,
        }
    }

    #[test]
    fn names() {
        for v in Validator::ALL {
            assert_eq!(Validator::parse(v.as_str()), Some(v));
            assert_eq!(v.to_string(), v.as_str());
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(json, format!("\"{}\"", v.as_str()));
            assert_eq!(serde_json::from_str::<Validator>(&json).unwrap(), v);
        }
        assert_eq!(Validator::parse("csv"), Some(Validator::Csv));
        assert_eq!(Validator::parse("CSV"), None);
        assert_eq!(Validator::parse("json"), None);
        assert_eq!(Validator::parse(""), None);
        assert!(serde_json::from_str::<Validator>("\"Parquet\"").is_err());
        assert!(Validator::Parquet.needs_ranges());
        assert!(!Validator::Jsonl.needs_ranges() && !Validator::Csv.needs_ranges());
    }

    // JSONL ---------------------------------------------------------------------------

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

    // CSV -----------------------------------------------------------------------------

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

    #[tokio::test]
    async fn read_errors_are_not_rejections() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
            }
        }
        for (v, good_start) in [(Validator::Jsonl, &b"{}\n"[..]), (Validator::Csv, b"a,b\n")] {
            let e = validate_stream(v, good_start.chain(Broken))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        }
        let e = validate_stream(Validator::Parquet, &b"PAR1"[..])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
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

    // Parquet -------------------------------------------------------------------------

    /// A Parquet file with a row group per entry of `groups`: an INT64 `id` and an
    /// optional UTF8 `name`, set for even ids.
    fn parquet_file(groups: &[&[i64]]) -> Vec<u8> {
        use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;

        let schema = parquet::schema::parser::parse_message_type(
            "message m { REQUIRED INT64 id; OPTIONAL BYTE_ARRAY name (UTF8); }",
        )
        .unwrap();
        let props = WriterProperties::builder().build();
        let mut file = Vec::new();
        let mut writer =
            SerializedFileWriter::new(&mut file, Arc::new(schema), Arc::new(props)).unwrap();
        for ids in groups {
            let mut group = writer.next_row_group().unwrap();
            let mut column = group.next_column().unwrap().unwrap();
            column
                .typed::<Int64Type>()
                .write_batch(ids, None, None)
                .unwrap();
            column.close().unwrap();
            let mut column = group.next_column().unwrap().unwrap();
            let names: Vec<ByteArray> = ids
                .iter()
                .filter(|id| *id % 2 == 0)
                .map(|id| ByteArray::from(format!("name {id}").as_str()))
                .collect();
            let defined: Vec<i16> = ids.iter().map(|id| i16::from(id % 2 == 0)).collect();
            column
                .typed::<ByteArrayType>()
                .write_batch(&names, Some(&defined), None)
                .unwrap();
            column.close().unwrap();
            assert!(group.next_column().unwrap().is_none());
            group.close().unwrap();
        }
        writer.close().unwrap();
        file
    }

    /// Validates `file` through ranged reads with the given tail prefetch; returns the
    /// verdict and the ranges read.
    async fn check_parquet(file: &[u8], prefetch: u64) -> (Verdict, Vec<(u64, u64)>) {
        let object = Bytes::copy_from_slice(file);
        let reads = Mutex::new(Vec::new());
        let verdict = parquet(
            file.len() as u64,
            |offset, len| {
                reads.lock().unwrap().push((offset, len));
                let range = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(len).ok())
                    .and_then(|(o, l)| Some(o..o.checked_add(l)?))
                    .filter(|r| r.end <= object.len());
                let result = range
                    .map(|r| object.slice(r))
                    .ok_or_else(|| io::Error::other("range outside the object"));
                async move { result }
            },
            prefetch,
        )
        .await
        .expect("ranged reads");
        (verdict, reads.into_inner().unwrap())
    }

    async fn parquet_rejected(file: &[u8]) -> String {
        match check_parquet(file, PARQUET_TAIL_PREFETCH).await.0 {
            Ok(report) => panic!("accepted with {report:?}"),
            Err(rejection) => rejection.reason,
        }
    }

    #[tokio::test]
    async fn parquet_good() {
        let file = parquet_file(&[&[1, 2, 3], &[4, 5]]);
        let size = file.len() as u64;
        let (verdict, reads) = check_parquet(&file, PARQUET_TAIL_PREFETCH).await;
        assert_eq!(
            verdict,
            Ok(Report {
                records: 5,
                bytes: size
            })
        );
        // The head, then the whole (small) file as the tail.
        assert_eq!(reads, vec![(0, 4), (0, size)]);

        // With a tail too short for the metadata, it is read on its own, and data pages
        // are never read.
        let (verdict, reads) = check_parquet(&file, 16).await;
        assert_eq!(
            verdict,
            Ok(Report {
                records: 5,
                bytes: size
            })
        );
        assert_eq!(reads.len(), 3, "{reads:?}");
        assert_eq!(reads[1], (size - 16, 16));
        let meta_start = reads[2].0;
        assert_eq!(meta_start + reads[2].1, size - 8);
        assert!(meta_start > 4 + 100, "metadata read from {meta_start}");

        // Through the public function.
        let object = Bytes::from(file);
        let report = validate_parquet(size, |offset, len| {
            let part = object.slice(offset as usize..(offset + len) as usize);
            async move { Ok(part) }
        })
        .await
        .expect("read")
        .expect("accepted");
        assert_eq!(report.records, 5);

        // No row groups at all.
        let empty = parquet_file(&[]);
        let (verdict, _) = check_parquet(&empty, PARQUET_TAIL_PREFETCH).await;
        assert_eq!(verdict.map(|r| r.records), Ok(0));
    }

    #[tokio::test]
    async fn parquet_bad_magic_and_truncation() {
        let file = parquet_file(&[&[1, 2, 3], &[4, 5]]);
        let n = file.len();

        let mut wrong = file.clone();
        wrong[..4].copy_from_slice(b"PAR2");
        assert_eq!(
            parquet_rejected(&wrong).await,
            "does not start with the Parquet magic \"PAR1\" (found \"PAR2\")"
        );
        let mut wrong = file.clone();
        wrong[n - 4..].copy_from_slice(b"\0\0\0\0");
        assert_eq!(
            parquet_rejected(&wrong).await,
            "does not end with the Parquet magic \"PAR1\" (found 0x00000000): truncated or not Parquet"
        );
        let mut encrypted = file.clone();
        encrypted[n - 4..].copy_from_slice(b"PARE");
        assert!(parquet_rejected(&encrypted)
            .await
            .starts_with("encrypted footer"));

        // Truncated: cut at the end, in the middle.
        let reason = parquet_rejected(&file[..n - 1]).await;
        assert!(
            reason.starts_with("does not end with the Parquet magic"),
            "{reason}"
        );
        let reason = parquet_rejected(&file[..n / 2]).await;
        assert!(
            reason.starts_with("does not end with the Parquet magic"),
            "{reason}"
        );
        assert_eq!(
            parquet_rejected(b"PAR1PAR1").await,
            "8 bytes: too short for a Parquet file (at least 12)"
        );
        assert_eq!(
            parquet_rejected(b"").await,
            "0 bytes: too short for a Parquet file (at least 12)"
        );
        assert_eq!(
            parquet_rejected(b"PAR1\0\0\0\0PAR1").await,
            "the footer gives a metadata length of 0 bytes, but 0 bytes lie between the magic numbers"
        );
        let not_parquet = b"id,name\n1,a\n2,b\n";
        assert!(parquet_rejected(not_parquet)
            .await
            .starts_with("does not start with the Parquet magic"));
    }

    #[tokio::test]
    async fn parquet_bad_footer() {
        let file = parquet_file(&[&[1, 2, 3], &[4, 5]]);
        let n = file.len();
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&file[n - 8..n - 4]);
        let meta_len = u32::from_le_bytes(len_bytes) as usize;

        // A metadata length past the start of the file.
        let mut long = file.clone();
        long[n - 8..n - 4].copy_from_slice(&(n as u32 - 11).to_le_bytes());
        let reason = parquet_rejected(&long).await;
        assert!(
            reason.starts_with(&format!(
                "the footer gives a metadata length of {} bytes, but {} bytes",
                n - 11,
                n - 12
            )),
            "{reason}"
        );

        // Metadata overwritten with garbage.
        let mut garbage = file.clone();
        let meta_start = n - 8 - meta_len;
        for b in &mut garbage[meta_start..n - 8] {
            *b = 0xFF;
        }
        let reason = parquet_rejected(&garbage).await;
        assert!(
            reason.starts_with("the footer metadata does not decode"),
            "{reason}"
        );

        // Bytes lost from the data pages: the footer is intact but what it describes now
        // runs into the metadata. One byte lost: the page indexes, written last.
        let mut shortened = file[..4].to_vec();
        shortened.extend_from_slice(&file[5..]);
        let reason = parquet_rejected(&shortened).await;
        assert!(reason.starts_with("row group 1, column name: "), "{reason}");
        assert!(reason.contains(" index at offset "), "{reason}");
        // More than the page indexes: the last column chunk itself.
        let metadata = parquet::file::metadata::ParquetMetaDataReader::decode_metadata(
            &file[meta_start..n - 8],
        )
        .unwrap();
        let last_end = metadata
            .row_groups()
            .iter()
            .flat_map(|group| group.columns())
            .map(|chunk| {
                let (start, len) = chunk.byte_range();
                start + len
            })
            .max()
            .unwrap() as usize;
        let lost = meta_start - last_end + 1;
        let mut shortened = file[..4].to_vec();
        shortened.extend_from_slice(&file[4 + lost..]);
        let reason = parquet_rejected(&shortened).await;
        assert!(
            reason.starts_with("row group 1, column name: column chunk at offset "),
            "{reason}"
        );
        assert!(
            reason.contains(&format!(
                "is not within bytes 4..{} of this {}-byte file",
                meta_start - lost,
                n - lost
            )),
            "{reason}"
        );
    }

    #[test]
    fn parquet_layout_checks() {
        use parquet::file::metadata::{
            ColumnChunkMetaData, FileMetaData, ParquetMetaData, ParquetMetaDataReader,
        };

        let file = parquet_file(&[&[1, 2, 3], &[4, 5]]);
        let n = file.len();
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&file[n - 8..n - 4]);
        let meta_start = n - 8 - u32::from_le_bytes(len_bytes) as usize;
        let good = ParquetMetaDataReader::decode_metadata(&file[meta_start..n - 8]).unwrap();
        let (size, data_end) = (n as u64, meta_start as u64);
        assert_eq!(parquet_layout(&good, size, 4, data_end), Ok(5));
        // The data region is exact: one byte less and the page indexes stick out.
        assert!(parquet_layout(&good, size, 4, data_end - 1).is_err());

        // The good metadata with the footer's row count and column chunk `(1, 0)` changed.
        let changed = |rows: i64, change: &dyn Fn(ColumnChunkMetaData) -> ColumnChunkMetaData| {
            let fm = good.file_metadata();
            let file_meta = FileMetaData::new(
                fm.version(),
                rows,
                fm.created_by().map(str::to_owned),
                fm.key_value_metadata().cloned(),
                fm.schema_descr_ptr(),
                fm.column_orders().cloned(),
            );
            let groups = good
                .row_groups()
                .iter()
                .enumerate()
                .map(|(g, group)| {
                    let columns = group
                        .columns()
                        .iter()
                        .enumerate()
                        .map(|(c, chunk)| match (g, c) {
                            (1, 0) => change(chunk.clone()),
                            _ => chunk.clone(),
                        })
                        .collect();
                    group
                        .clone()
                        .into_builder()
                        .set_column_metadata(columns)
                        .build()
                        .unwrap()
                })
                .collect();
            let metadata = ParquetMetaData::new(file_meta, groups);
            parquet_layout(&metadata, size, 4, data_end)
                .map_err(|r| r.reason)
                .unwrap_err()
        };
        let same = |chunk: ColumnChunkMetaData| chunk;
        assert_eq!(
            changed(6, &same),
            "the footer counts 6 rows but its row groups add up to 5"
        );
        assert_eq!(
            changed(-1, &same),
            "the footer counts -1 rows but its row groups add up to 5"
        );
        let reason = changed(5, &|chunk| {
            chunk
                .into_builder()
                .set_data_page_offset(-1)
                .set_dictionary_page_offset(None)
                .build()
                .unwrap()
        });
        assert!(
            reason.starts_with("row group 1, column id: column chunk at offset -1, "),
            "{reason}"
        );
        let reason = changed(5, &|chunk| {
            chunk
                .into_builder()
                .set_total_compressed_size(i64::MAX)
                .build()
                .unwrap()
        });
        assert!(
            reason.starts_with("row group 1, column id: column chunk at offset "),
            "{reason}"
        );
        let reason = changed(5, &|chunk| {
            chunk
                .into_builder()
                .set_file_path("other.parquet".to_owned())
                .build()
                .unwrap()
        });
        assert_eq!(
            reason,
            "row group 1, column id: data in another file (\"other.parquet\")"
        );
        let reason = changed(5, &|chunk| {
            chunk
                .into_builder()
                .set_offset_index_offset(Some(data_end as i64 - 2))
                .set_offset_index_length(Some(3))
                .build()
                .unwrap()
        });
        assert_eq!(
            reason,
            format!(
                "row group 1, column id: offset index at offset {}, 3 bytes, is not within bytes 4..{data_end} of this {size}-byte file",
                data_end - 2
            )
        );
    }
}
