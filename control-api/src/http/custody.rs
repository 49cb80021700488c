//! A session's chain of custody: the manifest its device signed, kept in the audit log,
//! with whether the signature and the part digests still check out.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use uplink_protocol::sign::{self, RequestToSign};
use uuid::Uuid;

use super::auth::Caller;
use super::error::ApiError;
use super::operator::visible_session;
use super::{openapi, ApiPath};
use crate::domain::access::Need;
use crate::sessions::SignedRequest;
use crate::AppState;

#[derive(Serialize, utoipa::ToSchema)]
pub struct Custody {
    /// What the device signed: device, path, size, SHA-256, part count and parts digest.
    #[schema(value_type = Option<uplink_protocol::ops::FileManifest>)]
    pub manifest: serde_json::Value,
    /// `md5` or `sha256`: the kind of `part_digests`.
    pub part_checksum: String,
    /// The part digests (base64) the device sent when it asked for part URLs (their
    /// `parts_digest` is signed).
    #[schema(value_type = Option<Vec<String>>)]
    pub part_digests: serde_json::Value,
    pub signed_request: SignedRequest,
    /// Whether the signature verifies with the key the device had when it signed.
    pub signature_valid: bool,
    /// Whether `part_digests` hash to the manifest's `parts_digest`.
    pub parts_digest_valid: bool,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
}

/// The file's chain of custody: the device-signed manifest kept in the audit log.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/manifest",
    tag = "sessions",
    params(("id" = Uuid, Path, description = "Session id")),
    responses(
        (status = 200, description = "The device-signed manifest (chain of custody)", body = Custody),
        openapi::ReadProblems,
    ),
    security(("operator" = []))
)]
pub async fn session_manifest(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Custody>, ApiError> {
    let session = visible_session(&st, &caller, id, Need::Read).await?;
    // A deduplicated session's custody is its original's.
    let subject = session.deduplicated_from.unwrap_or(session.session_id);
    let row: Option<(serde_json::Value, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT detail, at FROM audit_events WHERE subject = $1 AND action = 'session.manifest' ORDER BY id LIMIT 1",
    )
    .bind(subject.to_string())
    .fetch_optional(&st.store.pool)
    .await?;
    let (detail, recorded_at) = row.ok_or_else(|| {
        ApiError::NotFound(
            "manifest_not_found",
            format!("session {id} has no device-signed manifest (not completed, or an agent without manifests)"),
        )
    })?;
    let signed: SignedRequest = serde_json::from_value(detail["signed_request"].clone())
        .map_err(|e| ApiError::Internal(e.into()))?;
    let signature_valid = sign::decode_public(&signed.public_key).is_ok_and(|key| {
        RequestToSign {
            device_id: &signed.device_id,
            op: &signed.op,
            request_id: &signed.request_id,
            ts: signed.ts,
            body: &signed.body,
        }
        .verify(&key, &signed.signature)
        .is_ok()
    });
    // Entries written before SHA-256 part checksums name the MD5s `part_md5s`.
    let (part_checksum, part_digests) = match detail.get("part_digests") {
        Some(d) => (
            detail["part_checksum"]
                .as_str()
                .unwrap_or("md5")
                .to_string(),
            d.clone(),
        ),
        None => ("md5".to_string(), detail["part_md5s"].clone()),
    };
    let digests: Vec<String> = serde_json::from_value(part_digests.clone()).unwrap_or_default();
    let digest = uplink_protocol::ops::parts_digest(
        digests
            .iter()
            .enumerate()
            .map(|(i, m)| (i as u32 + 1, m.as_str())),
    );
    let body: serde_json::Value = serde_json::from_str(&signed.body).unwrap_or_default();
    Ok(Json(Custody {
        manifest: body["manifest"].clone(),
        parts_digest_valid: body["manifest"]["parts_digest"] == digest.as_str(),
        part_checksum,
        part_digests,
        signature_valid,
        signed_request: signed,
        recorded_at,
    }))
}
