//! `provider-budgets budget put|delete|get`: runtime budgets from the command line, on the
//! data dir (a running sidecar holds it: use its `/v1/budgets/{scope}/{name}` then). With
//! `--redis` a change is sent to Redis before the command returns.

use std::io::{self, Write};
use std::path::Path;

use provider_budgets::{
    BudgetChange, BudgetConfig, BudgetError, BudgetFields, Limiter, Scope, StatusQuery,
};

/// `budget` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BudgetCmd {
    /// Create or change the runtime budget SCOPE NAME (its period, with --time-zone its own
    /// zone, names the series; a series the config file defines is refused).
    Put {
        /// The scope, as `status --json` names it (`provider`, `tag`, …).
        #[arg(value_name = "SCOPE", value_parser = parse_scope)]
        scope: Scope,
        /// The provider, deployment id, model, tag or identity name; `*` for a template of
        /// an identity scope.
        name: String,
        /// The limit in USD, e.g. `12.5` (a whole number of tokens, requests or slots with
        /// `--unit`).
        #[arg(long, value_name = "AMOUNT", allow_hyphen_values = true)]
        limit: String,
        /// The period: `30s`, `1h`, `1d`, `7d`, `1w`, `1mo`… (none for `--unit concurrent`).
        #[arg(long, value_name = "P", default_value = "")]
        period: String,
        /// What it counts: `usd` (default), `tokens`, `input_tokens`, `output_tokens`,
        /// `requests` or `concurrent`.
        #[arg(long, value_name = "UNIT")]
        unit: Option<String>,
        /// The most a reservation holds in it, in its unit (a larger estimate holds this).
        #[arg(long, value_name = "AMOUNT")]
        max_estimate: Option<String>,
        /// A soft limit, a fraction of the limit in (0, 1] (repeatable).
        #[arg(long = "soft-limit", value_name = "F")]
        soft_limits: Vec<f64>,
        /// `enforce` (default) or `shadow`.
        #[arg(long, value_name = "MODE")]
        mode: Option<String>,
        /// `shared` (default) or `strict`.
        #[arg(long, value_name = "E")]
        enforcement: Option<String>,
        /// `fixed` (default) or `sliding` (the previous window counts, weighted by overlap).
        #[arg(long, value_name = "W")]
        window: Option<String>,
        /// The budget's own IANA time zone for `d`, `w`, `mo` windows.
        #[arg(long, value_name = "ZONE")]
        time_zone: Option<String>,
        /// A template's (NAME `*`: one series per distinct name) bound on its live series
        /// (default 100000).
        #[arg(long, value_name = "N")]
        max_series: Option<u32>,
    },
    /// Delete the runtime budget SCOPE NAME (its spend is kept: a put resumes it).
    Delete {
        #[arg(value_name = "SCOPE", value_parser = parse_scope)]
        scope: Scope,
        name: String,
        /// Its period (`1d`, or `1d@Europe/Berlin`), when it has several.
        #[arg(long, value_name = "P")]
        period: Option<String>,
    },
    /// Show the budgets of SCOPE NAME (from the config file and runtime).
    Get {
        #[arg(value_name = "SCOPE", value_parser = parse_scope)]
        scope: Scope,
        name: String,
    },
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    s.parse()
}

/// Runs one `budget` subcommand; the error is the command's one line.
pub(crate) fn run(limiter: &Limiter, cmd: BudgetCmd, config: &Path) -> Result<(), String> {
    let refused = |e: BudgetError| match e {
        BudgetError::DefinedByConfig { budget } => format!(
            "{budget} is defined by the config file {}; change it there",
            config.display()
        ),
        e => e.to_string(),
    };
    match cmd {
        BudgetCmd::Put {
            scope,
            name,
            limit,
            period,
            soft_limits,
            mode,
            enforcement,
            window,
            time_zone,
            max_series,
            unit,
            max_estimate,
        } => {
            let mut fields = BudgetFields::new(limit, period);
            fields.max_series = max_series;
            fields.unit = unit;
            fields.max_estimate = max_estimate;
            fields.soft_limits = soft_limits;
            fields.mode = mode;
            fields.enforcement = enforcement;
            fields.window = window;
            fields.time_zone = time_zone;
            let budget = BudgetConfig::from_fields(scope, &name, &fields).map_err(|e| {
                let msg = e.to_string();
                msg.strip_prefix("config: ").unwrap_or(&msg).to_owned()
            })?;
            let limit = match budget.unit {
                provider_budgets::Unit::Usd => format!("limit {} USD", budget.limit),
                unit => format!("limit {} {unit}", budget.limit.as_nanos()),
            };
            let c = limiter.put_budget(budget).map_err(refused)?;
            print_change(&c, &limit).map_err(|e| e.to_string())
        }
        BudgetCmd::Delete {
            scope,
            name,
            period,
        } => {
            let c = limiter
                .delete_budget(scope, &name, period.as_deref())
                .map_err(refused)?;
            print_change(&c, "its spend is kept").map_err(|e| e.to_string())
        }
        BudgetCmd::Get { scope, name } => get(limiter, scope, &name),
    }
}

fn print_change(c: &BudgetChange, what: &str) -> io::Result<()> {
    let verb = if c.deleted { "deleted" } else { "put" };
    writeln!(
        io::stdout().lock(),
        "{verb} {} {:?} ({}): {what}; version {} by {}, replicated: {}",
        c.scope,
        c.name,
        c.period_key,
        c.version,
        c.node,
        c.replicated
    )
}

fn get(limiter: &Limiter, scope: Scope, name: &str) -> Result<(), String> {
    let rows = limiter.status(StatusQuery::all().scope(scope).name(name));
    if rows.is_empty() {
        return Err(format!("no budget {scope} {name:?}"));
    }
    let runtime = limiter.runtime_budgets();
    let mut out = io::stdout().lock();
    for s in rows {
        let source = runtime
            .iter()
            .find(|r| {
                r.budget.scope == scope
                    && r.budget.name == name
                    && r.period_key == s.period_key
                    && !r.shadowed
            })
            .map_or_else(
                || "config file".to_owned(),
                |r| format!("runtime, version {} by {}", r.version, r.node),
            );
        let sliding = s
            .sliding_spend
            .map_or_else(String::new, |m| format!(" (sliding {m})"));
        writeln!(
            out,
            "{} {} {} in window {} .. {}: spend {}{sliding} of {} USD ({source})",
            s.scope,
            s.name,
            s.period_key,
            s.window.start(),
            s.window.end(),
            s.spend,
            s.limit
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}
