//! The `provider-budgets` command line (feature `cli`); the binary only calls [`run`].
//!
//! ```text
//! provider-budgets --config FILE --data-dir DIR [--redis URL] [--node-id ID] [--now TIME] CMD
//! ```
//!
//! Behaviour that scripts and tests rely on:
//!
//! * Exit codes: `0` success, `1` runtime error (storage, replication, a refused record, a bad
//!   config file, a malformed `ingest` line), `2` usage error (bad flag or argument value:
//!   cost, `--now`, `--at`), `3` `filter` found no deployment left.
//! * Every error is exactly one line on stderr starting with `error: ` and naming the culprit
//!   (file, provider, value, key, line number). Panics print one `error: internal error: ...`
//!   line (no backtrace). Logs go to stderr through `tracing` (`RUST_LOG`, default `error`).
//! * `--data-dir` may be left out when the config sets `provider_budgets.storage.dir`.
//! * Every command makes what it recorded durable before the process exits.
//! * With `--redis`, `record`, `filter` and `status` run one sync round before answering
//!   (`record` after its spend is durable). When it fails, `record` and `sync` exit 1 (the
//!   local spend stays recorded); `filter` and `status` print one
//!   `warning: ... (answering from local data)` line and answer from local data.
//! * `ingest --durable` prints `ok N` after record N is durable (one fsync per record).
//!   `ingest` without `--durable` records as it reads and makes the records durable whenever
//!   it has consumed everything stdin has delivered so far (and at end of input), then prints
//!   one `ok N` for the last record of that batch: a pipe of many lines costs few fsyncs.

use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use jiff::Timestamp;

use crate::{
    BudgetStatus, Config, ConfigError, Error, FakeClock, Limiter, Money, RecordError, RedisConfig,
    StoreError,
};

/// Exit code of `filter` when no deployment is left.
const EXIT_NO_DEPLOYMENTS: u8 = 3;

/// Command line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "provider-budgets",
    version,
    about = "Spend budgets per LLM provider over time windows"
)]
struct Cli {
    /// Config file: YAML (a litellm proxy config works as it is) or TOML (`.toml`).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Data dir (sled); overrides `provider_budgets.storage.dir`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Redis URL for fleet replication; overrides `provider_budgets.redis.url`.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// This node's id; overrides `provider_budgets.node_id`.
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Fix the clock for this invocation (RFC 3339 or Unix seconds).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    now: Option<Timestamp>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Count COST (USD, exact decimal) against PROVIDER's budget.
    Record {
        /// Provider with a budget (`openai`, `anthropic`, ...).
        provider: String,
        /// Cost in USD, e.g. `0.1`.
        #[arg(value_parser = parse_cost, allow_hyphen_values = true)]
        cost: Money,
        /// Count it in the window of TIME instead of now (RFC 3339 or Unix seconds).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: Option<Timestamp>,
        /// Return only after the record's own fsync (it is durable at exit either way).
        #[arg(long)]
        durable: bool,
    },
    /// Print the deployments that may still be used, one a line (exit 3 when none is left).
    Filter {
        /// Deployments: `gpt-4o`, `azure/gpt-4o`, `claude-3-5-sonnet`, ...
        #[arg(required = true, value_name = "MODEL")]
        models: Vec<String>,
    },
    /// Show every budget's current window.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run one replication round with Redis now.
    Sync,
    /// Record lines `PROVIDER COST [TIME]` from stdin, acknowledging durable ones with `ok N`.
    Ingest {
        /// Make each record durable before acknowledging it (one fsync per line).
        #[arg(long)]
        durable: bool,
    },
}

/// A failure of one invocation: the message (one line) and the exit code.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn runtime(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::runtime(e.to_string())
    }
}

impl From<RecordError> for Failure {
    fn from(e: RecordError) -> Failure {
        Failure::runtime(e.to_string())
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::runtime(e.to_string())
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::runtime(format!("cannot write to stdout: {e}"))
    }
}

