//! The service's one error type and its HTTP form: `application/problem+json`
//! (RFC 9457) with `type`, `title`, `status`, `detail`, and for invalid
//! input the failing `field` plus every failure in `errors`.
//!
//! Database failures never reach the client: an unreachable database is a
//! 503 with `Retry-After`, anything else a generic 500 whose cause goes to
//! the log.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::order::{FieldError, Status};
use crate::store::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("request body over {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("invalid fields")]
    Invalid(Vec<FieldError>),
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    #[error("idempotency key in use by a request that has not finished")]
    IdempotencyKeyInProgress,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("illegal transition of order {id} from {from} to {to}")]
    IllegalTransition { id: i64, from: Status, to: Status },
    #[error("request timed out")]
    Timeout,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    /// A single invalid field.
    pub fn field(field: &str, detail: impl Into<String>) -> ApiError {
        ApiError::Invalid(vec![FieldError::new(field, detail)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Invalid(_) | ApiError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::IllegalTransition { .. } | ApiError::IdempotencyKeyInProgress => {
                StatusCode::CONFLICT
            }
            ApiError::Timeout | ApiError::Store(StoreError::Unavailable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// `(type slug, title, detail)`.
    fn describe(&self) -> (&'static str, &'static str, String) {
        match self {
            ApiError::MalformedJson(d) => ("malformed-json", "Malformed JSON", d.clone()),
            ApiError::BadRequest(d) => ("bad-request", "Bad request", d.clone()),
            ApiError::UnsupportedMediaType => (
                "unsupported-media-type",
                "Unsupported media type",
                "the body must be JSON, sent with Content-Type: application/json".into(),
            ),
            ApiError::PayloadTooLarge { limit } => (
                "payload-too-large",
                "Payload too large",
                format!("the body must be at most {limit} bytes"),
            ),
            ApiError::Invalid(errors) => (
                "invalid-field",
                "Invalid field",
                errors
                    .first()
                    .map(|e| {
                        if e.field.is_empty() {
                            e.detail.clone()
                        } else {
                            format!("{} {}", e.field, e.detail)
                        }
                    })
                    .unwrap_or_default(),
            ),
            ApiError::IdempotencyKeyReused => (
                "idempotency-key-reused",
                "Idempotency-Key reused",
                "this Idempotency-Key was used with a different request; use a new key".into(),
            ),
            ApiError::IdempotencyKeyInProgress => (
                "idempotency-key-in-progress",
                "Idempotency-Key in progress",
                "a request with this Idempotency-Key has not finished; retry later".into(),
            ),
            ApiError::NotFound(d) => ("not-found", "Not found", d.clone()),
            ApiError::MethodNotAllowed => (
                "method-not-allowed",
                "Method not allowed",
                "this route does not support the method".into(),
            ),
            ApiError::IllegalTransition { id, from, to } => (
                "illegal-transition",
                "Illegal status transition",
                format!("order {id} is {from} and cannot become {to}"),
            ),
            ApiError::Timeout => (
                "timeout",
                "Request timed out",
                "the request took too long and was abandoned; retry later".into(),
            ),
            ApiError::Store(StoreError::Unavailable(_)) => (
                "database-unavailable",
                "Service unavailable",
                "the database cannot be reached; retry later".into(),
            ),
            ApiError::Store(_) => (
                "internal",
                "Internal server error",
                "the request failed on the server; it has been logged".into(),
            ),
        }
    }
}

/// The problem `type` URI for a slug.
pub fn problem_type(slug: &str) -> String {
    format!("urn:order-api:problem:{slug}")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Store(StoreError::Unavailable(e)) => {
                tracing::warn!(error = %crate::error_chain(e.as_ref()), "database unavailable");
            }
            ApiError::Store(e) => {
                tracing::error!(error = %crate::error_chain(e), "request failed");
            }
            _ => {}
        }
        let (slug, title, detail) = self.describe();
        let mut body = json!({
            "type": problem_type(slug),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
        });
        if let (ApiError::Invalid(errors), Some(obj)) = (&self, body.as_object_mut()) {
            if let Some(first) = errors.first() {
                obj.insert("field".into(), json!(first.field));
            }
            obj.insert("errors".into(), json!(errors));
        }
        let mut resp = (status, body.to_string()).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}
