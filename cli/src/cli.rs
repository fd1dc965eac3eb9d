//! The `provider-budgets` command line; the binary only calls [`run`].
//!
//! ```text
//! provider-budgets --config FILE --data-dir DIR [--redis URL] [--node-id ID] [--now TIME] CMD
//! ```
//!
//! Behaviour that scripts and tests rely on:
//!
//! * Deployments are written `MODEL` or `ID=MODEL` (`gpt4o-east=openai/gpt-4o`); `filter` and
//!   `charge` take the request's tags as repeated `--tag TAG` and its identities as `--key K
//!   --user U --team T --org O --customer C`. `charge` counts the cost against every budget
//!   that applies (as `filter` resolves them) and prints them; `record PROVIDER COST` counts
//!   against the provider's budgets only.
//! * litellm keys the file sets that are not implemented print one `warning:` line.
//! * Exit codes: `0` success, `1` runtime error (storage, replication, a refused record, a bad
//!   config file, a malformed `ingest` line), `2` usage error (bad flag or argument value:
//!   cost, `--now`, `--at`), `3` `filter` found no deployment left.
//! * Every error is exactly one line on stderr starting with `error: ` and naming the culprit
//!   (file, provider, value, key, line number). Panics print one `error: internal error: ...`
//!   line (no backtrace). Logs go to stderr through `tracing` (`RUST_LOG`, default `error`).
//! * `--data-dir` may be left out when the config sets `provider_budgets.storage.dir`.
//! * `price MODEL --input-tokens N --output-tokens M …` (module `price`) reads no data dir and
//!   also runs without the global flags.
//! * Every global flag but `--now` may come from the environment instead:
//!   `PROVIDER_BUDGETS_CONFIG`, `PROVIDER_BUDGETS_DATA_DIR`, `PROVIDER_BUDGETS_REDIS`,
//!   `PROVIDER_BUDGETS_NODE_ID`; a flag wins over its variable, an empty variable counts as
//!   unset. `--help` never shows the Redis variable's value (it may hold a password).
//! * `--redis` (or its variable) supplies `provider_budgets.redis.url`, which the file may then
//!   leave out; a `redis` section without either is an error naming the key.
//! * Every command makes what it recorded durable before the process exits.
//! * With `--redis`, `record`, `charge`, `adjust`, `filter` and `status` run one sync round
//!   before answering (`record`, `charge` and `adjust` after what they recorded is durable).
//!   When it fails, `record`, `charge`, `adjust` and `ingest` print their answer and exit 4
//!   with `error: recorded locally; do not retry (…)` (the record stays counted; a retry would
//!   count it twice), `sync` exits 1; `filter` and `status` print one
//!   `warning: ... (answering from local data)` line and answer from local data.
//! * `budget put|delete|get SCOPE NAME` changes runtime budgets in the data dir (and, with
//!   `--redis`, in the fleet before it returns); a budget the config file defines is refused
//!   naming the file.
//! * `ingest --durable` prints `ok N` after record N is durable (one fsync per record).
//!   `ingest` without `--durable` records as it reads and makes the records durable whenever
//!   it has consumed everything stdin has delivered so far (and at end of input), then prints
//!   one `ok N` for the last record of that batch: a pipe of many lines costs few fsyncs.
//!   With `--redis`, `ingest` runs one sync round once all input is durable; when it fails,
//!   `ingest` exits 4 like `record` (everything acknowledged stays recorded locally).

use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use jiff::Timestamp;

use provider_budgets::{
    Adjustment, Config, ConfigError, Error, FakeClock, Identity, Limiter, Money, Period,
    RecordError, RedisConfig, Scope, Spend, StatusQuery, StoreError, Target,
};

mod charge;
use charge::{charge, TokenArgs};

/// Exit code of `filter` when no deployment is left.
const EXIT_NO_DEPLOYMENTS: u8 = 3;
/// Exit code of `record`, `charge`, `adjust` and `ingest` with `--redis` when what they
/// recorded is durable but the sync round failed: a retry would count it twice.
const EXIT_RECORDED_LOCALLY: u8 = 4;