type Outcome = Result<(), Failure>;

/// Runs the command line of this process and returns its exit code.
pub fn run() -> ExitCode {
    install_panic_hook();
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(&e),
    };
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", one_line(&f.message));
            ExitCode::from(f.code)
        }
    }
}

/// `--help` and `--version` print as clap renders them; usage errors become one line, because
/// clap's own form (usage block, tips) spans several.
fn clap_exit(e: &clap::Error) -> ExitCode {
    if !e.use_stderr() {
        // --help / --version: a failed print (closed stdout) has nothing better to report to.
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // No arguments at all: clap would print the whole help on stderr.
        eprintln!(
            "error: missing arguments; usage: provider-budgets --config FILE --data-dir DIR \
             [--redis URL] [--node-id ID] [--now TIME] CMD (see --help)"
        );
        return ExitCode::from(2);
    }
    let rendered = e.render().to_string();
    // The first paragraph holds the message and, for missing arguments, the indented list of
    // what is missing; the rest is the usage block.
    let first: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let text = first.join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    eprintln!("error: {} (see --help)", one_line(text));
    ExitCode::from(2)
}

/// One `error: internal error: ...` line instead of the default message and backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error: {}{at}", one_line(&what));
    }));
}

/// `RUST_LOG` to stderr, `error` by default: the CLI reports what went wrong itself, in one
/// line, so the library's warnings (e.g. "redis unreachable") would only repeat it.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .try_init();
}

/// Errors are one line whatever a lower layer put in its message.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

// ---- arguments --------------------------------------------------------------------------------

/// TIME: RFC 3339 (`2024-05-01T12:00:00Z`) or whole Unix seconds (`1714564800`).
fn parse_time(s: &str) -> Result<Timestamp, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<i64>() {
        return Timestamp::from_second(secs)
            .map_err(|e| format!("Unix seconds {t} out of range: {e}"));
    }
    t.parse::<Timestamp>().map_err(|e| {
        format!("time {t:?} is neither RFC 3339 (2024-05-01T12:00:00Z) nor Unix seconds: {e}")
    })
}

/// COST: an exact USD decimal ([`Money`]'s parser: no NaN, infinity, negative or huge value).
fn parse_cost(s: &str) -> Result<Money, String> {
    s.parse::<Money>().map_err(|e| format!("cost: {e}"))
}

/// Reads the config file and applies the command line overrides.
fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let mut config = Config::from_path(&cli.config).map_err(|e| config_failure(&cli.config, e))?;
    if let Some(dir) = &cli.data_dir {
        config.storage.dir = Some(dir.clone());
    }
    if let Some(id) = &cli.node_id {
        config.node_id = Some(id.clone());
    }
    if let Some(url) = &cli.redis {
        // Only the URL changes: prefix, intervals and timeouts from the file still apply.
        match &mut config.redis {
            Some(r) => r.url = url.clone(),
            None => config.redis = Some(RedisConfig::new(url.clone())),
        }
    }
    Ok(config)
}

/// Config errors name the key and value; add the file unless the message already has it.
fn config_failure(path: &Path, e: ConfigError) -> Failure {
    let msg = e.to_string();
    match e {
        ConfigError::Io { .. } => Failure::runtime(msg),
        _ => {
            let rest = msg.strip_prefix("config: ").unwrap_or(&msg);
            Failure::runtime(format!("config {}: {rest}", path.display()))
        }
    }
}

fn open(cli: &Cli, config: Config) -> Result<Limiter, Failure> {
    let limiter = match cli.now {
        Some(now) => Limiter::open_with_clock(config, Arc::new(FakeClock::new(now))),
        None => Limiter::open(config),
    };
    limiter.map_err(|e| match e {
        // The file passed validation when it was read, so this comes from an override.
        Error::Config(c) => {
            let msg = c.to_string();
            let rest = msg.strip_prefix("config: ").unwrap_or(&msg);
            Failure::runtime(format!("command line: {rest}"))
        }
        e => e.into(),
    })
}

