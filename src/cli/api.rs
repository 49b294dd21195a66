//! A client of the admin HTTP API for the CLI commands that need a running daemon.
//!
//! The address comes from `--admin`, `BOTFLOW_ADMIN_URL`, or `admin.listen` of the
//! configuration; the key from `--token`, `BOTFLOW_TOKEN`, or the operator key the
//! daemon wrote to `<data_dir>/operator.token` on its first start.

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
    /// Print the API's JSON instead of a table
    #[arg(long, global = true)]
    pub json: bool,
}

pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(config: &Config, args: &ApiArgs) -> anyhow::Result<Api> {
        let base = match args.admin.clone().or_else(|| std::env::var("BOTFLOW_ADMIN_URL").ok()) {
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
                Some(field) => bail!("{status}: {message} (field {field})"),
                None => bail!("{status}: {message}"),
            }
        }
        Ok(value)
    }
}

/// Runs an async CLI body on a small runtime.
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}
