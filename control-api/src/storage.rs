//! The S3 adapter: every call the control API makes to storage. Two clients: one on the
//! internal endpoint for API calls, one on the public endpoint for presigning.

use std::time::Duration;

use aws_credential_types::Credentials;
use aws_sdk_s3::config::{BehaviorVersion, Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::DateTime;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockLegalHoldStatus,
    ObjectLockMode, ServerSideEncryption,
};
use aws_sdk_s3::Client;
use uplink_protocol::ops::PartChecksum;

use crate::config::S3Config;
use crate::domain::policy::{LockMode, Sse, StoragePolicy};
use crate::domain::verify::{CompletePart, ListedPart};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage has no such multipart upload")]
    NoSuchUpload,
    #[error("storage has no such object")]
    NotFound,
    #[error("storage call {op} failed: {message}")]
    Call { op: &'static str, message: String },
}

type HttpResponse = aws_sdk_s3::config::http::HttpResponse;

fn call_error<E>(
    op: &'static str,
    err: aws_sdk_s3::error::SdkError<E, HttpResponse>,
) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if err.code() == Some("NoSuchUpload") {
        return StorageError::NoSuchUpload;
    }
    if matches!(err.code(), Some("NotFound" | "NoSuchKey")) {
        return StorageError::NotFound;
    }
    if let aws_sdk_s3::error::SdkError::ServiceError(e) = &err {
        if e.raw().status().as_u16() == 404 {
            return StorageError::NotFound;
        }
    }
    StorageError::Call {
        op,
        message: DisplayErrorContext(&err).to_string(),
    }
}

/// Where an object lives.
#[derive(Debug, Clone, Copy)]
pub struct Object<'a> {
    pub bucket: &'a str,
    pub key: &'a str,
}

/// What a HEAD of an object reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    pub size: u64,
    pub etag: String,
    /// `x-amz-server-side-encryption`: `AES256`, `aws:kms`, …
    pub sse: Option<String>,
    pub sse_kms_key_id: Option<String>,
    /// `x-amz-object-lock-mode`: `GOVERNANCE` or `COMPLIANCE`.
    pub lock_mode: Option<String>,
    /// `x-amz-object-lock-retain-until-date`, Unix seconds.
    pub retain_until: Option<i64>,
    /// `x-amz-object-lock-legal-hold: ON`.
    pub legal_hold: bool,
}

/// A presigned request: URL and the headers that must accompany it.
#[derive(Debug, Clone)]
pub struct Presigned {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct Storage {
    client: Client,
    presigner: Client,
    /// The configured bucket (`s3.bucket`); storage policies may name others.
    pub bucket: String,
}

/// How an object is written, from its storage policy.
#[derive(Debug, Clone, Default)]
pub struct ObjectOptions {
    pub sse: Option<Sse>,
    pub sse_kms_key_id: Option<String>,
    pub lock_mode: Option<LockMode>,
    pub retain_days: Option<u32>,
    pub legal_hold: bool,
}

impl ObjectOptions {
    pub fn of(p: &StoragePolicy) -> ObjectOptions {
        ObjectOptions {
            sse: p.sse,
            sse_kms_key_id: p.sse_kms_key_id.clone(),
            lock_mode: p.object_lock_mode,
            retain_days: p.retention_days,
            legal_hold: p.legal_hold.unwrap_or(false),
        }
    }

    fn sse(&self) -> Option<ServerSideEncryption> {
        self.sse.map(|s| match s {
            Sse::Aes256 => ServerSideEncryption::Aes256,
            Sse::Kms => ServerSideEncryption::AwsKms,
        })
    }

    fn lock_mode(&self) -> Option<ObjectLockMode> {
        self.lock_mode.map(|m| match m {
            LockMode::Governance => ObjectLockMode::Governance,
            LockMode::Compliance => ObjectLockMode::Compliance,
        })
    }

    fn retain_until(&self) -> Option<DateTime> {
        self.retain_days
            .filter(|_| self.lock_mode.is_some())
            .map(|d| DateTime::from_secs(uplink_protocol::unix_now() + i64::from(d) * 86_400))
    }