// ---- commands ---------------------------------------------------------------------------------

fn execute(cli: Cli) -> Outcome {
    let config = load_config(&cli)?;
    let limiter = open(&cli, config)?;
    let replicate = cli.redis.is_some();
    let result = match cli.cmd {
        Cmd::Record {
            provider,
            cost,
            at,
            durable,
        } => record(&limiter, &provider, cost, at, durable, replicate),
        Cmd::Filter { models } => filter(&limiter, &models, replicate),
        Cmd::Status { json } => status(&limiter, json, replicate),
        Cmd::Sync => sync(&limiter),
        Cmd::Ingest { durable } => ingest(&limiter, durable),
    };
    // Whatever happened, commit what was recorded before the process exits. The command's
    // own error is the more useful one to report when both fail.
    let closed = limiter.shutdown();
    result?;
    closed?;
    Ok(())
}

fn record(
    limiter: &Limiter,
    provider: &str,
    cost: Money,
    at: Option<Timestamp>,
    durable: bool,
    replicate: bool,
) -> Outcome {
    let at = at.unwrap_or_else(|| limiter.now());
    if durable {
        limiter.record_durable_at(provider, cost, at)?;
    } else {
        limiter.record_at(provider, cost, at)?;
    }
    if replicate {
        // `sync` flushes first, so only durable spend is shipped.
        limiter.sync()?;
    }
    let mut out = io::stdout().lock();
    match limiter
        .status_at(at)
        .into_iter()
        .find(|s| s.provider == provider)
    {
        Some(s) => writeln!(
            out,
            "recorded {cost} USD for {provider} in window {} .. {}: spend {} of {} USD",
            s.window.start(),
            s.window.end(),
            s.spend,
            s.limit
        )?,
        None => writeln!(out, "recorded {cost} USD for {provider}")?,
    }
    Ok(())
}

/// One sync round before answering from local data; a failure only warns.
fn sync_or_warn(limiter: &Limiter) {
    if let Err(e) = limiter.sync() {
        eprintln!(
            "warning: {} (answering from local data)",
            one_line(&e.to_string())
        );
    }
}

fn filter(limiter: &Limiter, models: &[String], replicate: bool) -> Outcome {
    if replicate {
        sync_or_warn(limiter);
    }
    match limiter.filter(models) {
        Ok(allowed) => {
            let mut out = io::stdout().lock();
            for m in allowed {
                writeln!(out, "{m}")?;
            }
            Ok(())
        }
        Err(none) => Err(Failure {
            code: EXIT_NO_DEPLOYMENTS,
            message: none.to_string(),
        }),
    }
}

fn status(limiter: &Limiter, json: bool, replicate: bool) -> Outcome {
    if replicate {
        sync_or_warn(limiter);
    }
    let budgets = limiter.status();
    let mut out = io::stdout().lock();
    if json {
        let doc = serde_json::json!({
            "node_id": limiter.node_id(),
            "budgets": budgets.iter().map(status_json).collect::<Vec<_>>(),
        });
        writeln!(out, "{doc}")?;
    } else {
        write_table(&mut out, &budgets)?;
    }
    Ok(())
}

/// One budget in the JSON contract. Money is USD as JSON numbers; the `*_nanos` fields carry
/// the exact integer nano-dollars for consumers that must not round.
fn status_json(s: &BudgetStatus) -> serde_json::Value {
    let r = &s.replication;
    serde_json::json!({
        "provider": s.provider,
        "period": s.period.to_string(),
        "window_start": s.window.start().to_string(),
        "resets_at": s.window.end().to_string(),
        "spend": s.spend.as_usd(),
        "limit": s.limit.as_usd(),
        "remaining": s.remaining.as_usd(),
        "own_spend": s.own_spend.as_usd(),
        "spend_nanos": s.spend.as_nanos(),
        "limit_nanos": s.limit.as_nanos(),
        "remaining_nanos": s.remaining.as_nanos(),
        "own_spend_nanos": s.own_spend.as_nanos(),
        "exhausted": s.exhausted,
        "replication": {
            "enabled": r.enabled,
            "last_sync": r.last_sync.map(|t| t.to_string()),
            "stale": r.stale,
            "last_error": r.last_error,
            "problem": s.replication_problem,
        },
    })
}

