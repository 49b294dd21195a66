//! `botflow workflows`: a chatbot's workflows. `apply` works on the configured
//! database without a daemon (the bootstrap path, as in the quickstart), or through
//! the admin API when an address is given with `--admin` or `BOTFLOW_ADMIN_URL`; both
//! create or replace by name in one transaction and print the same way. The other
//! subcommands (list, get, versions, copy, enable, disable, delete, dry-run) are over
//! the admin API of a running daemon.

use super::api::{block_on, call_and_print, cell, print_json_lines, time_cell, Api, ApiArgs, Table};
use super::bootstrap;
use crate::admin::page::MAX_LIMIT;
use crate::config::Config;
use crate::store::workflows as store;
use crate::workflow::parse_workflows;
use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use uuid::Uuid;

#[derive(Subcommand, Debug)]
pub enum WorkflowsCmd {
    /// Create or replace workflows by name from a JSON or YAML file (one or a list); prints
    /// their ids. Writes to the configured database, or goes through the admin API when
    /// --admin or BOTFLOW_ADMIN_URL is given
    Apply {
        /// The chatbot's id
        #[arg(long, value_parser = crate::cli::id_arg)]
        chatbot: Uuid,
        /// The file, or - for stdin
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the chatbot's workflows, oldest first (every page)
    List {
        /// The chatbot's id
        #[arg(long, value_parser = crate::cli::id_arg)]
        chatbot: Uuid,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print a workflow's definition as JSON, ready for `apply` (--json: the whole record)
    Get(WorkflowRef),
    /// Every saved version of a workflow, newest first
    Versions(WorkflowRef),
    /// Copy a workflow to another chatbot; prints the copy's id
    Copy {
        /// The chatbot's id
        #[arg(long, value_parser = crate::cli::id_arg)]
        chatbot: Uuid,
        /// The workflow's id
        #[arg(value_parser = crate::cli::id_arg, value_name = "WID")]
        workflow: Uuid,
        /// The chatbot that gets the copy
        #[arg(long, value_parser = crate::cli::id_arg, value_name = "CHATBOT")]
        to: Uuid,
        /// The copy's name [default: the original's]
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Enable a workflow: new events may start it again
    Enable(WorkflowRef),
    /// Disable a workflow: new events no longer start it; running executions finish
    Disable(WorkflowRef),
    /// Delete a workflow; executions already started finish on their version
    Delete(WorkflowRef),
    /// Would a workflow match an event? Prints "match", or "no match: " and the first
    /// check that failed; exits 0 either way
    DryRun {
        /// The chatbot's id
        #[arg(long, value_parser = crate::cli::id_arg)]
        chatbot: Uuid,
        /// A workflow file (JSON or YAML, one workflow), or - for stdin
        #[arg(long, value_name = "FILE", required_unless_present = "workflow_id", conflicts_with = "workflow_id")]
        file: Option<PathBuf>,
        /// A saved workflow of the chatbot
        #[arg(long, value_parser = crate::cli::id_arg, value_name = "WID")]
        workflow_id: Option<Uuid>,
        /// The event as it would arrive (JSON or YAML: at least "type", usually "data"), or - for stdin
        #[arg(long, value_name = "FILE")]
        event: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// One workflow of a chatbot, on the admin API.
#[derive(Args, Debug)]
pub struct WorkflowRef {
    /// The chatbot's id
    #[arg(long, value_parser = crate::cli::id_arg)]
    chatbot: Uuid,
    /// The workflow's id
    #[arg(value_parser = crate::cli::id_arg, value_name = "WID")]
    workflow: Uuid,
    #[command(flatten)]
    api: ApiArgs,
}

/// What `apply` did to one workflow: the admin API's answer, and what the database
/// path turns its result into, so both print through `print_applied`.
#[derive(Debug, Serialize, Deserialize)]
struct Applied {
    id: Uuid,
    name: String,
    /// created, updated or unchanged.
    result: String,
    version: i32,
}

impl Applied {
    fn from_store(a: &store::Applied, name: &str) -> Applied {
        let (result, version) = match a {
            store::Applied::Created { .. } => ("created", 1),
            store::Applied::Updated { version, .. } => ("updated", *version),
            store::Applied::Unchanged { version, .. } => ("unchanged", *version),
        };
        Applied { id: a.id(), name: name.to_string(), result: result.into(), version }
    }
}

pub fn run(config: Config, cmd: WorkflowsCmd) -> anyhow::Result<()> {
    match cmd {
        WorkflowsCmd::Apply { chatbot, file, api } => {
            let bytes = read_input(&file)?;
            let applied = if api.admin_given() {
                let doc = document(&bytes, &file)?;
                let client = Api::new(&config, &api)?;
                let path = format!("/v1/chatbots/{chatbot}/workflows/apply");
                let v = block_on(client.call(Method::POST, &path, Some(&doc)))?;
                serde_json::from_value::<Vec<Applied>>(v).context("unexpected answer from the admin API's apply")?
            } else {
                let specs = parse_workflows(&bytes).map_err(|e| anyhow!("{}: {e}", file.display()))?;
                let applied = bootstrap::apply_workflows(&config, chatbot, &specs)?;
                applied.iter().zip(&specs).map(|(a, spec)| Applied::from_store(a, &spec.name)).collect()
            };
            print_applied(&applied, api.json)?;
        }
        WorkflowsCmd::List { chatbot, api } => {
            let client = Api::new(&config, &api)?;
            let path = format!("/v1/chatbots/{chatbot}/workflows");
            let items = block_on(client.get_all_pages(&path, &[("limit", Some(MAX_LIMIT.to_string()))]))?;
            if api.json {
                print_json_lines(&items);
                return Ok(());
            }
            let mut t = Table::new(&["ID", "NAME", "VERSION", "ENABLED", "UPDATED"]).right(&[2]);
            for w in &items {
                t.row(vec![cell(&w["id"]), cell(&w["name"]), cell(&w["version"]), yes_no(&w["enabled"]), time_cell(&w["updated_at"])]);
            }
            t.print_or(&format!("chatbot {chatbot} has no workflows"));
        }
        WorkflowsCmd::Get(WorkflowRef { chatbot, workflow, api }) => {
            let path = format!("/v1/chatbots/{chatbot}/workflows/{workflow}");
            call_and_print(&config, &api, Method::GET, &path, None, |w| {
                eprintln!(
                    "workflow {:?}, version {}, {}, updated {}",
                    w["name"].as_str().unwrap_or(""),
                    w["version"],
                    if w["enabled"] == true { "enabled" } else { "disabled" },
                    time_cell(&w["updated_at"])
                );
                println!("{}", serde_json::to_string_pretty(&w["definition"])?);
                Ok(())
            })?;
        }
        WorkflowsCmd::Versions(WorkflowRef { chatbot, workflow, api }) => {
            let client = Api::new(&config, &api)?;
            let path = format!("/v1/chatbots/{chatbot}/workflows/{workflow}/versions");
            let items = block_on(client.get_all_pages(&path, &[("limit", Some(MAX_LIMIT.to_string()))]))?;
            if api.json {
                print_json_lines(&items);
                return Ok(());
            }
            let mut t = Table::new(&["VERSION", "SAVED", "NAME", "STEPS"]).right(&[0, 3]);
            for v in &items {
                let d = &v["definition"];
                let steps = d["steps"].as_array().map_or(0, Vec::len);
                t.row(vec![cell(&v["version"]), time_cell(&v["created_at"]), cell(&d["name"]), steps.to_string()]);
            }
            t.print_or(&format!("workflow {workflow} has no saved versions"));
        }
        WorkflowsCmd::Copy { chatbot, workflow, to, name, api } => {
            let client = Api::new(&config, &api)?;
            let mut body = json!({ "target_chatbot_id": to });
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            let path = format!("/v1/chatbots/{chatbot}/workflows/{workflow}/copy");
            let w = block_on(client.call(Method::POST, &path, Some(&body)))?;
            eprintln!("copied workflow {workflow} to chatbot {to} as {:?}", w["name"].as_str().unwrap_or(""));
            if api.json {
                println!("{w}");
            } else {
                println!("{}", cell(&w["id"]));
            }
        }
        WorkflowsCmd::Enable(WorkflowRef { chatbot, workflow, api }) => set_enabled(&config, chatbot, workflow, &api, true)?,
        WorkflowsCmd::Disable(WorkflowRef { chatbot, workflow, api }) => set_enabled(&config, chatbot, workflow, &api, false)?,
        WorkflowsCmd::Delete(WorkflowRef { chatbot, workflow, api }) => {
            let client = Api::new(&config, &api)?;
            block_on(client.call(Method::DELETE, &format!("/v1/chatbots/{chatbot}/workflows/{workflow}"), None))?;
            eprintln!("deleted workflow {workflow}");
        }
        WorkflowsCmd::DryRun { chatbot, file, workflow_id, event, api } => {
            if file.as_deref() == Some(Path::new("-")) && event.as_os_str() == "-" {
                bail!("only one of --file and --event can be read from stdin");
            }
            let mut body = json!({ "event": document(&read_input(&event)?, &event)? });
            match (file, workflow_id) {
                (Some(f), _) => body["workflow"] = one_workflow(document(&read_input(&f)?, &f)?, &f)?,
                (None, Some(wid)) => body["workflow_id"] = json!(wid),
                (None, None) => bail!("give --file or --workflow-id"),
            }
            let path = format!("/v1/chatbots/{chatbot}/workflows/dry-run");
            call_and_print(&config, &api, Method::POST, &path, Some(&body), |v| {
                if v["matches"] == true {
                    println!("match");
                } else {
                    println!("no match: {}", v["reason"].as_str().unwrap_or("(no reason given)"));
                }
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// Stdout: one id per workflow, in the file's order (with --json, one object per line).
/// Stderr: what happened to each, for people.
fn print_applied(applied: &[Applied], as_json: bool) -> anyhow::Result<()> {
    for a in applied {
        match a.result.as_str() {
            "created" => eprintln!("created workflow {:?}", a.name),
            "updated" => eprintln!("updated workflow {:?} to version {}", a.name, a.version),
            "unchanged" => eprintln!("workflow {:?} unchanged (version {})", a.name, a.version),
            other => eprintln!("workflow {:?}: {other} (version {})", a.name, a.version),
        }
        if as_json {
            println!("{}", serde_json::to_string(a)?);
        } else {
            println!("{}", a.id);
        }
    }
    Ok(())
}

fn set_enabled(config: &Config, chatbot: Uuid, workflow: Uuid, api: &ApiArgs, enabled: bool) -> anyhow::Result<()> {
    let client = Api::new(config, api)?;
    let path = format!("/v1/chatbots/{chatbot}/workflows/{workflow}");
    let w = block_on(client.call(Method::PATCH, &path, Some(&json!({ "enabled": enabled }))))?;
    eprintln!("workflow {:?} {}", w["name"].as_str().unwrap_or(""), if enabled { "enabled" } else { "disabled" });
    if api.json {
        println!("{w}");
    }
    Ok(())
}

fn yes_no(v: &Value) -> String {
    if v == true { "yes" } else { "no" }.into()
}

/// The bytes of a file, or of stdin for `-`.
fn read_input(file: &Path) -> anyhow::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::stdin().read_to_end(&mut b).context("cannot read stdin")?;
        Ok(b)
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
    }
}

/// A JSON or YAML document as JSON for the API, without validating it: the daemon
/// validates, with the same parser and the same field names as the database path.
/// JSON when the first non-blank byte is `{` or `[` (as `parse_workflows` decides).
fn document(bytes: &[u8], file: &Path) -> anyhow::Result<Value> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => bail!("{}: the document is empty", file.display()),
        Some(b'{' | b'[') => serde_json::from_slice(bytes).with_context(|| format!("{}: invalid JSON", file.display())),
        Some(_) => {
            let text = std::str::from_utf8(bytes).with_context(|| format!("{}: not UTF-8", file.display()))?;
            serde_yaml_ng::from_str(text).with_context(|| format!("{}: invalid YAML", file.display()))
        }
    }
}

/// The workflow of a file that holds one (a list of exactly one will do too).
fn one_workflow(doc: Value, file: &Path) -> anyhow::Result<Value> {
    match doc {
        Value::Array(mut items) if items.len() == 1 => Ok(items.remove(0)),
        Value::Array(items) => bail!("{}: dry-run tries one workflow; the file has {}", file.display(), items.len()),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_json_or_yaml() {
        let f = Path::new("w.yaml");
        assert_eq!(document(b"  {\"name\": \"a\"}", f).unwrap(), json!({"name": "a"}));
        assert_eq!(document(b"name: a\nsteps: []\n", f).unwrap(), json!({"name": "a", "steps": []}));
        assert!(document(b"  \n", f).unwrap_err().to_string().contains("empty"));
        assert!(format!("{:#}", document(b"{nope", f).unwrap_err()).contains("invalid JSON"));
        assert_eq!(one_workflow(json!([{"name": "a"}]), f).unwrap(), json!({"name": "a"}));
        assert!(one_workflow(json!([{}, {}]), f).unwrap_err().to_string().contains("has 2"));
    }
}