/// Command line arguments.
#[derive(Debug, clap::Parser)]
#[command(
    name = "provider-budgets",
    version,
    about = "Spend budgets per LLM provider over time windows"
)]
struct Cli {
    /// Config file: YAML (a litellm proxy config works as it is) or TOML (`.toml`).
    #[arg(long, value_name = "FILE", env = "PROVIDER_BUDGETS_CONFIG")]
    config: PathBuf,
    /// Data dir (sled); overrides `provider_budgets.storage.dir`.
    #[arg(long, value_name = "DIR", env = "PROVIDER_BUDGETS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Redis URL for fleet replication; overrides `provider_budgets.redis.url`.
    // The value may carry a password: `--help` shows the variable's name, never its value.
    #[arg(
        long,
        value_name = "URL",
        env = "PROVIDER_BUDGETS_REDIS",
        hide_env_values = true
    )]
    redis: Option<String>,
    /// This node's id; overrides `provider_budgets.node_id`.
    #[arg(long, value_name = "ID", env = "PROVIDER_BUDGETS_NODE_ID")]
    node_id: Option<String>,
    /// Fix the clock for this invocation (RFC 3339 or Unix seconds).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    now: Option<Timestamp>,
    #[command(subcommand)]
    cmd: Cmd,
    /// Which overrides came from a `PROVIDER_BUDGETS_*` variable, so that an error names the
    /// variable rather than a flag the operator never typed.
    #[arg(skip)]
    from_env: FromEnv,
}

/// The identities of a request (`filter`, `charge`): each one's budgets apply.
#[derive(Debug, Default, clap::Args)]
struct IdentityArgs {
    /// The request's API key (litellm's hashed key): its key budgets apply.
    #[arg(long, value_name = "K")]
    key: Option<String>,
    /// The request's user: its user budgets apply.
    #[arg(long, value_name = "U")]
    user: Option<String>,
    /// The request's team: its team budgets apply.
    #[arg(long, value_name = "T")]
    team: Option<String>,
    /// The request's organisation: its org budgets apply.
    #[arg(long, value_name = "O")]
    org: Option<String>,
    /// The request's customer (end user): its customer budgets apply.
    #[arg(long, value_name = "C")]
    customer: Option<String>,
}

impl IdentityArgs {
    /// The library's identity, borrowing the flags' values.
    fn identity(&self) -> Identity<'_> {
        let flags = [
            (Scope::Key, &self.key),
            (Scope::User, &self.user),
            (Scope::Team, &self.team),
            (Scope::Org, &self.org),
            (Scope::Customer, &self.customer),
        ];
        flags
            .into_iter()
            .fold(Identity::new(), |id, (scope, name)| {
                id.with(scope, name.as_deref())
            })
    }
}

/// Global flags whose value came from the environment.
#[derive(Debug, Default)]
struct FromEnv {
    node_id: bool,
    redis: bool,
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
        /// Deployments, written `MODEL` or `ID=MODEL`: `gpt-4o`, `azure/gpt-4o`,
        /// `gpt4o-east=openai/gpt-4o` (the id selects deployment budgets).
        #[arg(required = true, value_name = "DEPLOYMENT")]
        models: Vec<String>,
        /// A tag of the request (repeatable): its tag budgets must have room too.
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Count COST against every budget that applies to DEPLOYMENT (`MODEL` or `ID=MODEL`):
    /// its provider's, its model's, its own, each tag's and each identity's. Without COST,
    /// the tokens are priced by the catalog (`provider_budgets.pricing`) on the model.
    Charge {
        /// The deployment, `MODEL` or `ID=MODEL`.
        #[arg(value_name = "DEPLOYMENT")]
        deployment: String,
        /// Cost in USD, e.g. `0.1`; without it, --input-tokens / --output-tokens are priced
        /// (a given cost wins over them).
        #[arg(
            value_parser = parse_cost,
            allow_hyphen_values = true,
            required_unless_present_any = ["input_tokens", "output_tokens"]
        )]
        cost: Option<Money>,
        #[command(flatten)]
        tokens: TokenArgs,
        /// A tag of the request (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        #[command(flatten)]
        identity: IdentityArgs,
        /// Count it in the window of TIME instead of now (RFC 3339 or Unix seconds).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: Option<Timestamp>,
        /// Return only after the charge's own fsync (it is durable at exit either way).
        #[arg(long)]
        durable: bool,
    },
    /// Credit AMOUNT USD back to the budget KEY (as `status` names it: `openai`,
    /// `tag:team-a`, `deployment:gpt4o-east`): a correction, audited; spend counts net of it.
    Adjust {
        /// The budget's key name.
        #[arg(value_name = "KEY")]
        key: String,
        /// The credit in USD, e.g. `12.5`; at most the window's spend.
        #[arg(value_parser = parse_cost, allow_hyphen_values = true)]
        amount: Money,
        /// Why (required: it goes to the audit trail and the log).
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// The budget's period, when it has several (`1d`, `1mo`).
        #[arg(long, value_name = "P")]
        period: Option<Period>,
        /// Credit the window of TIME instead of now (RFC 3339 or Unix seconds).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: Option<Timestamp>,
    },
    /// Show every budget's current window.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Ask the sidecar at URL (`http://127.0.0.1:8787/`) instead of opening the data dir;
        /// without it, a data dir held by a running sidecar is asked through the address that
        /// sidecar left in it.
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// Run one replication round with Redis now.
    Sync,
    /// Record lines `PROVIDER COST [TIME]` from stdin, acknowledging durable ones with `ok N`.
    Ingest {
        /// Make each record durable before acknowledging it (one fsync per line).
        #[arg(long)]
        durable: bool,
    },
    /// Repair a data dir that lost acknowledged spend (it fails to open with "lost
    /// acknowledged spend"): restore what the disk and Redis still know; exit 1 while spend
    /// is still missing, unless --accept-loss.
    Repair {
        /// Accept that the spend still missing is lost, so the data dir opens again.
        #[arg(long)]
        accept_loss: bool,
    },
    /// Run the HTTP sidecar until SIGTERM/SIGINT (SIGHUP reloads the config).
    Serve(crate::serve::ServeArgs),
    /// Print the cost of one call from its token usage and the catalog entry that priced it
    /// (no data dir: also runs as `provider-budgets price …` without the global flags).
    Price(crate::price::PriceArgs),
    /// Runtime budgets: put, delete or show a budget without editing the config file.
    Budget {
        #[command(subcommand)]
        cmd: crate::budget::BudgetCmd,
    },
}

