//! The accept loop: hyper (HTTP/1.1) with a timer, a connection cap, header-read and idle
//! timeouts. (`axum::serve` runs hyper without a timer: no timeout at all.)
//!
//! * At most `--max-connections` connections are served. Beyond that, a small reserve
//!   ([`spare`] connections) is served by the probes only (`/healthz`, `/metrics`; every
//!   other path is `503`), without keep-alive and with a one-second header timeout, so that a
//!   probe still gets its answer while the cap is reached; a connection beyond the reserve
//!   is closed at once. The process never runs out of file descriptors to its clients.
//! * A connection that has sent part of a request head must complete it within
//!   `--header-timeout`; a connection with no request in progress is closed after
//!   `--idle-timeout` without a byte. The body's own deadline is `--body-timeout` (the edge).
//! * Shutdown: stop accepting, ask every connection to finish its request in progress and
//!   close; the future ends when every connection is closed.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

/// Connection limits (the `serve` flags).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Connections served by the probes only once `max` are open.
pub(super) fn spare(max: usize) -> usize {
    (max / 16).clamp(1, 64)
}

/// Serves `app` on `listener` until `stop` turns true, then waits for the open connections.
pub(super) async fn serve(
    listener: TcpListener,
    app: axum::Router,
    probes: axum::Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let full = Arc::new(Semaphore::new(limits.max_connections));
    let reserve = spare(limits.max_connections);
    let spare_slots = Arc::new(Semaphore::new(reserve));
    let spare_limits = Limits {
        max_connections: reserve,
        header_timeout: limits.header_timeout.min(Duration::from_secs(1)),
        idle_timeout: limits.idle_timeout.min(Duration::from_secs(1)),
    };
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: the connection cap should prevent them; back off
                // rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Ok(permit) = Arc::clone(&full).try_acquire_owned() {
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move {
                connection(stream, app, limits, true, stop).await;
                drop(permit);
            });
        } else if let Ok(permit) = Arc::clone(&spare_slots).try_acquire_owned() {
            metrics::counter!("provider_budgets_http_connections_over_cap_total").increment(1);
            let (probes, stop) = (probes.clone(), stop.clone());
            tokio::spawn(async move {
                connection(stream, probes, spare_limits, false, stop).await;
                drop(permit);
            });
        } else {
            metrics::counter!("provider_budgets_http_connections_refused_total").increment(1);
            drop(stream);
        }
    }
    drop(listener);
    // Every permit back: every connection closed.
    let _all = full.acquire_many(limits.max_connections as u32).await;
    let _spare = spare_slots.acquire_many(reserve as u32).await;
}

/// What a connection is doing, for its watchdog.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Requests handed to the router and not answered yet.
    busy: AtomicUsize,
    /// When the connection last became idle (ms since `start`).
    idle_since: AtomicU64,
    /// When the first byte of a request head arrived while idle (ms), or [`NONE`].
    head_since: AtomicU64,
    changed: Notify,
}

const NONE: u64 = u64::MAX;

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn read(&self, n: usize) {
        if n > 0
            && self.busy.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Acquire) == NONE
        {
            self.head_since.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NONE, Ordering::Release);
        Busy(Arc::clone(self))
    }

    /// Resolves when the connection has been idle or sending a head for too long.
    async fn expired(&self, limits: Limits) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE / 2);
        loop {
            let deadline = if self.busy.load(Ordering::Acquire) > 0 {
                None
            } else {
                match self.head_since.load(Ordering::Acquire) {
                    NONE => Some(self.idle_since.load(Ordering::Acquire) + ms(limits.idle_timeout)),
                    t => Some(t + ms(limits.header_timeout)),
                }
            };
            let notified = self.changed.notified();
            match deadline {
                None => notified.await,
                Some(d) => {
                    let now = self.now_ms();
                    if now >= d {
                        return;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(d - now)) => {}
                        () = notified => {}
                    }
                }
            }
        }
    }
}

/// A request in progress; its drop makes the connection idle again (when it was the last).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now_ms(), Ordering::Release);
        if a.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.changed.notify_one();
        }
    }
}

/// The socket, telling [`Activity`] about the bytes it reads.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.activity.read(buf.filled().len() - before);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serves one connection until it closes, times out, or shutdown has let it finish.
async fn connection(
    stream: TcpStream,
    app: axum::Router,
    limits: Limits,
    keep_alive: bool,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let router = TowerToHyperService::new(app);
    let tracked = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let busy = tracked.begin();
        let answer = router.call(request);
        async move {
            let r = answer.await;
            drop(busy);
            r
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(keep_alive)
        // A backstop: hyper's timer starts when it waits for a head, idle time included.
        .header_read_timeout(limits.idle_timeout + limits.header_timeout);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = activity.expired(limits) => {
                metrics::counter!("provider_budgets_http_connections_timed_out_total").increment(1);
                tracing::debug!("closing an idle connection or one slow to send its request head");
                return; // dropping the connection closes the socket
            }
        }
    }
}
