//! The lifecycle of keys and chatbots over the admin API of a running daemon:
//! `botflow keys list|revoke|rotate`, `botflow chatbots rotate-secret|delete` and
//! `botflow audit` (`keys create` and `chatbots create|secret` work on the database, see
//! `bootstrap`). The API records the key that acted in the audit log, which `audit`
//! prints.

use super::api::{block_on, call_and_print, cell, print_fields, print_json_lines, time_cell, Api, ApiArgs, Table};
use crate::config::Config;
use clap::Args;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

/// Paging of a list command.
#[derive(Args, Debug)]
pub struct PageArgs {
    /// Rows per page, 1 to 500 [default: the API's, 50]
    #[arg(long, value_name = "N")]
    pub limit: Option<i64>,
    /// Start after the page that printed this cursor
    #[arg(long, conflicts_with = "all_pages")]
    pub cursor: Option<String>,
    /// Follow every page
    #[arg(long)]
    pub all_pages: bool,
}

/// A list of an account's things: keys, audit entries.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this account's (operator key; an admin key reads its own account's)
    #[arg(long, value_parser = crate::cli::id_arg)]
    account: Option<Uuid>,
    #[command(flatten)]
    page: PageArgs,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The key's id (as `keys list` shows it)
    #[arg(value_parser = crate::cli::id_arg)]
    id: Uuid,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    /// The key's id (as `keys list` shows it), or with `chatbots rotate-secret` the chatbot's
    #[arg(value_parser = crate::cli::id_arg)]
    id: Uuid,
    /// How long the old one keeps working: `0s`, `90s`, `10m`, `2h`, `7d` (at most 30 days)
    #[arg(long, value_name = "DURATION", value_parser = grace_arg)]
    grace: std::time::Duration,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// The chatbot's id
    #[arg(value_parser = crate::cli::id_arg)]
    id: Uuid,
    /// What becomes of its executions, dead letters and commands: kept and pruned as its
    /// retention says, or pruned now (in the background, in small batches)
    #[arg(long, value_enum)]
    history: crate::store::deletion::History,
    /// Cancel its unfinished executions (queued, running, retrying, waiting) instead of
    /// refusing
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// A grace period: a number and a unit (`s`, `m`, `h`, `d`), or `0`.
pub fn grace_arg(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("expected a duration such as 10m, got {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("expected a duration such as 10m (units s, m, h, d), got {s:?}")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

/// A list of `path` filtered as `a` asks, printed as a table by `row` (JSON lines with `--json`).
fn list_page(config: &Config, path: &str, a: ListArgs, table: Table, none: &str, row: impl Fn(&Value) -> Vec<String>) -> anyhow::Result<()> {
    let client = Api::new(config, &a.api)?;
    let params = [("account_id", a.account.map(|a| a.to_string())), ("limit", a.page.limit.map(|l| l.to_string()))];
    let got = block_on(client.list(path, &params, a.page.cursor.as_deref(), a.page.all_pages))?;
    if a.api.json {
        print_json_lines(&got.items);
    } else {
        let mut t = table;
        for item in &got.items {
            t.row(row(item));
        }
        t.print_or(none);
    }
    got.print_more();
    Ok(())
}

fn key_cells(k: &Value) -> Vec<String> {
    let until = match k["state"].as_str() {
        Some("revoked") => time_cell(&k["revoked_at"]),
        _ => time_cell(&k["expires_at"]),
    };
    vec![
        cell(&k["id"]),
        format!("bfk_{}_…", cell(&k["prefix"])),
        cell(&k["role"]),
        cell(&k["account_id"]),
        time_cell(&k["created_at"]),
        time_cell(&k["last_used_at"]),
        cell(&k["state"]),
        until,
    ]
}

pub fn list(config: Config, a: ListArgs) -> anyhow::Result<()> {
    let table = Table::new(&["ID", "KEY", "ROLE", "ACCOUNT", "CREATED", "LAST USED", "STATE", "UNTIL"]);
    list_page(&config, "/v1/keys", a, table, "no keys", key_cells)
}

pub fn revoke(config: Config, a: RevokeArgs) -> anyhow::Result<()> {
    call_and_print(&config, &a.api, Method::POST, &format!("/v1/keys/{}/revoke", a.id), None, |k| {
        eprintln!("key {} is revoked; its connections are being closed", a.id);
        print_key(k);
        Ok(())
    })
}

/// Prints the new key alone on stdout (as `keys create` does), the rest on stderr.
pub fn rotate(config: Config, a: RotateArgs) -> anyhow::Result<()> {
    let client = Api::new(&config, &a.api)?;
    let body = json!({"grace_seconds": a.grace.as_secs()});
    let v = block_on(client.call(Method::POST, &format!("/v1/keys/{}/rotate", a.id), Some(&body)))?;
    if a.api.json {
        println!("{v}");
        return Ok(());
    }
    eprintln!(
        "new {} key {} (shown only now); the old key {} works until {}",
        cell(&v["new"]["role"]),
        cell(&v["new"]["id"]),
        a.id,
        time_cell(&v["old"]["expires_at"])
    );
    println!("{}", cell(&v["key"]));
    Ok(())
}

/// Prints the new secret alone on stdout, the rest on stderr.
pub fn rotate_secret(config: Config, a: RotateArgs) -> anyhow::Result<()> {
    let body = json!({"grace_seconds": a.grace.as_secs()});
    call_and_print(&config, &a.api, Method::POST, &format!("/v1/chatbots/{}/rotate-secret", a.id), Some(&body), |v| {
        match v["previous_secret_expires_at"].as_str() {
            Some(_) => eprintln!(
                "new webhook secret of chatbot {}; webhooks carry the old secret's signature too until {}",
                a.id,
                time_cell(&v["previous_secret_expires_at"])
            ),
            None => eprintln!("new webhook secret of chatbot {}; the old one no longer signs", a.id),
        }
        println!("{}", cell(&v["secret"]));
        Ok(())
    })
}

pub fn delete_chatbot(config: Config, a: DeleteArgs) -> anyhow::Result<()> {
    let path = format!("/v1/chatbots/{}?history={}&force={}", a.id, a.history.as_str(), a.force);
    call_and_print(&config, &a.api, Method::DELETE, &path, None, |v| {
        let history = match a.history {
            crate::store::deletion::History::Keep => "its history is kept and pruned as its retention says",
            crate::store::deletion::History::Prune => "its history is being pruned",
        };
        eprintln!("chatbot {} is deleted; {history}", a.id);
        print_fields(&[
            ("chatbot", cell(&v["chatbot_id"])),
            ("deleted", time_cell(&v["deleted_at"])),
            ("history", cell(&v["history"])),
            ("cancelled executions", cell(&v["cancelled_executions"])),
        ]);
        Ok(())
    })
}

fn print_key(k: &Value) {
    let c = key_cells(k);
    print_fields(&[
        ("id", c[0].clone()),
        ("key", c[1].clone()),
        ("role", c[2].clone()),
        ("account", c[3].clone()),
        ("created", c[4].clone()),
        ("last used", c[5].clone()),
        ("state", c[6].clone()),
        ("revoked", time_cell(&k["revoked_at"])),
        ("expires", time_cell(&k["expires_at"])),
    ]);
}

pub fn audit(config: Config, a: ListArgs) -> anyhow::Result<()> {
    let table = Table::new(&["AT", "ACTION", "TARGET", "ACCOUNT", "BY KEY", "ROLE", "DETAILS"]);
    list_page(&config, "/v1/audit", a, table, "no audit entries", |e| {
        vec![
            time_cell(&e["at"]),
            cell(&e["action"]),
            format!("{} {}", cell(&e["target_type"]), cell(&e["target_id"])),
            cell(&e["account_id"]),
            cell(&e["actor_key_id"]),
            cell(&e["actor_role"]),
            cell(&e["details"]),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::grace_arg;
    use std::time::Duration;

    #[test]
    fn grace_periods_read_as_people_write_them() {
        assert_eq!(grace_arg("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(grace_arg("0"), Ok(Duration::ZERO));
        assert_eq!(grace_arg("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(grace_arg("7d"), Ok(Duration::from_secs(604_800)));
        assert!(grace_arg("10 minutes").unwrap_err().contains("10m"));
        assert!(grace_arg("m").is_err());
    }
}