fn usage_failure(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
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
    // `price` reads no data dir: it also runs without the global flags.
    if let Some(code) = crate::price::standalone(clap_exit) {
        return code;
    }
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(&e),
    };
    init_logging(matches!(cli.cmd, Cmd::Serve(_)));
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", one_line(&f.message));
            ExitCode::from(f.code)
        }
    }
}

/// The command line, with the global flags' environment variables (`PROVIDER_BUDGETS_*`)
/// where a flag is absent. An empty variable counts as unset (clap would take it as an empty
/// value), so `PROVIDER_BUDGETS_REDIS=` turns replication off rather than failing.
fn parse_args() -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let cmd = Cli::command().mut_args(|arg| match arg.get_env() {
        Some(var) if std::env::var_os(var).is_some_and(|v| v.is_empty()) => {
            arg.env(None::<&'static str>)
        }
        _ => arg,
    });
    let matches = cmd.try_get_matches()?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    let env = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::EnvVariable);
    cli.from_env = FromEnv {
        node_id: env("node_id"),
        redis: env("redis"),
    };
    Ok(cli)
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
             [--redis URL] [--node-id ID] [--now TIME] CMD; the flags may also come from \
             PROVIDER_BUDGETS_* variables (see --help)"
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
/// `RUST_LOG` when set (and valid); otherwise errors only for the one-shot commands (they report in their
/// one `error:` line), and for `serve` warnings plus one info line per lifecycle event (the
/// target `provider_budgets::lifecycle`: listening, a reload, Redis lost and back, shutdown).
fn init_logging(serve: bool) {
    let default = if serve {
        // The config's warnings are printed by `load_config` (naming the file), not twice.
        "warn,sled=off,provider_budgets::config=error,provider_budgets::lifecycle=info"
    } else {
        "error,sled=off"
    };
    // An empty RUST_LOG counts as unset, as every other variable of the CLI does. sled logs
    // its own I/O errors (as Debug text) before ours: the CLI reports them in its one
    // `error:` line, so sled stays quiet unless RUST_LOG asks for it.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
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
        if is_rfc3339_shape(t) {
            // Well formed, only outside what a timestamp can hold.
            format!(
                "time {t:?} is out of range: timestamps end at {}, and a spend may be at most {} in the future",
                Timestamp::MAX,
                humantime::format_duration(provider_budgets::MAX_FUTURE_SKEW)
            )
        } else {
            format!("time {t:?} is neither RFC 3339 (2024-05-01T12:00:00Z) nor Unix seconds: {e}")
        }
    })
}

/// True when `t` parses as an RFC 3339 date, time and offset (calendar range), whatever the
/// timestamp range says.
fn is_rfc3339_shape(t: &str) -> bool {
    jiff::fmt::temporal::DateTimeParser::new()
        .parse_pieces(t)
        .is_ok_and(|p| p.time().is_some() && p.offset().is_some())
}

