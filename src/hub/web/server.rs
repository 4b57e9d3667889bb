//! The HTTP server loop: accepts connections and serves the router over
//! HTTP/1.1 with the limits that keep the hub alive on a network (see
//! [`Limits`]), and stops gracefully. Owns connections, not requests: it
//! must not look into what is served.
//!
//! * A connection that does not send a whole request head within
//!   `header_read_timeout` (a silent or half-open socket, a slowloris, an
//!   idle keep-alive) is closed by hyper's header-read timer
//!   (`hyper-1.12.0/src/proto/h1/conn.rs`, `poll_read_head`, which arms it
//!   for every head, the first one included).
//! * A connection on which nothing is read or written for `idle_timeout`
//!   (a stalled body, a stream whose reader stopped reading) is closed.
//! * At most `max_connections` are served at once; one more gets a plain
//!   `503` and is closed, so a flood of sockets cannot use up the hub's
//!   file descriptors. Accept errors (out of descriptors) are logged at
//!   most once a second, then the loop backs off briefly.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

/// The limits of the web server. [`Default`] is what the hub uses.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed for a whole request head, from the moment the server
    /// waits for it.
    pub header_read_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    /// Longer than the longest `?wait=` (60 s) and than the stream's
    /// keep-alive (15 s).
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Open `GET /api/stream` answers at once.
    pub max_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 1024,
            max_streams: 256,
        }
    }
}

/// The client's address, put into every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// What a connection over the cap is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
connection: close\r\ncontent-length: 62\r\n\r\nthe hub is serving too many connections; try again in a while\n";

/// Serves `app` on `listener` until `shutdown` completes; then stops
/// accepting, asks every connection to finish its request in flight, and
/// returns when they are all closed.
pub async fn run(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(());
    let mut refused: u64 = 0;
    let mut last_warn: Option<Instant> = None;
    let warn_now = |last: &mut Option<Instant>| {
        let now = Instant::now();
        let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            *last = Some(now);
        }
        due
    };
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if warn_now(&mut last_warn) {
                        tracing::warn!("web: cannot accept a connection: {e}; backing off");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let (app, stop, done) = (app.clone(), stop_rx.clone(), done_rx.clone());
                tokio::spawn(async move {
                    connection(tcp, peer, app, limits, stop).await;
                    drop(permit);
                    drop(done);
                });
            }
            Err(_) => {
                refused += 1;
                if warn_now(&mut last_warn) {
                    tracing::warn!(
                        "web: {} connections open (the cap); refusing {peer} with 503 ({refused} refused so far)",
                        limits.max_connections
                    );
                }
                tokio::spawn(refuse(tcp));
            }
        }
    }
    drop(listener);
    stop_tx.send_replace(true);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// Tells a connection over the cap why, and closes it.
async fn refuse(mut tcp: TcpStream) {
    use tokio::io::AsyncWriteExt;
    // A client that does not read its 503 within a second is not waited for.
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(BUSY)).await;
}

async fn connection(tcp: TcpStream, peer: SocketAddr, app: Router, limits: Limits, mut stop: watch::Receiver<bool>) {
    let activity = Activity::new();
    let io = TokioIo::new(Watched { inner: tcp, activity: activity.clone() });
    let service = app.map_request(move |req: Request<Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(Peer(peer));
        req
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("web: connection from {peer} ended: {e}");
                }
                return;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = activity.idle_for(limits.idle_timeout) => {
                tracing::debug!("web: closing the connection from {peer}: nothing sent or received for {:?}", limits.idle_timeout);
                return;
            }
        }
    }
}

/// When a connection last moved a byte.
#[derive(Clone)]
struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity { start: Instant::now(), last_ms: Arc::new(AtomicU64::new(0)) }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A socket that records its activity.
struct Watched {
    inner: TcpStream,
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
