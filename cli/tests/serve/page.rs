//! `GET /`: the status page in a real headless browser (Chromium): it loads, its script
//! renders every budget (names escaped), search and paging work through the URL fragment, it
//! works with every host but the sidecar's unreachable (no request off the host), and
//! `Accept: text/plain` answers the `status` table.

use provider_budgets_test_support::cli::{bare_cmd, budget, Cli, Run};

use std::fmt::Write as _;
use std::process::Command;

use super::edge::Sidecar;

/// The headless browser: `$CHROMIUM`, else `chromium`, `chromium-browser` or `google-chrome`
/// on PATH. `None` (the test returns) only outside CI: in CI a missing browser fails.
fn browser() -> Option<String> {
    let candidates = std::env::var("CHROMIUM")
        .into_iter()
        .chain(["chromium", "chromium-browser", "google-chrome"].map(String::from));
    for c in candidates {
        let found = Command::new(&c).arg("--version").output();
        if found.is_ok_and(|o| o.status.success()) {
            return Some(c);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but no headless browser was found (install chromium)"
    );
    eprintln!("status page browser test skipped: no chromium on PATH");
    None
}

/// The DOM after the page's script ran, every host but 127.0.0.1 unresolvable.
fn dom(browser: &str, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=3000",
            &format!("--user-data-dir={}", profile.path().display()),
            "--dump-dom",
            url,
        ])
        .output()
        .expect("run the browser");
    assert!(out.status.success(), "browser: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Rows the script rendered (not the script's own text).
fn rendered_rows(dom: &str) -> Vec<String> {
    dom.match_indices("<tr class=\"budget\" data-name=\"")
        .map(|(i, m)| {
            let rest = &dom[i + m.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect()
}

#[test]
fn the_status_page_renders_every_budget_in_a_real_browser_without_leaving_the_host() {
    let Some(browser) = browser() else {
        return;
    };
    let mut yaml = String::from(
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  budgets:\n    - {tag: \"team</script><b>x\", limit: 5, period: 1d}\n",
    );
    for i in 0..1500 {
        let _ = writeln!(yaml, "    - {{tag: t{i:04}, limit: 1, period: 1h}}");
    }
    let s = Sidecar::start_env(Cli::new(&yaml), &[], &[]);
    let spend = r#"{"provider": "openai", "cost": "0.6"}"#;
    assert_eq!(
        s.post("/v1/spend", &["Content-Type: application/json"], spend)
            .status,
        200
    );
    let base = format!("http://{}/", s.addr());

    let page = s.get("/", &[]);
    assert_eq!(page.status, 200);
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "no absolute URL"
    );
    assert!(
        !page.body.contains(" src=") && !page.body.contains(" href="),
        "no external asset"
    );

    // Sorted by use: openai (60 %) first; one page of 100 rows of 1 502 budgets.
    let d = dom(&browser, &base);
    let rows = rendered_rows(&d);
    assert_eq!(rows.len(), 100, "{}", &d[..d.len().min(2000)]);
    assert_eq!(rows[0], "openai");
    assert!(d.contains("60.0%"), "the bar's percentage");
    assert!(d.contains("1502 of 1502 budgets"), "the count");
    // Search through the fragment: a name with markup comes back escaped, not as markup.
    let d = dom(&browser, &format!("{base}#%7B%22q%22%3A%22script%22%7D"));
    assert_eq!(rendered_rows(&d), ["team&lt;/script&gt;&lt;b&gt;x"]);
    assert!(!d.contains("<b>x"), "markup in a name is text");
    // The last page.
    let d = dom(&browser, &format!("{base}#%7B%22page%22%3A15%7D"));
    assert_eq!(rendered_rows(&d).len(), 2);

    // curl's table.
    let table = s.get("/", &["Accept: text/plain"]);
    assert!(
        table.body.starts_with("PROVIDER"),
        "{}",
        &table.body[..200.min(table.body.len())]
    );
    assert!(table
        .body
        .lines()
        .any(|l| l.starts_with("openai ") && l.contains(" 0.6 ")));
}

/// While the sidecar holds the data dir, `status` asks it (the address it left in the data
/// dir, or `--url`), with the token from the environment; the answer is the command's own.
#[test]
fn status_asks_the_sidecar_that_holds_the_data_dir() {
    const TOKEN: &str = "status-page-token-0123456789";
    let cli = Cli::new("provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n");
    let (config, data) = (cli.config.clone(), cli.data.clone());
    let s = Sidecar::start_env(cli, &[], &[("PROVIDER_BUDGETS_AUTH_TOKEN", TOKEN)]);
    let spend = r#"{"provider": "openai", "cost": "0.25"}"#;
    let auth = format!("Authorization: Bearer {TOKEN}");
    let headers = ["Content-Type: application/json", auth.as_str()];
    assert_eq!(s.post("/v1/spend", &headers, spend).status, 200);
    let status = |args: &[&str], token: Option<&str>| {
        let mut cmd = bare_cmd();
        cmd.arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .args(args);
        cmd.env_remove("PROVIDER_BUDGETS_AUTH_TOKEN");
        if let Some(t) = token {
            cmd.env("PROVIDER_BUDGETS_AUTH_TOKEN", t);
        }
        Run::of(cmd.output().unwrap())
    };
    let run = status(&["status"], Some(TOKEN));
    run.assert_ok();
    assert!(run.stdout.starts_with("PROVIDER"), "{run:?}");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("openai ") && l.contains(" 0.25 ")),
        "{run:?}"
    );
    let run = status(&["status", "--json"], Some(TOKEN));
    run.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(budget(&doc, "openai")["spend_nanos"], 250_000_000);
    let url = format!("http://{}/", s.addr());
    let run = status(&["status", "--url", &url], Some(TOKEN));
    run.assert_ok();
    assert!(run.stdout.contains(" 0.25 "), "{run:?}");
    // Without the token: one error line naming the sidecar, the token never printed.
    let run = status(&["status"], None);
    run.assert_error(1, &["the sidecar at http://127.0.0.1:", "401"]);
}