/// COST: an exact USD decimal ([`Money`]'s parser: no NaN, infinity, negative or huge value).
fn parse_cost(s: &str) -> Result<Money, String> {
    s.parse::<Money>().map_err(|e| format!("cost: {e}"))
}

/// Reads the config file and applies the command line overrides. Prints its warnings, one
/// `warning: FILE: …` line each: for `serve` (at start and at every reload) all of
/// [`Config::warnings`], for the one-shot commands the litellm keys it ignores.
fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let mut config = Config::from_path(&cli.config).map_err(|e| config_failure(&cli.config, e))?;
    let warnings = match cli.cmd {
        Cmd::Serve(_) => config.warnings(),
        _ => config.warning().into_iter().collect(),
    };
    for w in warnings {
        eprintln!(
            "warning: {}: {}",
            cli.config.display(),
            w.strip_prefix("config: ").unwrap_or(&w)
        );
    }
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
    // The file may leave the URL to `--redis`; with neither, say which key is missing.
    if config.redis.as_ref().is_some_and(|r| r.url.is_empty()) {
        return Err(config_failure(&cli.config, ConfigError::NoRedisUrl));
    }
    // The file passed validation: what fails now comes from an override. Name it as given.
    if let Err(e) = config.validate() {
        let flag = |from_env: bool, flag: &'static str, var: &'static str| {
            if from_env {
                var
            } else {
                flag
            }
        };
        let source = match e {
            ConfigError::NodeId(_) => flag(
                cli.from_env.node_id,
                "--node-id",
                "PROVIDER_BUDGETS_NODE_ID",
            ),
            _ if cli.redis.is_some() => {
                flag(cli.from_env.redis, "--redis", "PROVIDER_BUDGETS_REDIS")
            }
            _ => "command line",
        };
        let msg = provider_budgets::redact_urls(&e.to_string());
        let rest = msg.strip_prefix("config: ").unwrap_or(&msg);
        return Err(Failure::runtime(format!("{source}: {rest}")));
    }
    Ok(config)
}

/// Config errors name the key path and value; the line names the file once: `config FILE:
/// KEY: MESSAGE`. A URL's password in the message is masked.
fn config_failure(path: &Path, e: ConfigError) -> Failure {
    let msg = provider_budgets::redact_urls(&e.to_string());
    match e {
        // "config: cannot read FILE: ..." names the file already.
        ConfigError::Io { .. } => Failure::runtime(msg),
        _ => {
            let rest = msg.strip_prefix("config: ").unwrap_or(&msg);
            Failure::runtime(format!("config {}: {rest}", path.display()))
        }
    }
}