    fn legal_hold(&self) -> Option<ObjectLockLegalHoldStatus> {
        self.legal_hold.then_some(ObjectLockLegalHoldStatus::On)
    }
}

/// `(Content-MD5, x-amz-checksum-sha256)` for a part digest.
fn split_digest((checksum, digest): (PartChecksum, &str)) -> (Option<String>, Option<String>) {
    match checksum {
        PartChecksum::Md5 => (Some(digest.to_string()), None),
        PartChecksum::Sha256 => (None, Some(digest.to_string())),
    }
}

fn client(cfg: &S3Config, endpoint: &str) -> Client {
    let creds = Credentials::new(
        cfg.access_key_id.expose(),
        cfg.secret_access_key.expose(),
        None,
        None,
        "uplink-config",
    );
    let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(60))
        .build();
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(cfg.region.clone()))
        .endpoint_url(endpoint)
        .credentials_provider(creds)
        .force_path_style(cfg.force_path_style)
        // Only the part's own digest is signed into part URLs; no SDK-computed checksums.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .timeout_config(timeouts)
        .build();
    Client::from_conf(conf)
}

impl Storage {
    pub fn new(cfg: &S3Config, public_endpoint: &str) -> Storage {
        Storage {
            client: client(cfg, &cfg.endpoint),
            presigner: client(cfg, public_endpoint),
            bucket: cfg.bucket.clone(),
        }
    }

    /// Whether the configured bucket is reachable with our credentials.
    pub async fn check(&self) -> Result<(), StorageError> {
        self.check_bucket(&self.bucket).await
    }

    pub async fn check_bucket(&self, bucket: &str) -> Result<(), StorageError> {
        self.client
            .head_bucket()
            .bucket(bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| call_error("HeadBucket", e))
    }

