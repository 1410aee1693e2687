//! The REST API: an HTTP server (axum/hyper: keep-alive, chunked bodies) in front of the
//! engine. It checks the `Key` header in constant time and hands each request to the
//! single writer thread, which answers through a oneshot channel.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Reply, Request};

/// Largest accepted request body: a 1,000,000-entry blacklist is about 30 MB, 100,000
/// farms of 8 backends about 67 MB.
pub const MAX_BODY: usize = 256 * 1024 * 1024;

/// A request for the writer thread with the channel for its answer.
pub type Job = (Request, oneshot::Sender<Reply>);

struct App {
    key: Vec<u8>,
    writer: mpsc::Sender<Job>,
}

/// Builds the router: every path goes to one handler that follows nftlb's URL grammar.
pub fn router(key: String, writer: mpsc::Sender<Job>) -> Router {
    let app = Arc::new(App {
        key: key.into_bytes(),
        writer,
    });
    Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

fn json(status: u16, body: String) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let given = headers.get("key").map(|v| v.as_bytes()).unwrap_or(b"");
    if !bool::from(given.ct_eq(&app.key)) {
        tracing::warn!(%method, path = %uri.path(), "request with a wrong or missing key");
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if !matches!(
        method,
        Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        return json(
            400,
            r#"{"response": "invalid request. unsupported method"}"#.into(),
        );
    }
    let (tx, rx) = oneshot::channel();
    let req = Request {
        method: method.as_str().to_string(),
        path: uri.path().to_string(),
        // Without a copy when the body is one buffer (as a large body is).
        body: Vec::from(body),
    };
    if app.writer.send((req, tx)).await.is_err() {
        return json(500, r#"{"response": "the writer has stopped"}"#.into());
    }
    match rx.await {
        Ok(reply) => json(reply.status, reply.body),
        Err(_) => json(500, r#"{"response": "the writer has stopped"}"#.into()),
    }
}
