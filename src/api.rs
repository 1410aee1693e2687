//! The REST API: an HTTP/1.1 server (hyper, with axum's router: keep-alive, chunked
//! bodies) in front of the engine. It checks the `Key` header in constant time before it
//! reads anything of the body, and hands each request but GETs to the single writer thread,
//! which answers through a oneshot channel. GETs are answered from the latest snapshot
//! the writer published ([`crate::read`]): reads never wait for writes.
//!
//! Strangers cannot hurt it: an unauthenticated request is answered 401 and its
//! connection closed without its body being read; every connection is tracked (reading a
//! request header / handling a request / idle) with a header timeout, an idle timeout and
//! a body deadline; their number is bounded by the open-file limit, and at the bound the
//! oldest connection that has not sent a complete request header makes room for a new
//! one. Refused keys and the connection limit are logged at most once a second (resp.
//! every ten seconds) with counts.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::engine::{Reply, Request};
use crate::read::Reads;

/// Largest accepted request body: a 1,000,000-entry blacklist is about 30 MB, 100,000
/// farms of 8 backends about 67 MB.
pub const MAX_BODY: usize = 256 * 1024 * 1024;

/// A client must send a complete request header within this time of connecting (or of
/// the first byte of its next request on a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive connection with no request and no traffic for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// An authorised request's body must arrive within this grace plus one second per
/// [`BODY_MIN_RATE`] bytes (announced by Content-Length, or received so far when
/// chunked): 266 s for the largest body.
pub const BODY_GRACE: Duration = Duration::from_secs(10);
/// See [`BODY_GRACE`]: bytes per second.
pub const BODY_MIN_RATE: u64 = 1024 * 1024;
/// After SIGTERM, requests being handled get this long to finish (the process exits
/// within [`SHUTDOWN_DEADLINE`]).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);
/// After SIGTERM the process exits within this time, whatever its clients do.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);
/// At most this many API connections, whatever the open-file limit.
pub const MAX_CONNECTIONS: usize = 4096;
/// File descriptors kept for the daemon itself (netlink sockets, libnftables, the state
/// file and journal, syslog, `nft` pipes) below the open-file limit.
pub const FD_HEADROOM: usize = 64;
/// Largest request header (request line included); larger ones get 431.
const MAX_HEADER: usize = 16 * 1024;

/// A request for the writer thread with the channel for its answer.
pub type Job = (Request, oneshot::Sender<Reply>);

struct App {
    key: Vec<u8>,
    writer: mpsc::Sender<Job>,
    reads: Reads,
}

/// Builds the router: every path goes to one handler that follows nftlb's URL grammar.
/// Serve it with [`serve`] (the handler needs the client address it adds).
pub fn router(key: String, writer: mpsc::Sender<Job>, reads: Reads) -> Router {
    let app = Arc::new(App {
        key: key.into_bytes(),
        writer,
        reads,
    });
    Router::new().fallback(handle).with_state(app)
}

