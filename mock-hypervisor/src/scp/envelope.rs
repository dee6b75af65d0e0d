//! The SCP response envelope `{"code", "message", "data"}` and error codes.
//!
//! Malformed requests get HTTP 4xx with a non-zero code; platform rule
//! refusals (CBT expired, version limits) get HTTP 200 with a non-zero code,
//! as the real platform does: clients must check `code`, not only the status.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::Error;

/// Success.
pub const OK: i64 = 0;
/// Malformed request (HTTP 400).
pub const INVALID: i64 = 40000;
/// Missing or expired token, bad credentials (HTTP 401).
pub const UNAUTHORIZED: i64 = 40100;
/// Object not found (HTTP 404).
pub const NOT_FOUND: i64 = 40400;
/// Object in a conflicting state (HTTP 409).
pub const CONFLICT: i64 = 40900;
/// Internal error (HTTP 500).
pub const INTERNAL: i64 = 50000;
/// Platform rule refusal (HTTP 200).
pub const REFUSED: i64 = 60000;
/// CBT is not enabled on the server (HTTP 200).
pub const CBT_DISABLED: i64 = 60002;
/// Base image CBT not available in this platform version (HTTP 200).
pub const BASE_IMAGE_CBT_UNSUPPORTED: i64 = 60003;
/// Checkpoint no longer valid (HTTP 200).
pub const CHECKPOINT_INVALID: i64 = 60004;
/// Agentless backup unsupported (desktop VM in revert mode) (HTTP 200).
pub const REVERT_MODE_UNSUPPORTED: i64 = 60005;
/// The backup resource expired (HTTP 200).
pub const RESOURCE_EXPIRED: i64 = 60006;

/// The platform's message when a VM's CBT expired (after a snapshot revert
/// or a restore), answered with [`REFUSED`]: clients recognise the
/// message, as the platform documents it.
pub const CBT_EXPIRED_MESSAGE: &str = "The VM CBT has expired. Please reset it.";

/// An SCP error answer.
#[derive(Debug, Clone)]
pub struct ScpError {
    /// HTTP status.
    pub status: StatusCode,
    /// Envelope code.
    pub code: i64,
    /// Envelope message.
    pub message: String,
}

impl ScpError {
    /// Any error.
    pub fn new(status: StatusCode, code: i64, message: impl Into<String>) -> Self {
        ScpError {
            status,
            code,
            message: message.into(),
        }
    }

    /// HTTP 400.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID, message)
    }

    /// HTTP 404.
    pub fn not_found(kind: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            NOT_FOUND,
            format!("{kind} {id} not found"),
        )
    }

    /// HTTP 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, CONFLICT, message)
    }

    /// HTTP 200 with a non-zero code.
    pub fn refused(code: i64, message: impl Into<String>) -> Self {
        Self::new(StatusCode::OK, code, message)
    }
}

impl From<Error> for ScpError {
    fn from(e: Error) -> Self {
        match &e {
            Error::NotFound { kind, id } => ScpError::not_found(kind, id),
            Error::Invalid(m) => ScpError::invalid(m.clone()),
            Error::Conflict(m) => ScpError::conflict(m.clone()),
            Error::Refused(m) => ScpError::refused(REFUSED, m.clone()),
            _ => {
                tracing::warn!(error = %e, "internal error");
                ScpError::new(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL, e.to_string())
            }
        }
    }
}

impl IntoResponse for ScpError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"code": self.code, "message": self.message, "data": null})),
        )
            .into_response()
    }
}

/// Result of a handler.
pub type ScpResult = Result<Response, ScpError>;

/// A success envelope around `data`.
pub fn ok(data: impl Serialize) -> ScpResult {
    Ok(Json(json!({"code": OK, "message": "success", "data": data})).into_response())
}

/// Parses a JSON body; an empty body reads as `{}`.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ScpError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ScpError::invalid(format!("malformed request body: {e}")))
}

/// Query parameters.
pub type QueryMap = HashMap<String, String>;

/// Query string extractor whose rejection is an SCP envelope.
#[derive(Debug)]
pub struct ScpQuery(pub QueryMap);

impl<S: Send + Sync> FromRequestParts<S> for ScpQuery {
    type Rejection = ScpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<QueryMap>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ScpQuery(q))
            .map_err(|e| ScpError::invalid(e.body_text()))
    }
}

/// Path parameters extractor whose rejection is an SCP envelope.
#[derive(Debug)]
pub struct ScpPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ScpPath<T> {
    type Rejection = ScpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ScpPath(p))
            .map_err(|e| ScpError::invalid(e.body_text()))
    }
}

/// Optional unsigned query parameter.
pub fn query_u64(q: &QueryMap, name: &str) -> Result<Option<u64>, ScpError> {
    q.get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ScpError::invalid(format!(
                    "query parameter {name} must be a non-negative integer"
                ))
            })
        })
        .transpose()
}

/// Largest `page_size` the platform accepts.
pub const MAX_PAGE_SIZE: u64 = 100;

/// Applies `page_num` (0-based) and `page_size` (1..=100, default 100) to a
/// list and wraps it as `{"total_size", "page_num", "page_size",
/// "next_page_num", "data": [...]}`; `next_page_num` is `""` on the last
/// page.
pub fn paged<T: Serialize>(q: &QueryMap, items: Vec<T>) -> ScpResult {
    let page_num = query_u64(q, "page_num")?.unwrap_or(0);
    let page_size = query_u64(q, "page_size")?.unwrap_or(MAX_PAGE_SIZE);
    if page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(ScpError::invalid(format!(
            "page_size must be 1..={MAX_PAGE_SIZE}"
        )));
    }
    let total = items.len() as u64;
    let page: Vec<T> = items
        .into_iter()
        .skip(page_num.saturating_mul(page_size) as usize)
        .take(page_size as usize)
        .collect();
    let next = if (page_num + 1).saturating_mul(page_size) < total {
        json!(page_num + 1)
    } else {
        json!("")
    };
    ok(
        json!({"total_size": total, "page_num": page_num, "page_size": page_size,
        "next_page_num": next, "data": page}),
    )
}
