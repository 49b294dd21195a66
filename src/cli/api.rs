//! A client of the admin HTTP API for the CLI commands that need a running daemon,
//! and the output helpers those commands share: following pages, tables, cells.
//!
//! The address comes from `--admin`, `BOTFLOW_ADMIN_URL`, or `admin.listen` of the
//! configuration; the key from `--token`, `BOTFLOW_TOKEN`, or the operator key the
//! daemon wrote to `<data_dir>/operator.token` on its first start.
//!
//! Output: tables for people on stdout; with `--json`, the API's JSON instead: an
//! object as it came, the items of a list one JSON object per line (so a list that
//! spans pages is still one stream for `jq`).

use crate::config::Config;
use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// The admin API [default: BOTFLOW_ADMIN_URL, else http://<admin.listen>]
    #[arg(long, value_name = "URL", global = true)]
    pub admin: Option<String>,
    /// An admin or operator key [default: BOTFLOW_TOKEN, else <data_dir>/operator.token]
    #[arg(long, value_name = "KEY", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table (lists: one object per line)
    #[arg(long, global = true)]
    pub json: bool,
}

impl ApiArgs {
    /// Whether an admin API address was given on the command line or in the
    /// environment (not just configured): commands that can also work on the database
    /// directly use the API only then.
    pub fn admin_given(&self) -> bool {
        self.admin.is_some() || std::env::var("BOTFLOW_ADMIN_URL").is_ok_and(|u| !u.is_empty())
    }
}

pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(config: &Config, args: &ApiArgs) -> anyhow::Result<Api> {
        let base = match args.admin.clone().or_else(|| std::env::var("BOTFLOW_ADMIN_URL").ok().filter(|u| !u.is_empty())) {
            Some(b) => b,
            None if !config.admin.listen.is_empty() => format!("http://{}", config.admin.listen),
            None => bail!("no admin API address: pass --admin URL, set BOTFLOW_ADMIN_URL or admin.listen"),
        };
        let token = match args.token.clone().or_else(|| std::env::var("BOTFLOW_TOKEN").ok()) {
            Some(t) => t,
            None => {
                let path = config.operator_token_path();
                std::fs::read_to_string(&path)
                    .with_context(|| format!("no key: pass --token, set BOTFLOW_TOKEN, or run where {} exists", path.display()))?
                    .trim()
                    .to_string()
            }
        };
        Ok(Api { base: base.trim_end_matches('/').to_string(), token, http: reqwest::Client::new() })
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach the admin API at {} (is the daemon running?)", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text.clone())) };
        if !status.is_success() {
            let message = value["error"]["message"].as_str().unwrap_or(&text);
            match value["error"]["field"].as_str() {
                // Validation messages usually start with the field already.
                Some(field) if !message.contains(field) => bail!("{status}: {message} (field {field})"),
                _ => bail!("{status}: {message}"),
            }
        }
        Ok(value)
    }

    /// One page of a list: `path` with the filters that are set, from `cursor`.
    pub async fn get_page(&self, path: &str, params: &[(&str, Option<String>)], cursor: Option<&str>) -> anyhow::Result<Page> {
        let mut params = params.to_vec();
        params.push(("cursor", cursor.map(str::to_string)));
        let v = self.call(reqwest::Method::GET, &with_query(path, &params), None).await?;
        let Value::Array(items) = v["items"].clone() else { bail!("the answer of GET {path} is not a page: {v}") };
        Ok(Page { items, next_cursor: v["next_cursor"].as_str().map(str::to_string) })
    }

    /// A list command's items: one page from `cursor`, or with `all` every page (and
    /// then no next cursor).
    pub async fn list(&self, path: &str, params: &[(&str, Option<String>)], cursor: Option<&str>, all: bool) -> anyhow::Result<Page> {
        if all {
            Ok(Page { items: self.get_all_pages(path, params).await?, next_cursor: None })
        } else {
            self.get_page(path, params, cursor).await
        }
    }

    /// Every item of a list, following `next_cursor` from the first page to the last.
    pub async fn get_all_pages(&self, path: &str, params: &[(&str, Option<String>)]) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self.get_page(path, params, cursor.as_deref()).await?;
            all.extend(page.items);
            match page.next_cursor {
                // A cursor handed back unchanged would loop for ever.
                Some(next) if cursor.as_deref() == Some(next.as_str()) => bail!("GET {path} returned the same cursor twice"),
                Some(next) => cursor = Some(next),
                None => return Ok(all),
            }
        }
    }
}

/// One page of a list, as every list endpoint answers it.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Value>,
    pub next_cursor: Option<String>,
}

impl Page {
    /// Tells a person on stderr how to ask for the next page, if there is one.
    pub fn print_more(&self) {
        if let Some(c) = &self.next_cursor {
            eprintln!("more: --cursor {c}");
        }
    }
}

/// `path` with a query string of the parameters that are set, percent-encoded.
pub fn with_query(path: &str, params: &[(&str, Option<String>)]) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        if let Some(v) = v {
            query.append_pair(k, v);
        }
    }
    match query.finish() {
        q if q.is_empty() => path.to_string(),
        q => format!("{path}?{q}"),
    }
}

