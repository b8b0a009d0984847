//! What a handler can get back from the session, and the HTTP answer for it.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use statehouse_store::StoreError;

/// A session operation that did not succeed. Implements `IntoResponse`, so
/// a handler can use `?`: the store being down becomes 503 with
/// `Retry-After`, a size limit 413, a session that ended meanwhile 409.
#[derive(Debug)]
pub enum SessionError {
    /// The store cannot be reached (and the policy did not allow a degraded
    /// answer). Nothing was written.
    Unavailable(StoreError),
    /// A field or the whole session is over its size limit.
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    /// The session was destroyed (logout) or rotated while this request ran;
    /// the write was refused so it cannot bring the session back.
    Ended,
    /// `update` lost the compare-and-set race more times than allowed.
    Contention { field: String, attempts: u32 },
    /// Field names starting with `_sh.` are reserved.
    ReservedField(String),
    /// A stored field could not be decoded into the requested type.
    Decode { field: String, reason: String },
    /// Any other store failure.
    Store(StoreError),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Unavailable(e) => write!(f, "session store unavailable: {e}"),
            SessionError::TooLarge { what, size, limit } => {
                write!(f, "{what} is {size} bytes, over the limit of {limit}")
            }
            SessionError::Ended => f.write_str("the session ended while this request ran"),
            SessionError::Contention { field, attempts } => write!(
                f,
                "field {field:?} changed concurrently {attempts} times in a row"
            ),
            SessionError::ReservedField(name) => {
                write!(f, "session field name {name:?} is reserved")
            }
            SessionError::Decode { field, reason } => {
                write!(f, "session field {field:?} cannot be decoded: {reason}")
            }
            SessionError::Store(e) => write!(f, "session store: {e}"),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<StoreError> for SessionError {
    fn from(e: StoreError) -> Self {
        match e {
            e if e.is_unavailable() => SessionError::Unavailable(e),
            StoreError::TooLarge { what, size, limit } => SessionError::TooLarge {
                // The store checks the session's map as a whole.
                what: if what == "map" { "session" } else { what },
                size,
                limit,
            },
            e => SessionError::Store(e),
        }
    }
}

impl SessionError {
    pub fn status(&self) -> StatusCode {
        match self {
            SessionError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            SessionError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            SessionError::Ended | SessionError::Contention { .. } => StatusCode::CONFLICT,
            SessionError::ReservedField(_)
            | SessionError::Decode { .. }
            | SessionError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self, "session failure");
        }
        // The client sees a short reason; store addresses stay in the logs.
        let body = match &self {
            SessionError::Unavailable(_) => "session store unavailable, retry shortly".to_owned(),
            SessionError::Store(_) | SessionError::Decode { .. } => "session error".to_owned(),
            other => other.to_string(),
        };
        let mut response = (status, body).into_response();
        if let SessionError::Unavailable(e) = &self {
            let secs = e.retry_after().map_or(1, |d| d.as_secs().max(1));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
