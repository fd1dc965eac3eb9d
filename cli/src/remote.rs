//! `status` against a running sidecar: while `serve` holds the data dir (sled locks it), the
//! command asks the sidecar instead (`status --url URL`, or the address `serve` wrote in the
//! data dir, [`URL_FILE`]). The table comes from `GET /` with `Accept: text/plain`, the JSON from
//! `GET /v1/budgets`: the same documents the command prints itself. The token, when the sidecar
//! has one, is read from `PROVIDER_BUDGETS_AUTH_TOKEN`.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file in the data dir holding the running sidecar's base URL (`http://ADDR/`), written
/// once it listens and removed when it stops.
pub(crate) const URL_FILE: &str = "sidecar.url";

pub(crate) fn url_file(data_dir: &Path) -> PathBuf {
    data_dir.join(URL_FILE)
}

/// The base URL a running sidecar left in `data_dir`, if any.
pub(crate) fn found_url(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(url_file(data_dir)).ok()?;
    let url = text.trim();
    url.starts_with("http://").then(|| url.to_owned())
}

/// The status table (or, with `json`, the status document) from the sidecar at `base`.
pub(crate) fn status(base: &str, json: bool) -> Result<String, String> {
    let base = base.trim_end_matches('/');
    let url = if json {
        format!("{base}/v1/budgets")
    } else {
        format!("{base}/")
    };
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let mut request = agent.get(&url).header("Accept", "text/plain");
    let token = std::env::var("PROVIDER_BUDGETS_AUTH_TOKEN").unwrap_or_default();
    if !token.trim().is_empty() {
        request = request.header("Authorization", &format!("Bearer {}", token.trim()));
    }
    let mut answer = request
        .call()
        .map_err(|e| format!("the sidecar at {base} did not answer the status: {e}"))?;
    answer
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("the sidecar at {base}: {e}"))
}
