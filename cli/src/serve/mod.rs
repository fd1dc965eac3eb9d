//! `provider-budgets serve`: the HTTP sidecar, axum on tokio.
//!
//! Routes (JSON; contract in `docs/guide/sidecar.md`):
//!
//! * `POST /v1/filter`, `POST /v1/spend` (and `/v1/spend/batch`, module `batch`), `GET /metrics`, `GET /healthz`,
//!   `POST /v1/reload`, `POST /v1/reserve`, `POST /v1/commit`, `POST /v1/release`,
//!   `POST /v1/adjust` (corrections, module `adjust`), `GET /v1/budgets` and the runtime
//!   budgets `PUT`/`GET`/`DELETE /v1/budgets/{scope}/{name}` (module `budgets`), `GET /` (the
//!   status page, module `page`).
//!
//! Design:
//!
//! * The handlers call the library's [`Limiter`] directly: filter and non-durable spend touch
//!   memory only; a durable spend awaits the journal's group commit without blocking a worker.
//! * Bounded concurrency: at most `--max-in-flight` requests are inside the handlers; one more
//!   is answered `503` with `Retry-After: 1` at once (no queue in front of the limiter).
//! * Bodies over [`BODY_LIMIT`] are refused with `413` before they are parsed.
//! * Metrics: the library emits through the `metrics` facade; this module installs the
//!   Prometheus recorder (the only place that depends on the exporter) and renders it.
//! * Shutdown on SIGTERM/SIGINT: stop accepting, let in-flight requests finish (at most
//!   `--drain-timeout`), flush the journal; the caller then shuts the limiter down (final
//!   flush and last sync round). Every durable spend answered `200` was fsynced before.
//! * Reload on SIGHUP or `POST /v1/reload`: the config is read again through the caller's
//!   loader and applied with [`Limiter::reload`]; a bad config is refused, the old one stays.
//! * Idempotency across a restart: before it listens, the sidecar seeds its key table and its
//!   ended reservations from the records the library keeps on disk with the spends they
//!   guard ([`Limiter::idempotency_records`]; module `idempotency`).