/// A time for the query string: RFC 3339 in UTC.
/// A workflow as people read it: its name and version (the id when the name is
/// unknown), and with `with_id` the id after it; `--json` keeps every field.
pub fn workflow_cell(v: &Value, with_id: bool) -> String {
    let version = cell(&v["workflow_version"]);
    match v["workflow_name"].as_str() {
        Some(name) if with_id => format!("{name} v{version} ({})", cell(&v["workflow_id"])),
        Some(name) => format!("{name} v{version}"),
        None => format!("{} v{version}", cell(&v["workflow_id"])),
    }
}

pub fn rfc3339(t: Option<chrono::DateTime<chrono::Utc>>) -> Option<String> {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// Prints values one JSON object per line.
pub fn print_json_lines(items: &[Value]) {
    for item in items {
        println!("{item}");
    }
}

/// A plain-text table: a header row, columns padded to their widest cell, two spaces
/// between columns. Cells are one line each (newlines become spaces).
pub struct Table {
    header: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table { header: header.iter().map(|h| h.to_string()).collect(), right: vec![false; header.len()], rows: Vec::new() }
    }

    /// Right-aligns the columns given by index (numbers).
    pub fn right(mut self, columns: &[usize]) -> Table {
        for &c in columns {
            self.right[c] = true;
        }
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells.into_iter().map(|c| c.replace(['\n', '\r'], " ")).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.header.len())
            .map(|i| self.rows.iter().chain([&self.header]).map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in [&self.header].into_iter().chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[i] - cell.chars().count());
                if self.right[i] {
                    line.push_str(&pad);
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&pad);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Prints the table on stdout; an empty one prints nothing there and says `none` on
    /// stderr, so a script sees no rows rather than a lone header.
    pub fn print_or(&self, none: &str) {
        if self.is_empty() {
            eprintln!("{none}");
        } else {
            print!("{}", self.render());
        }
    }
}

/// Prints `name  value` lines with the values aligned, for one record; values that
/// are `-` (absent) are left out.
pub fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    for (k, v) in fields.iter().filter(|(_, v)| v != "-") {
        println!("{k:<width$}  {}", v.replace(['\n', '\r'], " "));
    }
}

/// A cell for a JSON value: strings as they are, null as `-`, anything else as JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A timestamp cell: `2026-11-25 10:00:00` (UTC), `-` when absent.
pub fn time_cell(v: &Value) -> String {
    match v.as_str().map(chrono::DateTime::parse_from_rfc3339) {
        Some(Ok(t)) => t.with_timezone(&chrono::Utc).format("%Y-%m-%d %H:%M:%S").to_string(),
        _ => cell(v),
    }
}

/// A duration for people: `850ms`, `2.31s`, `4m05s`, `3h12m`.
pub fn duration_cell(seconds: Option<f64>) -> String {
    let Some(s) = seconds.filter(|s| s.is_finite() && *s >= 0.0) else { return "-".into() };
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 60.0 {
        format!("{s:.2}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

/// The time between two RFC 3339 timestamps, in seconds.
pub fn seconds_between(start: &Value, end: &Value) -> Option<f64> {
    let t = |v: &Value| v.as_str().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
    Some((t(end)? - t(start)?).num_microseconds()? as f64 / 1e6)
}

/// One request, printed as the API's JSON with `--json`, else by `human`.
pub fn call_and_print(
    config: &Config,
    args: &ApiArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    human: impl FnOnce(&Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let client = Api::new(config, args)?;
    let v = block_on(client.call(method, path, body))?;
    if args.json {
        println!("{v}");
        Ok(())
    } else {
        human(&v)
    }
}

/// Runs an async CLI body on a small runtime.
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn queries_leave_out_unset_parameters_and_encode_the_rest() {
        assert_eq!(with_query("/v1/x", &[("a", None)]), "/v1/x");
        assert_eq!(
            with_query("/v1/x", &[("q", Some("time out & 50%".into())), ("a", None), ("since", Some("2026-01-01T00:00:00+01:00".into()))]),
            "/v1/x?q=time+out+%26+50%25&since=2026-01-01T00%3A00%3A00%2B01%3A00"
        );
    }

    #[test]
    fn tables_pad_columns_and_align_numbers_right() {
        let mut t = Table::new(&["NAME", "COUNT", "NOTE"]).right(&[1]);
        t.row(vec!["refunds".into(), "7".into(), "two\nlines".into()]);
        t.row(vec!["x".into(), "1200".into(), "-".into()]);
        assert_eq!(t.render(), "NAME     COUNT  NOTE\nrefunds      7  two lines\nx         1200  -\n");
        assert!(Table::new(&["A"]).is_empty());
    }

    #[test]
    fn cells_for_people() {
        assert_eq!(cell(&Value::Null), "-");
        assert_eq!(cell(&json!("a")), "a");
        assert_eq!(cell(&json!(3)), "3");
        assert_eq!(time_cell(&json!("2026-11-25T10:00:00.123456+01:00")), "2026-11-25 09:00:00");
        assert_eq!(time_cell(&Value::Null), "-");
        assert_eq!(duration_cell(Some(0.0123)), "12ms");
        assert_eq!(duration_cell(Some(2.314)), "2.31s");
        assert_eq!(duration_cell(Some(245.0)), "4m05s");
        assert_eq!(duration_cell(Some(11_520.0)), "3h12m");
        assert_eq!(duration_cell(None), "-");
        assert_eq!(seconds_between(&json!("2026-01-01T00:00:00Z"), &json!("2026-01-01T00:00:01.5Z")), Some(1.5));
    }
}
