//! The `status` table: what `provider-budgets status` prints and what the sidecar's `GET /`
//! answers to `Accept: text/plain`.

use std::io::{self, Write};

use provider_budgets::BudgetStatus;

/// A plain aligned table, one row per budget; money printed exactly. The first seven columns
/// are the design's contract (provider, period, window start, resets at, spend, limit,
/// remaining) and the only ones unless a budget is strict; then `RESERVED` (money held by
/// open reservations of this process) and `GRANT` (this node's grant, `-` for a shared
/// budget) follow, so tables without strict budgets keep exactly the contract's columns.
pub(crate) fn write_table(out: &mut impl Write, budgets: &[BudgetStatus]) -> io::Result<()> {
    let strict = budgets
        .iter()
        .any(|s| s.enforcement == provider_budgets::Enforcement::Strict);
    let mut header = vec![
        "PROVIDER",
        "PERIOD",
        "WINDOW START",
        "RESETS AT",
        "SPEND",
        "LIMIT",
        "REMAINING",
    ];
    if strict {
        header.extend(["RESERVED", "GRANT"]);
    }
    let rows: Vec<Vec<String>> = budgets
        .iter()
        .map(|s| {
            let mut row = vec![
                s.provider.clone(),
                period_cell(s),
                s.window.start().to_string(),
                s.window.end().to_string(),
                s.unit.format_amount(s.spend.as_nanos()),
                s.unit.format_amount(s.limit.as_nanos()),
                s.unit.format_amount(s.remaining.as_nanos()),
            ];
            if strict {
                row.push(s.unit.format_amount(s.reserved.as_nanos()));
                row.push(
                    s.grant
                        .map_or_else(|| "-".to_owned(), |g| s.unit.format_amount(g.as_nanos())),
                );
            }
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let header: Vec<String> = header.into_iter().map(str::to_owned).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

/// The PERIOD cell: the period, followed by the unit for budgets that do not count dollars
/// (`1m tokens`); `concurrent` for a concurrent budget, which has no period.
fn period_cell(s: &provider_budgets::BudgetStatus) -> String {
    match s.unit {
        provider_budgets::Unit::Usd => s.period.to_string(),
        provider_budgets::Unit::Concurrent => "concurrent".to_owned(),
        unit => format!("{} {unit}", s.period),
    }
}