/// A plain aligned table, one row per budget; money printed exactly.
fn write_table(out: &mut impl Write, budgets: &[BudgetStatus]) -> io::Result<()> {
    let header = [
        "PROVIDER",
        "PERIOD",
        "WINDOW START",
        "RESETS AT",
        "SPEND",
        "LIMIT",
        "REMAINING",
    ];
    let rows: Vec<[String; 7]> = budgets
        .iter()
        .map(|s| {
            [
                s.provider.clone(),
                s.period.to_string(),
                s.window.start().to_string(),
                s.window.end().to_string(),
                s.spend.to_string(),
                s.limit.to_string(),
                s.remaining.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let header = header.map(str::to_owned);
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

fn sync(limiter: &Limiter) -> Outcome {
    limiter.sync()?;
    writeln!(io::stdout().lock(), "synced")?;
    Ok(())
}

// ---- ingest -----------------------------------------------------------------------------------

/// One parsed `PROVIDER COST [TIME]` line.
struct Line<'a> {
    provider: &'a str,
    cost: Money,
    at: Option<Timestamp>,
}

/// Parses one line; the error names what is wrong (the caller adds the line number).
fn parse_line(text: &str) -> Result<Line<'_>, String> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let (provider, cost, at) = match fields[..] {
        [p, c] => (p, c, None),
        [p, c, t] => (p, c, Some(t)),
        _ => return Err(format!("expected `PROVIDER COST [TIME]`, got {text:?}")),
    };
    Ok(Line {
        provider,
        cost: parse_cost(cost)?,
        at: at.map(parse_time).transpose()?,
    })
}

/// Reads stdin to its end. On a bad line, what came before is made durable (by `execute`'s
/// shutdown) and the error names the line.
fn ingest(limiter: &Limiter, durable: bool) -> Outcome {
    // Our own reader, because its `buffer()` tells whether more input is already waiting.
    let mut input = BufReader::with_capacity(64 * 1024, io::stdin().lock());
    let mut out = io::stdout().lock();
    let (mut line_no, mut count, mut acked) = (0usize, 0usize, 0usize);
    let mut text = String::new();
    loop {
        text.clear();
        let read = input
            .read_line(&mut text)
            .map_err(|e| Failure::runtime(format!("stdin: line {}: {e}", line_no + 1)))?;
        if read == 0 {
            break;
        }
        line_no += 1;
        let t = text.trim();
        if !(t.is_empty() || t.starts_with('#')) {
            let line = parse_line(t)
                .map_err(|e| Failure::runtime(format!("stdin line {line_no}: {e}")))?;
            let at = line.at.unwrap_or_else(|| limiter.now());
            let recorded = if durable {
                limiter.record_durable_at(line.provider, line.cost, at)
            } else {
                limiter.record_at(line.provider, line.cost, at)
            };
            recorded.map_err(|e| Failure::runtime(format!("stdin line {line_no}: {e}")))?;
            count += 1;
        }
        // Acknowledge per record when durable; otherwise once the reader has nothing more
        // buffered (the writer paused or the pipe is drained), with one flush for the batch.
        if count > acked && (durable || input.buffer().is_empty()) {
            if !durable {
                limiter.flush()?;
            }
            writeln!(out, "ok {count}")?;
            out.flush()?;
            acked = count;
        }
    }
    Ok(())
}