    pub async fn create_multipart(
        &self,
        obj: &Object<'_>,
        opts: &ObjectOptions,
        checksum: PartChecksum,
    ) -> Result<String, StorageError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(obj.bucket)
            .key(obj.key)
            .set_checksum_algorithm(
                (checksum == PartChecksum::Sha256).then_some(ChecksumAlgorithm::Sha256),
            )
            .set_server_side_encryption(opts.sse())
            .set_ssekms_key_id(opts.sse_kms_key_id.clone())
            .set_object_lock_mode(opts.lock_mode())
            .set_object_lock_retain_until_date(opts.retain_until())
            .set_object_lock_legal_hold_status(opts.legal_hold())
            .send()
            .await
            .map_err(|e| call_error("CreateMultipartUpload", e))?;
        out.upload_id.ok_or(StorageError::Call {
            op: "CreateMultipartUpload",
            message: "no upload id in the answer".into(),
        })
    }

    fn presign_config(ttl: Duration) -> Result<PresigningConfig, StorageError> {
        PresigningConfig::expires_in(ttl).map_err(|e| StorageError::Call {
            op: "presign",
            message: e.to_string(),
        })
    }

    fn presigned(req: aws_sdk_s3::presigning::PresignedRequest) -> Presigned {
        Presigned {
            url: req.uri().to_string(),
            headers: req
                .headers()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect(),
        }
    }

    /// A URL for one part, with its digest (base64) signed in: `Content-MD5` or
    /// `x-amz-checksum-sha256`.
    pub async fn presign_part(
        &self,
        obj: &Object<'_>,
        upload_id: &str,
        number: u32,
        digest: (PartChecksum, &str),
        ttl: Duration,
    ) -> Result<Presigned, StorageError> {
        let (md5, sha256) = split_digest(digest);
        let req = self
            .presigner
            .upload_part()
            .bucket(obj.bucket)
            .key(obj.key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .set_content_md5(md5)
            .set_checksum_sha256(sha256)
            .presigned(Self::presign_config(ttl)?)
            .await
            .map_err(|e| call_error("presign UploadPart", e))?;
        Ok(Self::presigned(req))
    }

    /// A PutObject URL for a whole (0-byte) object, with its digest and the policy's
    /// headers signed in (the device sends them all).
    pub async fn presign_put(
        &self,
        obj: &Object<'_>,
        digest: (PartChecksum, &str),
        ttl: Duration,
        opts: &ObjectOptions,
    ) -> Result<Presigned, StorageError> {
        let (md5, sha256) = split_digest(digest);
        let req = self
            .presigner
            .put_object()
            .bucket(obj.bucket)
            .key(obj.key)
            .set_content_md5(md5)
            .set_checksum_sha256(sha256)
            .set_server_side_encryption(opts.sse())
            .set_ssekms_key_id(opts.sse_kms_key_id.clone())
            .set_object_lock_mode(opts.lock_mode())
            .set_object_lock_retain_until_date(opts.retain_until())
            .set_object_lock_legal_hold_status(opts.legal_hold())
            .presigned(Self::presign_config(ttl)?)
            .await
            .map_err(|e| call_error("presign PutObject", e))?;
        Ok(Self::presigned(req))
    }

    /// A GetObject URL for a whole stored object (the console's download link).
    pub async fn presign_get(
        &self,
        obj: &Object<'_>,
        file_name: &str,
        ttl: Duration,
    ) -> Result<Presigned, StorageError> {
        // Saved under its own name, whatever the key looks like; quotes and control
        // characters cannot break out of the header value.
        let safe: String = file_name
            .chars()
            .map(|c| {
                if c == '"' || c == '\\' || c.is_control() || !c.is_ascii() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let req = self
            .presigner
            .get_object()
            .bucket(obj.bucket)
            .key(obj.key)
            .response_content_disposition(format!("attachment; filename=\"{safe}\""))
            .presigned(Self::presign_config(ttl)?)
            .await
            .map_err(|e| call_error("presign GetObject", e))?;
        Ok(Self::presigned(req))
    }

    /// Every part storage holds for an upload (all pages).
    pub async fn list_parts(
        &self,
        obj: &Object<'_>,
        upload_id: &str,
    ) -> Result<Vec<ListedPart>, StorageError> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .client
                .list_parts()
                .bucket(obj.bucket)
                .key(obj.key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(|e| call_error("ListParts", e))?;
            for p in out.parts() {
                parts.push(ListedPart {
                    number: p.part_number().unwrap_or(0).max(0) as u32,
                    size: p.size().unwrap_or(0).max(0) as u64,
                    etag: p.e_tag().unwrap_or_default().to_string(),
                    checksum_sha256: p.checksum_sha256().map(str::to_string),
                });
            }
            match (out.is_truncated(), out.next_part_number_marker()) {
                (Some(true), Some(next)) if Some(next) != marker.as_deref() => {
                    marker = Some(next.to_string())
                }
                _ => break,
            }
        }
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    pub async fn complete(
        &self,
        obj: &Object<'_>,
        upload_id: &str,
        parts: &[CompletePart],
    ) -> Result<(), StorageError> {
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        CompletedPart::builder()
                            .part_number(p.number as i32)
                            .e_tag(&p.etag)
                            .set_checksum_sha256(p.checksum_sha256.clone())
                            .build()
                    })
                    .collect(),
            ))
            .build();
        self.client
            .complete_multipart_upload()
            .bucket(obj.bucket)
            .key(obj.key)
            .upload_id(upload_id)
            .multipart_upload(completed)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| call_error("CompleteMultipartUpload", e))
    }

    pub async fn abort(&self, obj: &Object<'_>, upload_id: &str) -> Result<(), StorageError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(obj.bucket)
            .key(obj.key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| call_error("AbortMultipartUpload", e))
        {
            Ok(_) | Err(StorageError::NoSuchUpload) | Err(StorageError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Multipart uploads in progress under `prefix`: (key, upload id, initiated Unix secs
    /// when storage says).
    pub async fn list_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String, Option<i64>)>, StorageError> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| call_error("ListMultipartUploads", e))?;
            for u in page.uploads() {
                if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                    out.push((
                        key.to_string(),
                        id.to_string(),
                        u.initiated().map(|t| t.secs()),
                    ));
                }
            }
            let next = (
                page.next_key_marker().map(str::to_string),
                page.next_upload_id_marker().map(str::to_string),
            );
            if page.is_truncated() != Some(true)
                || next.0.is_none()
                || (next.0 == key_marker && next.1 == id_marker)
            {
                break;
            }
            (key_marker, id_marker) = next;
        }
        Ok(out)
    }

    /// The whole object as a byte stream, read as the caller consumes it (nothing is
    /// buffered beyond the SDK's own chunks). The SDK's stalled-stream protection turns a
    /// body that stops arriving into a read error.
    pub async fn get_stream(
        &self,
        obj: &Object<'_>,
    ) -> Result<impl tokio::io::AsyncRead + Unpin + Send + 'static, StorageError> {
        let out = self
            .client
            .get_object()
            .bucket(obj.bucket)
            .key(obj.key)
            .send()
            .await
            .map_err(|e| call_error("GetObject", e))?;
        Ok(out.body.into_async_read())
    }

    /// `len` bytes of the object from `offset`: a ranged GetObject (none for 0 bytes).
    pub async fn get_range(
        &self,
        obj: &Object<'_>,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, StorageError> {
        if len == 0 {
            return Ok(bytes::Bytes::new());
        }
        let last = offset + len - 1;
        let out = self
            .client
            .get_object()
            .bucket(obj.bucket)
            .key(obj.key)
            .range(format!("bytes={offset}-{last}"))
            .send()
            .await
            .map_err(|e| call_error("GetObject", e))?;
        let body = out.body.collect().await.map_err(|e| StorageError::Call {
            op: "GetObject",
            message: DisplayErrorContext(&e).to_string(),
        })?;
        Ok(body.into_bytes())
    }

    /// Size and ETag of a stored object.
    pub async fn head(&self, obj: &Object<'_>) -> Result<(u64, String), StorageError> {
        let h = self.head_object(obj).await?;
        Ok((h.size, h.etag))
    }

    /// What storage reports of a stored object: size, ETag, and the guarantees a storage
    /// policy asks for (encryption, lock, retention, legal hold).
    pub async fn head_object(&self, obj: &Object<'_>) -> Result<Head, StorageError> {
        let out = self
            .client
            .head_object()
            .bucket(obj.bucket)
            .key(obj.key)
            .send()
            .await
            .map_err(|e| call_error("HeadObject", e))?;
        Ok(Head {
            size: out.content_length().unwrap_or(0).max(0) as u64,
            etag: out.e_tag().unwrap_or_default().to_string(),
            sse: out.server_side_encryption().map(|s| s.as_str().to_string()),
            sse_kms_key_id: out.ssekms_key_id().map(str::to_string),
            lock_mode: out.object_lock_mode().map(|m| m.as_str().to_string()),
            retain_until: out.object_lock_retain_until_date().map(|d| d.secs()),
            legal_hold: out.object_lock_legal_hold_status() == Some(&ObjectLockLegalHoldStatus::On),
        })
    }

    /// Whether the bucket has object lock enabled (storage that does not know object lock
    /// answers with an error: not enabled).
    pub async fn object_lock_enabled(&self, bucket: &str) -> Result<bool, StorageError> {
        match self
            .client
            .get_object_lock_configuration()
            .bucket(bucket)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                .is_some_and(|e| e.as_str() == "Enabled")),
            Err(e) if e.raw_response().is_some() => Ok(false),
            Err(e) => Err(call_error("GetObjectLockConfiguration", e)),
        }
    }

    /// Writes an empty object with `opts`' encryption (no lock: it is deleted at once).
    pub async fn put_empty(
        &self,
        obj: &Object<'_>,
        opts: &ObjectOptions,
    ) -> Result<(), StorageError> {
        self.client
            .put_object()
            .bucket(obj.bucket)
            .key(obj.key)
            .set_server_side_encryption(opts.sse())
            .set_ssekms_key_id(opts.sse_kms_key_id.clone())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| call_error("PutObject", e))
    }

    pub async fn delete(&self, obj: &Object<'_>) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(obj.bucket)
            .key(obj.key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| call_error("DeleteObject", e))
    }
}