fn open(cli: &Cli, config: Config) -> Result<Limiter, Failure> {
    let limiter = match cli.now {
        Some(now) => Limiter::builder(config)
            .clock(Arc::new(FakeClock::new(now)))
            .open(),
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
    if let Cmd::Price(args) = &cli.cmd {
        return crate::price::run(args, Some(&cli.config))
            .map_err(|(code, message)| Failure { code, message });
    }
    let config = load_config(&cli)?;
    if let Cmd::Repair { accept_loss } = cli.cmd {
        return repair(&cli, config, accept_loss);
    }
    // `serve` checks its flags and installs its signal handlers before the limiter opens
    // (which may take seconds with an unreachable Redis): a SIGHUP then is queued.
    let mut prepared = match &cli.cmd {
        Cmd::Serve(args) => {
            Some(crate::serve::prepare(args).map_err(|e| Failure::runtime(e.to_string()))?)
        }
        _ => None,
    };
    if let Cmd::Status {
        json,
        url: Some(url),
    } = &cli.cmd
    {
        return print_remote_status(url, *json);
    }
    let data_dir = config.storage.dir.clone();
    let limiter = match (open(&cli, config), &cli.cmd, data_dir) {
        (Ok(l), ..) => l,
        // The data dir is held (by a running sidecar, which said where it listens): ask it.
        (Err(f), Cmd::Status { json, .. }, Some(dir)) => {
            return match crate::remote::found_url(&dir) {
                Some(url) => print_remote_status(&url, *json),
                None => Err(f),
            };
        }
        (Err(f), ..) => return Err(f),
    };
    let replicate = cli.redis.is_some();
    let serving = matches!(cli.cmd, Cmd::Serve(_));
    let result = match cli.cmd {
        Cmd::Record {
            provider,
            cost,
            at,
            durable,
        } => record(&limiter, &provider, cost, at, durable, replicate),
        Cmd::Filter {
            models,
            tags,
            identity,
        } => filter(&limiter, &models, (&tags, &identity.identity()), replicate),
        Cmd::Charge {
            deployment,
            cost,
            tokens,
            tags,
            identity,
            at,
            durable,
        } => {
            let request = (&tags[..], &identity.identity());
            let cost = (cost, tokens.usage()?);
            charge(&limiter, &deployment, cost, request, at, durable, replicate)
        }
        Cmd::Adjust {
            key,
            amount,
            reason,
            period,
            at,
        } => adjust(&limiter, &key, amount, &reason, period, at, replicate),
        Cmd::Status { json, .. } => status(&limiter, json, replicate),
        Cmd::Sync => sync(&limiter),
        Cmd::Budget { cmd } => {
            crate::budget::run(&limiter, cmd, &cli.config).map_err(Failure::runtime)
        }
        Cmd::Ingest { durable } => ingest(&limiter, durable, replicate),
        Cmd::Repair { .. } => Ok(()), // handled above, before the data dir is opened
        Cmd::Price(_) => Ok(()),      // handled above, without a data dir
        Cmd::Serve(ref args) => match prepared.take() {
            Some(p) => crate::serve::run(
                p,
                &limiter,
                args,
                crate::serve::Source {
                    path: &cli.config,
                    loader: &|| load_config(&cli).map_err(|f| f.message),
                },
            )
            .map_err(|e| Failure::runtime(e.to_string())),
            None => Ok(()), // prepared above
        },
    };
    // Whatever happened, commit what was recorded before the process exits. The command's
    // own error is the more useful one to report when both fail.
    let closed = limiter.shutdown();
    if serving && closed.is_ok() && result.is_ok() {
        let last = limiter.health().replication.last_error;
        tracing::info!(target: "provider_budgets::lifecycle",
            last_sync_error = last.as_deref().unwrap_or("none"),
            "stopped: every counted spend is on disk");
    }
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
    record_spend(limiter, provider, cost, at, durable).map_err(Failure::runtime)?;
    // `sync` flushes first, so only durable spend is shipped.
    let synced = sync_after_record(limiter, replicate);
    let mut out = io::stdout().lock();
    match limiter
        .status(StatusQuery::all().at(at))
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
    synced
}

/// With `--redis`, one sync round after a record. What was recorded is durable whatever the
/// round does, so a failed round is [`EXIT_RECORDED_LOCALLY`] and says not to retry; a failed
/// flush (the record may not be on disk) stays an ordinary error.
fn sync_after_record(limiter: &Limiter, replicate: bool) -> Outcome {
    if !replicate {
        return Ok(());
    }
    match limiter.sync() {
        Ok(()) => Ok(()),
        Err(Error::Replication(e)) => Err(Failure {
            code: EXIT_RECORDED_LOCALLY,
            message: format!("recorded locally; do not retry (the sync with Redis failed: {e})"),
        }),
        Err(e) => Err(e.into()),
    }
}

fn adjust(
    limiter: &Limiter,
    key: &str,
    amount: Money,
    reason: &str,
    period: Option<Period>,
    at: Option<Timestamp>,
    replicate: bool,
) -> Outcome {
    let by = std::env::var("USER").map_or_else(|_| "cli".to_owned(), |u| format!("cli:{u}"));
    let mut a = Adjustment::credit(key, amount, reason).by(by);
    if let Some(p) = period {
        a = a.period(p);
    }
    if let Some(t) = at {
        a = a.at(t);
    }
    let c = limiter
        .adjust(a)
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let synced = sync_after_record(limiter, replicate);
    writeln!(
        io::stdout().lock(),
        "credited {} USD to {} ({}) in window {} .. {}: spend {} USD net of {} USD credited",
        c.amount,
        c.budget,
        c.period_key,
        c.window.start(),
        c.window.end(),
        c.spend,
        c.credited
    )?;
    synced
}

/// Counts `cost` against `provider`'s budgets (durably: waits for the fsync). On the command
/// line a provider without budget is an error (the library counts 0 budgets).
fn record_spend(
    limiter: &Limiter,
    provider: &str,
    cost: Money,
    at: Timestamp,
    durable: bool,
) -> Result<(), String> {
    let receipt = limiter
        .charge(Spend::provider(provider, cost).at(at))
        .map_err(|e| e.to_string())?;
    if receipt.budgets() == 0 {
        return Err(format!("provider {provider:?} has no budget configured"));
    }
    if durable {
        receipt.wait().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What a request adds to its deployment: its tags and its identities.
type Request<'a> = (&'a [String], &'a Identity<'a>);

/// One sync round before answering from local data; a failure only warns.
fn sync_or_warn(limiter: &Limiter) {
    if let Err(e) = limiter.sync() {
        eprintln!(
            "warning: {} (answering from local data)",
            one_line(&e.to_string())
        );
    }
}

fn filter(
    limiter: &Limiter,
    models: &[String],
    (tags, identity): Request<'_>,
    replicate: bool,
) -> Outcome {
    if replicate {
        sync_or_warn(limiter);
    }
    let targets: Vec<(Target, &String)> = models.iter().map(|m| (Target::parse(m), m)).collect();
    let deployments: Vec<&Target> = targets.iter().map(|t| &t.0).collect();
    match limiter.filter_for(&deployments, tags, identity) {
        Ok(allowed) => {
            let mut out = io::stdout().lock();
            // Printed as given (`ID=MODEL` stays so).
            for d in allowed {
                let written = targets
                    .iter()
                    .find(|t| std::ptr::eq(&t.0, *d))
                    .map_or("", |t| t.1.as_str());
                writeln!(out, "{written}")?;
            }
            Ok(())
        }
        Err(none) => Err(Failure {
            code: EXIT_NO_DEPLOYMENTS,
            message: none.to_string(),
        }),
    }
}

fn print_remote_status(url: &str, json: bool) -> Outcome {
    let text = crate::remote::status(url, json).map_err(Failure::runtime)?;
    let mut out = io::stdout().lock();
    write!(out, "{text}")?;
    if !text.ends_with('\n') {
        writeln!(out)?;
    }
    Ok(())
}

fn status(limiter: &Limiter, json: bool, replicate: bool) -> Outcome {
    if replicate {
        sync_or_warn(limiter);
    }
    let budgets = limiter.status(StatusQuery::all());
    let mut out = io::stdout().lock();
    if json {
        let doc = crate::status_json::status_document(limiter, &budgets);
        writeln!(out, "{doc}")?;
    } else {
        crate::status_table::write_table(&mut out, &budgets)?;
    }
    Ok(())
}

/// `repair`: see [`LimiterBuilder::repair`](provider_budgets::LimiterBuilder::repair). Prints
/// what was acknowledged, found and restored.
fn repair(cli: &Cli, config: Config, accept_loss: bool) -> Outcome {
    let builder = match cli.now {
        Some(now) => Limiter::builder(config).clock(Arc::new(FakeClock::new(now))),
        None => Limiter::builder(config),
    };
    let report = builder.repair(accept_loss)?;
    let mut out = io::stdout().lock();
    if report.record_unreadable {
        writeln!(
            out,
            "the high-water record was unreadable; it is rewritten from what is stored"
        )?;
    }
    if let Some(Err(e)) = &report.redis {
        writeln!(
            out,
            "warning: redis round failed, nothing taken back from it: {}",
            one_line(e)
        )?;
    }
    writeln!(
        out,
        "acknowledged {} USD, found {} USD on disk, restored {} USD, missing {} USD",
        report.acknowledged, report.found, report.restored, report.missing
    )?;
    if report.missing == Money::ZERO {
        writeln!(out, "repaired: nothing acknowledged is missing")?;
        Ok(())
    } else if report.accepted_loss {
        writeln!(
            out,
            "repaired: accepted the loss of {} USD of acknowledged spend",
            report.missing
        )?;
        Ok(())
    } else {
        Err(Failure::runtime(format!(
            "repair: {} USD of acknowledged spend is still missing (not on disk, not in Redis); \
             run `provider-budgets repair --accept-loss` to accept the loss",
            report.missing
        )))
    }
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
/// shutdown) and the error names the line. With `replicate`, one sync round runs at the end
/// of input, after everything is durable: its failure is the command's (exit 1), as for
/// `record`, so a fleet that never heard of this spend does not go unnoticed.
fn ingest(limiter: &Limiter, durable: bool, replicate: bool) -> Outcome {
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
            record_spend(limiter, line.provider, line.cost, at, durable)
                .map_err(|e| Failure::runtime(format!("stdin line {line_no}: {e}")))?;
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
    // `sync` flushes first: only durable spend is shipped.
    sync_after_record(limiter, replicate)
}