fn json(status: u16, body: String) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// An answer after which the connection is closed (the body was not, or not fully, read).
fn closing(status: u16, msg: &str) -> Response {
    let mut r = json(
        status,
        format!(
            "{{\"response\": {}}}",
            serde_json::to_string(msg).expect("strings serialise")
        ),
    );
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

async fn handle(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The key first: an unauthenticated request's body is never read, and its
    // connection is closed.
    let given = headers.get("key").map(|v| v.as_bytes()).unwrap_or(b"");
    if !bool::from(given.ct_eq(&app.key)) {
        refused_key(peer.ip());
        let mut r = StatusCode::UNAUTHORIZED.into_response();
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return r;
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
    let body = match read_body(&headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    // Reads never wait for writes.
    if method == Method::GET {
        return app.reads.respond(uri.path()).await;
    }
    let (tx, rx) = oneshot::channel();
    let req = Request {
        method: method.as_str().to_string(),
        path: uri.path().to_string(),
        body,
    };
    if app.writer.send((req, tx)).await.is_err() {
        return json(500, r#"{"response": "the writer has stopped"}"#.into());
    }
    match rx.await {
        Ok(reply) => json(reply.status, reply.body),
        Err(_) => json(500, r#"{"response": "the writer has stopped"}"#.into()),
    }
}

/// Reads an authorised request's body: at most [`MAX_BODY`] bytes (413), within the
/// deadline of [`BODY_GRACE`] (408).
async fn read_body(headers: &HeaderMap, mut body: Body) -> Result<Vec<u8>, Response> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let too_large = || {
        closing(
            413,
            &format!("the request body is larger than the limit of {MAX_BODY} bytes"),
        )
    };
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let start = tokio::time::Instant::now();
    let mut out = Vec::with_capacity(announced.unwrap_or(0) as usize);
    loop {
        let expected = announced.unwrap_or(0).max(out.len() as u64);
        let deadline = start + BODY_GRACE + Duration::from_secs(expected / BODY_MIN_RATE);
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
        match tokio::time::timeout_at(deadline, frame).await {
            Err(_) => {
                return Err(closing(
                    408,
                    &format!(
                        "the request body did not arrive in time ({} bytes in {} s; the limit is {} s plus 1 s per {} bytes)",
                        out.len(),
                        start.elapsed().as_secs(),
                        BODY_GRACE.as_secs(),
                        BODY_MIN_RATE
                    ),
                ))
            }
            Ok(None) => return Ok(out),
            Ok(Some(Err(e))) => {
                return Err(closing(400, &format!("cannot read the request body: {e}")))
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > MAX_BODY {
                        return Err(too_large());
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Rate-limited warnings

/// Requests refused for their key since the last line, per client address.
struct Refused {
    last: Option<Instant>,
    total: u64,
    /// The first few client addresses with their counts; the rest are only counted.
    clients: Vec<(IpAddr, u64)>,
}

const REFUSED_CLIENTS: usize = 8;
static REFUSED: Mutex<Refused> = Mutex::new(Refused {
    last: None,
    total: 0,
    clients: Vec::new(),
});

/// Counts a request refused for its key; logs at most one line a second.
fn refused_key(ip: IpAddr) {
    let mut r = REFUSED.lock().unwrap_or_else(|e| e.into_inner());
    r.total += 1;
    if let Some((_, n)) = r.clients.iter_mut().find(|(a, _)| *a == ip) {
        *n += 1;
    } else if r.clients.len() < REFUSED_CLIENTS {
        r.clients.push((ip, 1));
    }
    if r.last
        .map_or(true, |l| l.elapsed() >= Duration::from_secs(1))
    {
        flush_refused(&mut r);
    }
}

fn flush_refused(r: &mut Refused) {
    if r.total == 0 {
        return;
    }
    let listed: u64 = r.clients.iter().map(|(_, n)| n).sum();
    let mut clients = r
        .clients
        .iter()
        .map(|(a, n)| format!("{a} ({n})"))
        .collect::<Vec<_>>()
        .join(", ");
    if listed < r.total {
        clients += &format!(", others ({})", r.total - listed);
    }
    let since = r
        .last
        .map(|l| format!(" (in the last {:.1} s)", l.elapsed().as_secs_f64()))
        .unwrap_or_default();
    tracing::warn!(
        refused = r.total,
        %clients,
        "requests refused: wrong or missing key{since}"
    );
    r.total = 0;
    r.clients.clear();
    r.last = Some(Instant::now());
}

/// Connections closed or refused at the connection limit since the last line.
struct AtLimit {
    last: Option<Instant>,
    evicted: u64,
    refused: u64,
    limit: usize,
}

static AT_LIMIT: Mutex<AtLimit> = Mutex::new(AtLimit {
    last: None,
    evicted: 0,
    refused: 0,
    limit: 0,
});
const AT_LIMIT_EVERY: Duration = Duration::from_secs(10);

fn at_limit(limit: usize, evicted: bool) {
    let mut a = AT_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    a.limit = limit;
    if evicted {
        a.evicted += 1;
    } else {
        a.refused += 1;
    }
    if a.last.map_or(true, |l| l.elapsed() >= AT_LIMIT_EVERY) {
        flush_at_limit(&mut a);
    }
}

fn flush_at_limit(a: &mut AtLimit) {
    if a.evicted + a.refused == 0 {
        return;
    }
    tracing::warn!(
        limit = a.limit,
        evicted = a.evicted,
        refused = a.refused,
        "API connection limit reached: closed the oldest connections that had not sent a complete request header to serve new ones (evicted), refused new ones when every connection was handling a request (refused)"
    );
    a.evicted = 0;
    a.refused = 0;
    a.last = Some(Instant::now());
}

/// Writes what the rate-limited warnings hold back, once their interval has passed.
fn flush_warnings() {
    let mut r = REFUSED.lock().unwrap_or_else(|e| e.into_inner());
    if r.last
        .map_or(true, |l| l.elapsed() >= Duration::from_secs(1))
    {
        flush_refused(&mut r);
    }
    drop(r);
    let mut a = AT_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    if a.last.map_or(true, |l| l.elapsed() >= AT_LIMIT_EVERY) {
        flush_at_limit(&mut a);
    }
}

// ---------------------------------------------------------------------------
// Connections

/// The connection limit: the open-file limit (its soft value first raised to the hard
/// one) less [`FD_HEADROOM`], at most [`MAX_CONNECTIONS`]. Returns (limit, open files).
pub fn connection_limit() -> (usize, u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            let mut raised = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                // An unlimited hard limit is above fs.nr_open.
                let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(rl.rlim_cur);
                raised.rlim_cur = nr_open.min(rl.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &raised);
            }
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        }
    }
    let nofile = rl.rlim_cur;
    let n = usize::try_from(nofile).unwrap_or(usize::MAX);
    let limit = if n > 2 * FD_HEADROOM {
        n - FD_HEADROOM
    } else {
        n / 2
    };
    (limit.clamp(1, MAX_CONNECTIONS), nofile)
}

/// A new connection, or an idle one: waiting for (the first byte of) a request header.
const IDLE: u8 = 0;
/// Reading a request header.
const HEADER: u8 = 1;
/// Handling a request: its body, the writer, the response.
const BUSY: u8 = 2;

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One connection's state, shared by its task, its socket wrapper, its responses and
/// the registry.
struct Conn {
    id: u64,
    state: AtomicU8,
    /// When the state began (IDLE: the last traffic), in ms from [`now_ms`]'s epoch.
    since: AtomicU64,
    /// Requests started on this connection: a response only marks the connection idle
    /// if no later request started.
    requests: AtomicU64,
    kill: Notify,
    killed: AtomicBool,
}

impl Conn {
    fn set(&self, state: u8) {
        self.since.store(now_ms(), Ordering::Relaxed);
        self.state.store(state, Ordering::Release);
    }
    /// Not sending a complete request header: may be evicted.
    fn evictable(&self) -> bool {
        self.state.load(Ordering::Acquire) != BUSY
    }
    /// When the connection times out in its state (None: handling a request).
    fn deadline(&self) -> Option<u64> {
        let since = self.since.load(Ordering::Relaxed);
        match self.state.load(Ordering::Acquire) {
            HEADER => Some(since + HEADER_TIMEOUT.as_millis() as u64),
            IDLE => Some(since + IDLE_TIMEOUT.as_millis() as u64),
            _ => None,
        }
    }
    fn on_read(&self) {
        if self.state.load(Ordering::Acquire) == IDLE {
            let _ = self
                .state
                .compare_exchange(IDLE, HEADER, Ordering::AcqRel, Ordering::Relaxed);
            self.since.store(now_ms(), Ordering::Relaxed);
        }
    }
    fn on_write(&self) {
        if self.state.load(Ordering::Acquire) == IDLE {
            self.since.store(now_ms(), Ordering::Relaxed);
        }
    }
}

/// The open connections.
struct Registry {
    limit: usize,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    emptied: Notify,
}

impl Registry {
    /// Registers a new connection. At the limit, first tells the oldest connection that
    /// has not sent a complete request header to close; None if every connection is
    /// handling a request.
    fn admit(&self) -> Option<Arc<Conn>> {
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= self.limit {
            let victim = m
                .values()
                .filter(|c| c.evictable())
                .min_by_key(|c| c.since.load(Ordering::Relaxed))
                .map(|c| c.id);
            let Some(id) = victim else {
                drop(m);
                at_limit(self.limit, false);
                return None;
            };
            if let Some(c) = m.remove(&id) {
                c.killed.store(true, Ordering::Release);
                c.kill.notify_one();
            }
            at_limit(self.limit, true);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(Conn {
            id,
            state: AtomicU8::new(HEADER),
            since: AtomicU64::new(now_ms()),
            requests: AtomicU64::new(0),
            kill: Notify::new(),
            killed: AtomicBool::new(false),
        });
        m.insert(id, c.clone());
        Some(c)
    }

    fn remove(&self, id: u64) {
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(&id);
        if m.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn busy(&self) -> usize {
        let m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        m.values().filter(|c| !c.evictable()).count()
    }
}

/// The socket, noting traffic in the connection's state.
struct Tracked {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.on_read();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.on_write();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.on_write();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that marks its connection idle once it is sent (or dropped).
struct Done {
    inner: Body,
    conn: Arc<Conn>,
    request: u64,
}

impl HttpBody for Done {
    type Data = Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if self.conn.requests.load(Ordering::Acquire) == self.request {
            self.conn.set(IDLE);
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then gives the requests
/// being handled [`SHUTDOWN_GRACE`] to finish and closes every other connection.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limit: usize,
    shutdown: impl Future<Output = ()>,
) {
    let reg = Arc::new(Registry {
        limit,
        next: AtomicU64::new(0),
        conns: Mutex::new(HashMap::new()),
        emptied: Notify::new(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let ticker = tokio::spawn(async {
        let mut t = tokio::time::interval(Duration::from_millis(250));
        loop {
            t.tick().await;
            flush_warnings();
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true).max_header_size(MAX_HEADER);
    let http = Arc::new(http);
    let mut accept_errors = 0u64;
    let mut last_accept_error: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(conn) = reg.admit() else {
                    continue;
                };
                tokio::spawn(serve_conn(
                    stream,
                    peer,
                    conn,
                    reg.clone(),
                    router.clone(),
                    http.clone(),
                    stop_rx.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors or memory: wait a little rather than spin.
                accept_errors += 1;
                if last_accept_error.map_or(true, |l| l.elapsed() >= AT_LIMIT_EVERY) {
                    tracing::error!(count = accept_errors, "cannot accept API connections: {e}");
                    accept_errors = 0;
                    last_accept_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let grace = tokio::time::sleep(SHUTDOWN_GRACE);
    tokio::pin!(grace);
    loop {
        let emptied = reg.emptied.notified();
        if reg.len() == 0 {
            break;
        }
        tokio::select! {
            _ = emptied => {}
            _ = &mut grace => {
                tracing::warn!(
                    busy = reg.busy(),
                    "requests still being handled after {} s; not waiting for them",
                    SHUTDOWN_GRACE.as_secs()
                );
                break;
            }
        }
    }
    ticker.abort();
    flush_warnings();
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    conn: Arc<Conn>,
    reg: Arc<Registry>,
    router: Router,
    http: Arc<hyper::server::conn::http1::Builder>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let io = hyper_util::rt::TokioIo::new(Tracked {
        inner: stream,
        conn: conn.clone(),
    });
    let c = conn.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let request = c.requests.fetch_add(1, Ordering::AcqRel) + 1;
        c.set(BUSY);
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        let fut = tower_service::Service::call(&mut router.clone(), req);
        let conn = c.clone();
        async move {
            let resp = match fut.await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            Ok::<_, Infallible>(resp.map(|inner| {
                Body::new(Done {
                    inner,
                    conn,
                    request,
                })
            }))
        }
    });
    let served = http.serve_connection(io, svc);
    tokio::pin!(served);
    let mut stopping = false;
    loop {
        if conn.killed.load(Ordering::Acquire) {
            break;
        }
        let wake = conn.deadline().unwrap_or(now_ms() + 1000);
        let wake =
            tokio::time::Instant::now() + Duration::from_millis(wake.saturating_sub(now_ms()));
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "API connection: {e}");
                }
                break;
            }
            _ = conn.kill.notified() => {
                tracing::debug!(%peer, "API connection closed to make room (connection limit)");
                break;
            }
            _ = tokio::time::sleep_until(wake) => {
                if conn.deadline().is_some_and(|d| d <= now_ms()) {
                    let what = if conn.state.load(Ordering::Acquire) == HEADER {
                        "no complete request header"
                    } else {
                        "idle"
                    };
                    tracing::debug!(%peer, "API connection closed: {what} (timeout)");
                    break;
                }
            }
            _ = stop.changed(), if !stopping => {
                // Shutting down: a connection in the middle of a request header is
                // closed now; hyper closes an idle one once its last response is sent,
                // and a busy one once its request is answered (the server's grace
                // bounds both).
                if conn.state.load(Ordering::Acquire) == HEADER {
                    break;
                }
                stopping = true;
                served.as_mut().graceful_shutdown();
            }
        }
    }
    reg.remove(conn.id);
}
