//! Storage's answers: whether an error answer refuses the presigned signature (then a fresh
//! URL is asked for), and errors as one readable line without the URL's signature.

/// Whether storage's error answer says the presigned signature is expired or not yet valid
/// (or otherwise refused): then a fresh URL is asked for, whatever the status. AWS and
/// MinIO answer an expired URL with 403 `AccessDenied` "Request has expired", SeaweedFS with
/// 403, Garage with 400 `InvalidRequest` "Date is too old"; a clock skew shows as
/// `RequestTimeTooSkewed`. Every 403 counts (a fresh URL fixes most; the caller caps how
/// many in a row it asks for).
pub(super) fn signature_refused(status: u16, body: &str) -> bool {
    if status == 403 {
        return true;
    }
    let code = xml_element(body, "Code").unwrap_or_default();
    if matches!(
        code,
        "RequestTimeTooSkewed" | "RequestExpired" | "ExpiredToken" | "AccessDenied"
    ) {
        return true;
    }
    if status != 400 || !matches!(code, "InvalidRequest" | "AuthorizationQueryParametersError") {
        return false;
    }
    let message = xml_element(body, "Message")
        .unwrap_or_default()
        .to_ascii_lowercase();
    [
        "too old",
        "expired",
        "not yet valid",
        "in the future",
        "skew",
    ]
    .iter()
    .any(|w| message.contains(w))
}

/// The trimmed text of the first `<name>…</name>` in an S3 error document.
fn xml_element<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let start = body.find(&format!("<{name}>"))? + name.len() + 2;
    let len = body[start..].find(&format!("</{name}>"))?;
    Some(body[start..start + len].trim())
}

/// Storage's error answer as one line for logs and a job's failure reason: an S3 error
/// document (`<Error><Code>NoSuchUpload</Code><Message>…</Message>…`) becomes
/// `status 404: NoSuchUpload: The specified multipart upload does not exist.`; any other
/// body is kept (whitespace folded, at most 300 characters).
pub(super) fn storage_answer(status: u16, body: &str) -> String {
    let element = xml_element;
    fn unescape(s: &str) -> String {
        s.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&")
    }
    let text = match element(body, "Code").filter(|c| !c.is_empty()) {
        Some(code) => match element(body, "Message").filter(|m| !m.is_empty()) {
            Some(message) => format!("{}: {}", unescape(code), unescape(message)),
            None => unescape(code),
        },
        None => body.to_string(),
    };
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let line: String = line.chars().take(300).collect();
    if line.is_empty() {
        format!("status {status}")
    } else {
        format!("status {status}: {line}")
    }
}

/// The failure reason once storage refused `times` fresh URLs of a part in a row.
pub(crate) fn signature_fault(times: u32, answer: &str) -> String {
    format!(
        "{times} freshly presigned URLs in a row refused as expired or not yet valid (last: {answer}); storage's clock or the API's storage credentials are probably wrong (check storage's clock, and the API's S3 keys)"
    )
}

/// A reqwest error without its URL (which would carry the presigned query).
pub(super) fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "connect error"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_body() || e.is_request() {
        "request error"
    } else {
        "HTTP error"
    };
    format!("{kind}: {}", uplink_service::error_chain(&e.without_url()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uploader::{PutError, UploadError};

    #[test]
    fn expired_or_skewed_signatures_are_presigned_again_whatever_the_status() {
        let doc = |code: &str, message: &str| {
            format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><Resource>/b/k</Resource></Error>")
        };
        for (status, body) in [
            (403, doc("AccessDenied", "Request has expired")),
            (403, doc("RequestExpired", "Request has expired")),
            (
                403,
                doc(
                    "SignatureDoesNotMatch",
                    "The request signature we calculated does not match",
                ),
            ),
            (403, String::new()),
            (
                403,
                doc(
                    "RequestTimeTooSkewed",
                    "The difference between the request time and the server's time is too large.",
                ),
            ),
            (
                400,
                doc(
                    "RequestTimeTooSkewed",
                    "The difference between the request time and the current time is too large.",
                ),
            ),
            // Garage.
            (400, doc("InvalidRequest", "Bad request: Date is too old")),
            (
                400,
                doc(
                    "InvalidRequest",
                    "Bad request: X-Amz-Expires: presigned URL has expired",
                ),
            ),
            (
                400,
                doc(
                    "AuthorizationQueryParametersError",
                    "X-Amz-Date is in the future",
                ),
            ),
            (400, doc("InvalidRequest", "Request is not yet valid")),
            (400, doc("ExpiredToken", "The provided token has expired.")),
        ] {
            assert!(signature_refused(status, &body), "{status} {body}");
        }
        for (status, body) in [
            (400, doc("BadDigest", "The Content-MD5 you specified did not match what we received.")),
            (400, doc("InvalidRequest", "Part number must be an integer between 1 and 10000")),
            (400, doc("RequestTimeout", "Your socket connection to the server was not read from or written to within the timeout period.")),
            (400, "IncompleteBody".to_string()),
            (404, doc("NoSuchUpload", "The specified multipart upload does not exist.")),
            (500, doc("InternalError", "We encountered an internal error.")),
            (503, String::new()),
        ] {
            assert!(!signature_refused(status, &body), "{status} {body}");
        }
    }

    #[test]
    fn a_signature_fault_reads_clearly() {
        let e = UploadError::Part {
            number: 3,
            source: PutError::Refused(signature_fault(
                3,
                "status 403: SignatureDoesNotMatch: The request signature we calculated does not match",
            )),
        };
        assert!(!e.is_transient());
        assert_eq!(
            e.to_string(),
            "part 3: storage refused the part: 3 freshly presigned URLs in a row refused as expired or not yet valid (last: status 403: SignatureDoesNotMatch: The request signature we calculated does not match); storage's clock or the API's storage credentials are probably wrong (check storage's clock, and the API's S3 keys)"
        );
        let e = UploadError::Part {
            number: 3,
            source: PutError::Expired(Some("status 400: InvalidRequest: Date is too old".into())),
        };
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "part 3: storage refused the presigned URL: status 400: InvalidRequest: Date is too old"
        );
    }

    #[test]
    fn storage_errors_read_as_one_line() {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchUpload</Code><Message>The specified multipart upload does not exist.</Message><Resource>/b/k</Resource><RequestId>1</RequestId></Error>";
        assert_eq!(
            storage_answer(404, xml),
            "status 404: NoSuchUpload: The specified multipart upload does not exist."
        );
        assert_eq!(
            storage_answer(
                400,
                "<Error><Code>X</Code><Message>a &lt;b&gt; &amp;amp;\n c</Message></Error>"
            ),
            "status 400: X: a <b> &amp; c"
        );
        assert_eq!(
            storage_answer(400, "<Error><Code>InvalidPart</Code></Error>"),
            "status 400: InvalidPart"
        );
        assert_eq!(
            storage_answer(502, "bad\n  gateway"),
            "status 502: bad gateway"
        );
        assert_eq!(storage_answer(500, ""), "status 500");
        assert_eq!(
            storage_answer(500, &"x".repeat(1000)).len(),
            300 + "status 500: ".len()
        );
    }
}
