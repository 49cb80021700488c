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
//! One file per format (`jsonl.rs`, `csv.rs`, `parquet.rs`); this one holds the shared
//! types, the dispatch ([`validate_stream`]) and the tests' readers.
//!
//! | validator | reads | memory | checks |
//! | --- | --- | --- | --- |
//! | [`Validator::Jsonl`] | the whole object, streamed | 64 KiB + the longest line (at most [`MAX_JSONL_LINE_BYTES`]) | every non-blank line is one JSON value, UTF-8 |
//! | [`Validator::Csv`] | the whole object, streamed | 72 KiB, whatever the file | a header record, the same field count in every record, quotes closed, UTF-8 |
//! | [`Validator::Parquet`] | the first 4 bytes and the footer, by range | the footer metadata (at most [`MAX_PARQUET_METADATA_BYTES`]) | magic numbers, footer length, metadata decodes, column chunks and page indexes inside the file, row counts add up; pages are not decoded |

use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _};

mod csv;
mod jsonl;
mod parquet;

pub use self::parquet::validate_parquet;

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
        Validator::Jsonl => jsonl::jsonl(r, MAX_JSONL_LINE_BYTES).await,
        Validator::Csv => csv::csv(r).await,
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    /// Delivers `chunk` bytes per read, returning `Pending` before each one.
    pub(super) struct Trickle {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
        ready: bool,
    }

    impl Trickle {
        pub(super) fn new(data: &[u8], chunk: usize) -> Self {
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
    pub(super) async fn check(v: Validator, data: &[u8]) -> Verdict {
        let whole = validate_stream(v, data).await.expect("read");
        for chunk in [1, 2, 3, 5, 7, 4096] {
            let cut = validate_stream(v, Trickle::new(data, chunk))
                .await
                .expect("read");
            assert_eq!(cut, whole, "{v} in pieces of {chunk} bytes");
        }
        whole
    }

    pub(super) async fn accepted(v: Validator, data: &[u8]) -> u64 {
        let report = check(v, data)
            .await
            .unwrap_or_else(|r| panic!("{v} rejected: {r}"));
        assert_eq!(report.bytes, data.len() as u64);
        report.records
    }

    pub(super) async fn rejected(v: Validator, data: &[u8]) -> String {
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
}