mod adjust;
mod alerts;
mod api;
mod batch;
mod budgets;
mod edge;
mod forecast;
mod idempotency;
mod identity;
mod listen;
mod metrics;
mod money;
mod page;
mod ratelimit;
mod reserve;
mod usage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use provider_budgets::{Config, Limiter};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Arguments of `provider-budgets serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port; the address is printed on stdout).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8787",
        env = "PROVIDER_BUDGETS_LISTEN"
    )]
    pub listen: SocketAddr,
    /// Requests handled at once; one more is answered 503 at once.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_in_flight: u32,
    /// Reservations (`POST /v1/reserve`) held open at once; one more is answered 503 (each
    /// holds money and a little memory until its commit, release or expiry).
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_open_reservations: u32,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = provider_budgets::parse_duration)]
    pub drain_timeout: Duration,
    /// How long a client may take to send a request's body (408 after). The body is read
    /// before the request takes one of the --max-in-flight permits.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = positive_duration)]
    pub body_timeout: Duration,
    /// How long a client may take to send a request's head once it has started (the
    /// connection is closed after).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = positive_duration)]
    pub header_timeout: Duration,
    /// How long a connection with no request in progress stays open.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = positive_duration)]
    pub idle_timeout: Duration,
    /// Connections served at once. A few more (1/16, at most 64) get the probes only
    /// (`/healthz`, `/metrics`; 503 otherwise); beyond those a connection is closed at once.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Bearer token file: every /v1/* request then needs `Authorization: Bearer TOKEN`
    /// (default: the PROVIDER_BUDGETS_AUTH_TOKEN variable; neither: no authentication, which
    /// only a loopback --listen address allows).
    #[arg(long, value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Serve a non-loopback --listen address without a token.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Apply a reload whose config has no budget (by default refused: an empty or
    /// half-written file would drop every budget).
    #[arg(long)]
    pub allow_empty: bool,
    /// Test hook (hidden): after the fsync of a keyed spend or of a reservation's end, print
    /// `fsynced KEY` on stdout and never answer, so that a crash test kills the sidecar in
    /// the window between the fsync and the answer deterministically.
    #[arg(long, hide = true)]
    pub testing_pause_after_fsync: bool,
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    match provider_budgets::parse_duration(text)? {
        d if d.is_zero() => Err("must be more than 0".to_owned()),
        d => Ok(d),
    }
}

/// Why the sidecar could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The tokio runtime or a signal handler could not be set up.
    #[error("cannot start the server runtime: {0}")]
    Runtime(std::io::Error),
    /// The Prometheus recorder could not be installed (another one is installed).
    #[error("cannot install the Prometheus metrics recorder: {0}")]
    Metrics(String),
    /// The server stopped on an I/O error.
    #[error("server error: {0}")]
    Server(std::io::Error),
    /// The final flush failed.
    #[error("final flush: {0}")]
    Flush(#[from] provider_budgets::StoreError),
    /// The idempotency records could not be read from the data dir.
    #[error("cannot read the stored idempotency keys: {0}")]
    Keys(provider_budgets::StoreError),
    /// The flags do not allow starting (a token file that cannot be used, no token on a
    /// non-loopback address).
    #[error("{0}")]
    Setup(String),
}

/// Reads the config again (the CLI's loader: file plus command-line overrides).
pub type Loader<'a> = &'a (dyn Fn() -> Result<Config, String> + Sync);

/// Where the config comes from: the `--config` file and its loader.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    /// The file (named by a refused change of a budget it defines).
    pub path: &'a std::path::Path,
    /// Reads it again (reloads).
    pub loader: Loader<'a>,
}

/// A reload request from `POST /v1/reload` (`allow_empty`), answered by the main loop.
type ReloadRequest = (
    bool,
    oneshot::Sender<Result<provider_budgets::ReloadSummary, String>>,
);

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct State {
    pub limiter: Limiter,
    pub keys: idempotency::Keys,
    pub metrics: metrics::Exporter,
    pub permits: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub reload: mpsc::Sender<ReloadRequest>,
    /// Open and recently ended reservations of `/v1/reserve`, `/v1/commit`, `/v1/release`.
    pub reservations: reserve::Table,
    /// Auth, content type, host and body checks in front of the admission.
    pub edge: edge::Edge,
    /// `serve --testing-pause-after-fsync` ([`State::after_fsync`]).
    pub pause_after_fsync: bool,
    /// The `--config` file: a refused change of a budget it defines names it.
    pub config_path: PathBuf,
}

impl State {
    /// Called after the fsync of a keyed spend or of a reservation's end, before the answer.
    /// Does nothing unless the hidden test flag is set; then prints `fsynced KEY` and never
    /// returns (pending forever, no timer): the test SIGKILLs the sidecar in that window.
    pub(crate) async fn after_fsync(&self, key: &str) {
        if !self.pause_after_fsync {
            return;
        }
        {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "fsynced {key}").and_then(|()| out.flush());
        }
        std::future::pending::<()>().await;
    }
}

/// What `serve` sets up before the limiter is opened: the runtime, the signal handlers
/// (SIGHUP or SIGTERM while the limiter opens is queued, not fatal) and the edge's
/// settings (a bad token file fails before anything is opened).
pub struct Prepared {
    runtime: tokio::runtime::Runtime,
    signals: Signals,
    edge: edge::Edge,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("edge", &self.edge)
            .finish()
    }
}

/// Checks the flags, builds the runtime and installs the signal handlers.
///
/// # Errors
///
/// [`ServeError::Setup`] for the flags, [`ServeError::Runtime`] for the runtime or signals.
pub fn prepare(args: &ServeArgs) -> Result<Prepared, ServeError> {
    let edge = edge::Edge::new(
        args.listen,
        args.auth_token_file.as_deref(),
        args.insecure_no_auth,
        args.body_timeout,
    )
    .map_err(ServeError::Setup)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("provider-budgets-serve")
        .build()
        .map_err(ServeError::Runtime)?;
    let signals = runtime
        .block_on(async { Signals::new() })
        .map_err(ServeError::Runtime)?;
    Ok(Prepared {
        runtime,
        signals,
        edge,
    })
}

/// Runs the sidecar until SIGTERM/SIGINT, then drains and flushes. The caller shuts the
/// limiter down afterwards (the CLI does, for every command).
///
/// # Errors
///
/// [`ServeError`]: the address cannot be bound, the runtime or the metrics recorder cannot
/// be set up, the server fails, or the final flush fails.
pub fn run(
    prepared: Prepared,
    limiter: &Limiter,
    args: &ServeArgs,
    config: Source<'_>,
) -> Result<(), ServeError> {
    let exporter = metrics::Exporter::install().map_err(ServeError::Metrics)?;
    let Prepared {
        runtime,
        signals,
        edge,
    } = prepared;
    runtime.block_on(serve(limiter, args, config, exporter, signals, edge))?;
    // In-flight work that outlived the drain timeout is dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    limiter.flush()?;
    Ok(())
}

async fn serve(
    limiter: &Limiter,
    args: &ServeArgs,
    config: Source<'_>,
    exporter: metrics::Exporter,
    mut signals: Signals,
    edge: edge::Edge,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(ServeError::Runtime)?;
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(16);
    let (keys, reservations) = restore_keys(limiter, args)?;
    let state = Arc::new(State {
        limiter: limiter.clone(),
        keys,
        metrics: exporter,
        permits: Arc::new(Semaphore::new(args.max_in_flight as usize)),
        max_in_flight: args.max_in_flight as usize,
        reload: reload_tx,
        reservations,
        edge,
        pause_after_fsync: args.testing_pause_after_fsync,
        config_path: config.path.to_path_buf(),
    });
    let _forecast = start_alerts(limiter);
    let loader = config.loader;
    let app = router(Arc::clone(&state));
    let probes = probes_only(state);
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = listen::Limits {
        max_connections: args.max_connections as usize,
        header_timeout: args.header_timeout,
        idle_timeout: args.idle_timeout,
    };
    let mut server = tokio::spawn(listen::serve(listener, app, probes, limits, stop_rx));
    announce(local);
    // Where `status` finds us while we hold the data dir; gone when we stop.
    let _url_file = UrlFile::write(limiter, local);
    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop(name) => {
                    tracing::info!(target: "provider_budgets::lifecycle", signal = name, "shutting down: draining in-flight requests, then flushing");
                    break;
                }
                Signal::Reload => {
                    match reload(limiter, loader, args.allow_empty) {
                        Ok(r) => tracing::info!(budgets = r.budgets, "config reloaded (SIGHUP)"),
                        Err(e) => tracing::error!(error = %e, "config reload refused (SIGHUP); the old config stays"),
                    }
                }
            },
            Some((allow_empty, reply)) = reload_rx.recv() => {
                // The answer goes over HTTP: no value from the environment in it.
                let result = reload(limiter, loader, args.allow_empty || allow_empty)
                    .map_err(|e| edge::redact_env(&e));
                let _ = reply.send(result);
            }
            done = &mut server => {
                // The accept loop only ends on its own by a panic.
                return match done {
                    Ok(()) => Ok(()),
                    Err(e) => Err(ServeError::Server(std::io::Error::other(e))),
                };
            }
        }
    }
    let _ = stop_tx.send(true);
    drain(server, args.drain_timeout).await
}

/// Webhook delivery (the soft-limit callback feeds the outbox) and the forecast task. The
/// alerts section is read at start; a reload keeps it.
fn start_alerts(limiter: &Limiter) -> AbortOnDrop {
    let config = limiter.config();
    let alerts = alerts::Alerts::start(&config.alerts, config.storage.dir.as_deref());
    if alerts.enabled() {
        let a = alerts.clone();
        limiter.on_soft_limit(move |e| a.send(alerts::Alert::soft_limit(e)));
    }
    AbortOnDrop(tokio::spawn(forecast::run(
        limiter.clone(),
        alerts,
        config.alerts.lead_time,
    )))
}

/// A background task stopped when the server stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The key table and the reservation table, seeded from the idempotency records on disk
/// (keyed spends and remembered reservation ends of the runs before), before serving.
fn restore_keys(
    limiter: &Limiter,
    args: &ServeArgs,
) -> Result<(idempotency::Keys, reserve::Table), ServeError> {
    let records = limiter.idempotency_records().map_err(ServeError::Keys)?;
    let now = limiter.now();
    let age =
        |at: jiff::Timestamp| Duration::try_from(now.duration_since(at)).unwrap_or(Duration::ZERO);
    let mut spends = Vec::new();
    let mut ends = Vec::new();
    for r in records {
        match r.what {
            provider_budgets::Remembered::Spend { fingerprint } => {
                spends.push((r.key, fingerprint, age(r.at)));
            }
            what => ends.push((r.key, what, age(r.at))),
        }
    }
    let keys = idempotency::Keys::default();
    let reservations = reserve::Table::new(args.max_open_reservations as usize);
    let (k, e) = (keys.seed(spends), reservations.seed(ends));
    if k + e > 0 {
        tracing::info!(
            target: "provider_budgets::lifecycle",
            keys = k,
            reservations = e,
            "idempotency keys and ended reservations restored from the data dir"
        );
    }
    Ok((keys, reservations))
}

/// The sidecar's base URL in the data dir ([`crate::remote::URL_FILE`]) for as long as it
/// serves: `status` on the same data dir asks it instead of failing on the lock. Removed on
/// drop (a SIGKILL leaves it; it is overwritten by the next start, and a `status` that finds
/// nobody there reports the lock as before).
struct UrlFile(Option<std::path::PathBuf>);

impl UrlFile {
    fn write(limiter: &Limiter, local: SocketAddr) -> UrlFile {
        let Some(dir) = limiter.config().storage.dir.clone() else {
            return UrlFile(None);
        };
        let path = crate::remote::url_file(&dir);
        // An unspecified address (0.0.0.0) is reached through loopback from this host.
        let addr = match local {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from(([127, 0, 0, 1], a.port()))
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
            }
            other => other,
        };
        match std::fs::write(&path, format!("http://{addr}/\n")) {
            Ok(()) => UrlFile(Some(path)),
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot write the sidecar's address for `status`");
                UrlFile(None)
            }
        }
    }
}

impl Drop for UrlFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The ready line: tests and supervisors read the bound address (useful with port 0). A
/// closed stdout is not an error: the server runs the same.
fn announce(local: SocketAddr) {
    use std::io::Write as _;
    tracing::info!(target: "provider_budgets::lifecycle", %local, "listening");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on {local}").and_then(|()| out.flush());
}

/// Waits at most `timeout` for the in-flight requests after the accept loop was told to stop.
async fn drain(
    mut server: tokio::task::JoinHandle<()>,
    timeout: Duration,
) -> Result<(), ServeError> {
    match tokio::time::timeout(timeout, &mut server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ServeError::Server(std::io::Error::other(e))),
        Err(_) => {
            tracing::warn!(timeout = ?timeout, "in-flight requests did not finish; closing");
            server.abort();
        }
    }
    Ok(())
}

/// Reads the config and applies it. A config without any budget (an empty file, or one a
/// writer has truncated and not yet written) that would remove the file's budgets is refused
/// unless `allow_empty`; removed budgets are logged at warn level.
fn reload(
    limiter: &Limiter,
    loader: Loader<'_>,
    allow_empty: bool,
) -> Result<provider_budgets::ReloadSummary, String> {
    let refused = |e: &dyn std::fmt::Display| {
        format!("config reload refused, the running config is unchanged: {e}")
    };
    let config = loader().map_err(|e| refused(&e))?;
    // The file's budgets only: runtime budgets are kept by every reload.
    let running = limiter.base_config().budgets.len();
    if config.budgets.is_empty() && running > 0 && !allow_empty {
        return Err(refused(&format!(
            "the new config has no budget (empty or half-written file?) and would remove all \
             {running} budgets of the config file; to apply it anyway run `serve --allow-empty` \
             or post {{\"allow_empty\": true}} to /v1/reload"
        )));
    }
    // The webhook thread and the forecast took their settings at start.
    let alerts_changed = config.alerts != limiter.config().alerts;
    let summary = limiter.reload(config).map_err(|e| refused(&e))?;
    if alerts_changed {
        tracing::warn!("provider_budgets.alerts changed: it applies at the next start of serve");
    }
    if !summary.removed.is_empty() {
        tracing::warn!(removed = ?summary.removed, "config reload removed budgets");
    }
    Ok(summary)
}

enum Signal {
    Stop(&'static str),
    Reload,
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals)
    }

    async fn next(&mut self) -> Signal {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Stop("Ctrl-C")
    }
}

/// The API routes are admitted through the in-flight bound; `/healthz` and `/metrics` are
/// not, so that a probe or a scrape of an overloaded sidecar still gets its answer.
fn router(state: Arc<State>) -> axum::Router {
    use axum::extract::DefaultBodyLimit;
    use axum::middleware;
    use axum::routing::{get, post, put};
    use axum::Router;

    let api = Router::new()
        .route("/v1/filter", post(api::filter))
        .route("/v1/spend", post(api::spend))
        .route("/v1/spend/batch", post(batch::spend_batch))
        .route("/v1/budgets", get(budgets::list))
        .route(
            "/v1/budgets/{scope}/{*name}",
            put(budgets::put).get(budgets::get).delete(budgets::delete),
        )
        .route("/v1/reload", post(api::reload))
        .route("/v1/reserve", post(reserve::reserve))
        .route("/v1/commit", post(reserve::commit))
        .route("/v1/release", post(reserve::release))
        .route("/v1/adjust", post(adjust::adjust))
        .route("/", get(page::index))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            api::admit,
        ))
        // Outside the admission: the body is read before a permit is taken.
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            edge::guard,
        ));
    let probes = Router::new()
        .route("/metrics", get(api::metrics))
        .route("/healthz", get(api::healthz));
    api.merge(probes)
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// What a connection over `--max-connections` is served: the probes, 503 for the rest.
fn probes_only(state: Arc<State>) -> axum::Router {
    use axum::http::{header, HeaderValue, StatusCode};
    use axum::routing::get;
    use axum::Router;

    Router::new()
        .route("/metrics", get(api::metrics))
        .route("/healthz", get(api::healthz))
        .fallback(|| async {
            ::metrics::counter!("provider_budgets_http_overloaded_total").increment(1);
            let mut r = api::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections (--max-connections); retry",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        })
        .with_state(state)
}
