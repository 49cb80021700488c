//! The Parquet validator: only the first 4 bytes and the footer, by ranged reads; the
//! footer metadata is checked against the file, pages are not decoded.

use std::future::Future;
use std::io;

use bytes::Bytes;

use super::{Rejection, Report, Verdict, MAX_PARQUET_METADATA_BYTES};

/// The last bytes of a Parquet file read in one go: the footer and, usually, all the
/// metadata, so that most files take two ranged reads.
const PARQUET_TAIL_PREFETCH: u64 = 64 << 10;

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

    use std::sync::{Arc, Mutex};

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
