//! The admin HTTP API driven the way its users drive it: over real HTTP against a
//! running daemon and PostgreSQL. Who may reach what (every endpoint of the OpenAPI
//! document × every role × own or other account), workflows and their versions,
//! changes reaching the hot path, execution history pages and filters, analytics
//! against executions whose outcomes and durations the test controls, dead letters,
//! HTTP ingest, bad input and health.

mod common;

use botflow::store::accounts::{self, Role};
use chrono::{DateTime, DurationRound, SecondsFormat, TimeDelta, Utc};
use common::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

// ----------------------------------------------------------------------------------
// HTTP

#[derive(Clone)]
enum Body {
    Json(Value),
    /// A content type ("" for none) and raw bytes.
    Raw(&'static str, Vec<u8>),
}

#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Key(&'a str),
    /// The whole Authorization header.
    Header(&'a str),
}

#[derive(Debug)]
struct Resp {
    status: u16,
    json: Value,
    text: String,
}

impl Resp {
    /// The body, after checking the status.
    #[track_caller]
    fn ok(&self, status: u16) -> &Value {
        assert_eq!(self.status, status, "unexpected answer: {}", self.text);
        &self.json
    }

    /// An error answer: its status, `error.code`, and `error.field` when given.
    #[track_caller]
    fn err(&self, status: u16, code: &str, field: Option<&str>) {
        assert_eq!(self.status, status, "unexpected answer: {}", self.text);
        assert_eq!(self.json["error"]["code"], code, "{}", self.text);
        assert!(self.json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "a message: {}", self.text);
        if let Some(f) = field {
            assert_eq!(self.json["error"]["field"], f, "{}", self.text);
        }
    }
}

#[derive(Clone)]
struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(d: &TestDaemon) -> Api {
        Api { base: d.admin(), http: reqwest::Client::new() }
    }

    async fn call(&self, method: &str, path: &str, auth: Auth<'_>, body: Option<Body>) -> Resp {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(m, format!("{}{path}", self.base));
        match auth {
            Auth::None => {}
            Auth::Key(k) => req = req.bearer_auth(k),
            Auth::Header(h) => req = req.header("authorization", h),
        }
        match body {
            Some(Body::Json(v)) => req = req.json(&v),
            Some(Body::Raw(ct, bytes)) => {
                if !ct.is_empty() {
                    req = req.header("content-type", ct);
                }
                req = req.body(bytes);
            }
            None => {}
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp { status, json, text }
    }

    async fn get(&self, key: &str, path: &str) -> Resp {
        self.call("GET", path, Auth::Key(key), None).await
    }

    async fn send(&self, method: &str, key: &str, path: &str, body: Value) -> Resp {
        self.call(method, path, Auth::Key(key), Some(Body::Json(body))).await
    }

    async fn raw(&self, method: &str, key: &str, path: &str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Resp {
        self.call(method, path, Auth::Key(key), Some(Body::Raw(content_type, body.into()))).await
    }

    /// POST /v1/events with a JSON array; the answer's body.
    async fn ingest(&self, key: &str, events: &[Value]) -> Value {
        self.send("POST", key, "/v1/events", Value::Array(events.to_vec())).await.ok(200).clone()
    }

    /// Every item of a list, following its cursors.
    async fn all(&self, key: &str, path: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let p = match &cursor {
                Some(c) => format!("{path}{sep}cursor={c}"),
                None => path.to_string(),
            };
            let v = self.get(key, &p).await.ok(200).clone();
            out.extend(v["items"].as_array().expect("items").iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
            assert!(out.len() < 100_000, "a list that never ends");
        }
    }
}

/// A query string, encoded.
fn qs(pairs: &[(&str, String)]) -> String {
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

// ----------------------------------------------------------------------------------
// Data

fn ev(id: &str, bot: Uuid, kind: &str, conversation: &str, data: Value) -> Value {
    json!({"id": id, "chatbot_id": bot, "type": kind, "conversation_id": conversation,
           "occurred_at": "2026-11-25T10:00:00Z", "data": data})
}

fn tag_wf(name: &str, event: &str) -> Value {
    json!({"name": name, "trigger": {"event": event}, "steps": [{"id": "t", "action": "tag", "tags": ["seen"]}]})
}

fn hook_wf(name: &str, event: &str, step: &str, url: &str, max_attempts: u32) -> Value {
    json!({
        "name": name,
        "trigger": {"event": event},
        "steps": [{"id": step, "action": "webhook", "url": url, "timeout_ms": 5000}],
        "retry": {"max_attempts": max_attempts, "initial_backoff_ms": 20, "max_backoff_ms": 20, "jitter": false},
    })
}

async fn key(d: &TestDaemon, account: Uuid, role: Role) -> String {
    accounts::create_key(&d.store, account, role).await.unwrap()
}

fn operator(d: &TestDaemon) -> String {
    d.app().operator_key.clone().expect("a fresh database gets an operator key")
}

#[track_caller]
fn uuid_of(v: &Value) -> Uuid {
    v.as_str().unwrap_or_else(|| panic!("not a uuid: {v}")).parse().unwrap()
}

#[track_caller]
fn time_of(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}"))).unwrap().with_timezone(&Utc)
}

fn ids(items: &[Value]) -> Vec<Uuid> {
    items.iter().map(|i| uuid_of(&i["id"])).collect()
}

async fn scalar(db: &tokio_postgres::Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
    db.query_one(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

async fn uuids(db: &tokio_postgres::Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Vec<Uuid> {
    db.query(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(|r| r.get(0)).collect()
}

/// Waits (with the common deadline) until a count query answers `n`.
async fn wait_count(db: &tokio_postgres::Client, sql: &str, params: &[&(dyn ToSql + Sync)], n: i64) {
    let start = Instant::now();
    loop {
        let c = scalar(db, sql, params).await;
        if c == n {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "waited for {n} from {sql}; have {c}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `cond` holds; panics at the deadline.
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `percentile_cont` of a sample, as PostgreSQL defines it.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = q * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

// ----------------------------------------------------------------------------------
// 1. Ownership matrix

/// Every endpoint the matrix knows; the OpenAPI document must list exactly these.
const MATRIX: &[&str] = &[
    "GET /livez",
    "GET /readyz",
    "GET /v1/chatbots",
    "POST /v1/chatbots",
    "GET /v1/chatbots/{id}",
    "DELETE /v1/chatbots/{id}",
    "GET /v1/chatbots/{id}/analytics",
    "GET /v1/chatbots/{id}/dead-letters",
    "POST /v1/chatbots/{id}/dead-letters/discard",
    "POST /v1/chatbots/{id}/dead-letters/replay",
    "GET /v1/chatbots/{id}/executions",
    "GET /v1/chatbots/{id}/limits",
    "PUT /v1/chatbots/{id}/limits",
    "GET /v1/chatbots/{id}/retention",
    "PUT /v1/chatbots/{id}/retention",
    "POST /v1/chatbots/{id}/rotate-secret",
    "GET /v1/chatbots/{id}/workflows",
    "POST /v1/chatbots/{id}/workflows",
    "POST /v1/chatbots/{id}/workflows/apply",
    "POST /v1/chatbots/{id}/workflows/dry-run",
    "GET /v1/chatbots/{id}/workflows/{wid}",
    "PUT /v1/chatbots/{id}/workflows/{wid}",
    "PATCH /v1/chatbots/{id}/workflows/{wid}",
    "DELETE /v1/chatbots/{id}/workflows/{wid}",
    "POST /v1/chatbots/{id}/workflows/{wid}/copy",
    "GET /v1/chatbots/{id}/workflows/{wid}/versions",
    "GET /v1/dead-letters",
    "GET /v1/dead-letters/{id}",
    "DELETE /v1/dead-letters/{id}",
    "POST /v1/dead-letters/{id}/replay",
    "POST /v1/events",
    "GET /v1/executions/{eid}",
    "GET /v1/keys",
    "POST /v1/keys/{kid}/revoke",
    "POST /v1/keys/{kid}/rotate",
    "GET /v1/audit",
];

/// (method, path, success status) of every operation in the OpenAPI document.
fn documented_endpoints() -> Vec<(String, String, u16)> {
    let doc = serde_json::to_value(botflow::admin::openapi()).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            if !["get", "put", "post", "delete", "patch", "head", "options", "trace"].contains(&method.as_str()) {
                continue;
            }
            let success = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| k.starts_with('2'))
                .map(|k| k.parse::<u16>().unwrap())
                .min()
                .unwrap_or_else(|| panic!("{method} {path} documents no success answer"));
            out.push((method.to_uppercase(), path.clone(), success));
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Ingest,
    Admin,
    Operator,
}

/// One account's resources as the matrix uses them.
struct Side {
    account: Uuid,
    bot: Uuid,
    bot2: Uuid,
    workflow: Uuid,
    definition: Value,
    /// A workflow that only calls expected to fail are pointed at (it must survive).
    spare: Uuid,
    execution: Uuid,
    executions: Vec<Uuid>,
    /// A dead letter only calls expected to fail act on (it must stay open).
    witness: Uuid,
    /// Open letters for the calls expected to replay or discard one.
    letters: Vec<Uuid>,
    ingest: String,
    /// A key of the account made for each call that revokes or rotates one.
    doomed_key: Uuid,
    /// A chatbot of the account made for each call that deletes one.
    doomed_bot: Uuid,
}

impl Side {
    /// Random ids everywhere: what "does not exist" looks like.
    fn ghost(definition: Value) -> Side {
        let r = Uuid::new_v4;
        Side {
            account: r(),
            bot: r(),
            bot2: r(),
            workflow: r(),
            definition,
            spare: r(),
            execution: r(),
            executions: vec![],
            witness: r(),
            letters: vec![],
            ingest: String::new(),
            doomed_key: r(),
            doomed_bot: r(),
        }
    }
}

async fn matrix_side(d: &TestDaemon, api: &Api, name: &str, receiver: &Receiver) -> Side {
    let t = tenant(&d.store, name, 2).await;
    let bot = t.chatbots[0];
    let definition = hook_wf(&format!("{name}-flow"), "x.go", "call", &receiver.url("/dead"), 1);
    let workflow = apply(&d.store, bot, definition.clone()).await[0];
    let spare = apply(&d.store, bot, tag_wf(&format!("{name}-spare"), "x.spare")).await[0];
    let events: Vec<Value> = (0..6).map(|i| ev(&format!("{name}-e{i}"), bot, "x.go", "c-1", json!({}))).collect();
    let r = api.ingest(&t.key, &events).await;
    assert_eq!(r["acked"], 6, "{r}");
    let db = d.db().await;
    wait_count(&db, "SELECT count(*) FROM dead_letters WHERE chatbot_id = $1", &[&bot], 6).await;
    let letters = uuids(&db, "SELECT id FROM dead_letters WHERE chatbot_id = $1 ORDER BY created_at, id", &[&bot]).await;
    let executions = uuids(&db, "SELECT id FROM executions WHERE chatbot_id = $1 ORDER BY created_at, id", &[&bot]).await;
    Side {
        account: t.account,
        bot,
        bot2: t.chatbots[1],
        workflow,
        definition,
        spare,
        execution: executions[0],
        executions,
        witness: letters[0],
        letters: letters[1..].to_vec(),
        ingest: t.key,
        doomed_key: Uuid::nil(),
        doomed_bot: Uuid::nil(),
    }
}

/// The path (with query) and body of one call of `ep` against `s`.
fn matrix_request(ep: &str, s: &Side, delete_workflow: Uuid, letter: Uuid, tag: &str) -> (String, Option<Value>) {
    let (bot, wid) = (s.bot, s.workflow);
    let wf = format!("/v1/chatbots/{bot}/workflows/{wid}");
    let nothing = json!({"q": "no letter has this text"});
    match ep {
        "GET /livez" => ("/livez".into(), None),
        "GET /readyz" => ("/readyz".into(), None),
        "GET /v1/chatbots" => (format!("/v1/chatbots?account_id={}", s.account), None),
        "POST /v1/chatbots" => ("/v1/chatbots".into(), Some(json!({"name": format!("bot-{tag}"), "account_id": s.account}))),
        "GET /v1/chatbots/{id}" => (format!("/v1/chatbots/{bot}"), None),
        "DELETE /v1/chatbots/{id}" => (format!("/v1/chatbots/{}?history=keep", s.doomed_bot), None),
        "GET /v1/chatbots/{id}/analytics" => (format!("/v1/chatbots/{bot}/analytics"), None),
        "GET /v1/chatbots/{id}/dead-letters" => (format!("/v1/chatbots/{bot}/dead-letters"), None),
        "POST /v1/chatbots/{id}/dead-letters/discard" => (format!("/v1/chatbots/{bot}/dead-letters/discard"), Some(nothing)),
        "POST /v1/chatbots/{id}/dead-letters/replay" => (format!("/v1/chatbots/{bot}/dead-letters/replay"), Some(nothing)),
        "GET /v1/chatbots/{id}/executions" => (format!("/v1/chatbots/{bot}/executions"), None),
        "GET /v1/chatbots/{id}/limits" => (format!("/v1/chatbots/{bot}/limits"), None),
        "PUT /v1/chatbots/{id}/limits" => {
            (format!("/v1/chatbots/{bot}/limits"), Some(json!({"events_per_second": 1_000_000, "burst": 1_000_000})))
        }
        "GET /v1/chatbots/{id}/retention" => (format!("/v1/chatbots/{bot}/retention"), None),
        // Less than the defaults: what an owner may set.
        "PUT /v1/chatbots/{id}/retention" => (format!("/v1/chatbots/{bot}/retention"), Some(json!({"executions_days": 30}))),
        "GET /v1/chatbots/{id}/workflows" => (format!("/v1/chatbots/{bot}/workflows"), None),
        "POST /v1/chatbots/{id}/workflows" => (format!("/v1/chatbots/{bot}/workflows"), Some(tag_wf(&format!("wf-{tag}"), "x.other"))),
        "POST /v1/chatbots/{id}/workflows/apply" => {
            (format!("/v1/chatbots/{bot}/workflows/apply"), Some(json!([tag_wf(&format!("applied-{tag}"), "x.other")])))
        }
        "POST /v1/chatbots/{id}/workflows/dry-run" => (
            format!("/v1/chatbots/{bot}/workflows/dry-run"),
            Some(json!({"workflow_id": wid, "event": {"type": "x.go", "data": {}}})),
        ),
        "GET /v1/chatbots/{id}/workflows/{wid}" => (wf, None),
        "PUT /v1/chatbots/{id}/workflows/{wid}" => (wf, Some(s.definition.clone())),
        "PATCH /v1/chatbots/{id}/workflows/{wid}" => (wf, Some(json!({"enabled": true}))),
        "DELETE /v1/chatbots/{id}/workflows/{wid}" => (format!("/v1/chatbots/{bot}/workflows/{delete_workflow}"), None),
        "POST /v1/chatbots/{id}/workflows/{wid}/copy" => {
            (format!("{wf}/copy"), Some(json!({"target_chatbot_id": s.bot2, "name": format!("copy-{tag}")})))
        }
        "GET /v1/chatbots/{id}/workflows/{wid}/versions" => (format!("{wf}/versions"), None),
        "GET /v1/dead-letters" => (format!("/v1/dead-letters?chatbot_id={bot}"), None),
        "GET /v1/dead-letters/{id}" => (format!("/v1/dead-letters/{}", s.witness), None),
        "DELETE /v1/dead-letters/{id}" => (format!("/v1/dead-letters/{letter}"), None),
        "POST /v1/dead-letters/{id}/replay" => (format!("/v1/dead-letters/{letter}/replay"), None),
        "POST /v1/events" => ("/v1/events".into(), Some(json!([ev(&format!("m-{tag}"), bot, "x.none", "c-m", json!({}))]))),
        "GET /v1/executions/{eid}" => (format!("/v1/executions/{}", s.execution), None),
        "GET /v1/keys" => (format!("/v1/keys?account_id={}", s.account), None),
        "POST /v1/chatbots/{id}/rotate-secret" => (format!("/v1/chatbots/{}/rotate-secret", s.bot2), Some(json!({"grace_seconds": 60}))),
        "POST /v1/keys/{kid}/revoke" => (format!("/v1/keys/{}/revoke", s.doomed_key), None),
        "POST /v1/keys/{kid}/rotate" => (format!("/v1/keys/{}/rotate", s.doomed_key), Some(json!({"grace_seconds": 0}))),
        "GET /v1/audit" => (format!("/v1/audit?account_id={}", s.account), None),
        other => panic!("no request for {other}"),
    }
}

/// What the matrix expects of `who` calling `ep` on its own account's resources (or
/// another's), given the endpoint's documented success status.
fn matrix_expected(ep: &str, who: Who, own: bool, success: u16) -> u16 {
    if ep == "GET /livez" || ep == "GET /readyz" {
        return 200;
    }
    match who {
        Who::Operator => success,
        Who::Ingest => {
            if ep == "POST /v1/events" {
                200
            } else {
                403
            }
        }
        Who::Admin => match ep {
            "POST /v1/events" | "GET /v1/dead-letters" => 403,
            "PUT /v1/chatbots/{id}/limits" if own => 403,
            // Naming another account lists nothing.
            "GET /v1/chatbots" | "GET /v1/keys" | "GET /v1/audit" => 200,
            _ if own => success,
            _ => 404,
        },
    }
}

fn normalise_ids(text: &str) -> String {
    let re = regex::Regex::new("[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}").unwrap();
    re.replace_all(text, "<id>").into_owned()
}

#[actix_rt::test]
async fn ownership_matrix_every_documented_endpoint_every_role_own_and_other_account() {
    let receiver = Receiver::start().await;
    receiver.on("/dead", Behaviour::Status(500, r#"{"error":"down"}"#.into()));
    let d = TestDaemon::start().await;
    let api = Api::new(&d);
    let db = d.db().await;
    let mut a = matrix_side(&d, &api, "alpha", &receiver).await;
    let mut b = matrix_side(&d, &api, "bravo", &receiver).await;
    let admin = key(&d, a.account, Role::Admin).await;
    let op = operator(&d);
    let ghost = Side::ghost(a.definition.clone());

    // What of B must never reach A's keys unless A named it in the request.
    let mut secrets: Vec<String> = vec![b.account.to_string(), b.bot.to_string(), b.bot2.to_string()];
    secrets.extend([b.workflow, b.spare].iter().map(Uuid::to_string));
    secrets.extend(b.executions.iter().map(Uuid::to_string));
    secrets.extend(b.letters.iter().chain([&b.witness]).map(Uuid::to_string));
    secrets.push("bravo".into());

    let endpoints = documented_endpoints();
    let mut failures: Vec<String> = Vec::new();
    let documented: HashSet<String> = endpoints.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    for ep in &documented {
        if !MATRIX.contains(&ep.as_str()) {
            failures.push(format!("{ep}: documented but has no entry in the ownership matrix"));
        }
    }
    for ep in MATRIX {
        if !documented.contains(*ep) {
            failures.push(format!("{ep}: in the matrix but not in the OpenAPI document"));
        }
    }
    let endpoints: Vec<_> = endpoints.into_iter().filter(|(m, p, _)| MATRIX.contains(&format!("{m} {p}").as_str())).collect();

    // No key, an unknown key, a malformed one, another scheme: 401 (health needs none).
    let unknown = format!("Bearer bfk_{}_{}", "0a1b2c3d4e5f", "0".repeat(48));
    for (m, p, _) in &endpoints {
        let ep = format!("{m} {p}");
        let (path, body) = matrix_request(&ep, &a, a.spare, a.witness, "anon");
        for auth in [Auth::None, Auth::Header(&unknown), Auth::Header("Bearer nonsense"), Auth::Header("Basic dXNlcjpwYXNz")] {
            let r = api.call(m, &path, auth, body.clone().map(Body::Json)).await;
            let health = p == "/livez" || p == "/readyz";
            let want = if health { 200 } else { 401 };
            if r.status != want || (!health && r.json["error"]["code"] != "unauthenticated") {
                failures.push(format!("unauthenticated {ep}: want {want}, got {} {}", r.status, r.text));
            }
        }
    }

    let mut n = 0;
    for who in [Who::Ingest, Who::Admin, Who::Operator] {
        for own in [true, false] {
            let key = match who {
                Who::Ingest => a.ingest.clone(),
                Who::Admin => admin.clone(),
                Who::Operator => op.clone(),
            };
            for (m, p, success) in &endpoints {
                n += 1;
                let ep = format!("{m} {p}");
                let want = matrix_expected(&ep, who, own, *success);
                let acts = (200..300).contains(&want);
                let tag = format!("{}-{}-{n}", format!("{who:?}").to_lowercase(), if own { "own" } else { "other" });
                let side = if own { &mut a } else { &mut b };
                let delete_workflow = if acts && ep == "DELETE /v1/chatbots/{id}/workflows/{wid}" {
                    apply(&d.store, side.bot, tag_wf(&format!("doomed-{tag}"), "x.doomed")).await[0]
                } else {
                    side.spare
                };
                let letter = if acts && (ep == "DELETE /v1/dead-letters/{id}" || ep == "POST /v1/dead-letters/{id}/replay") {
                    side.letters.pop().expect("an open letter left for the matrix")
                } else {
                    side.witness
                };
                if ep == "DELETE /v1/chatbots/{id}" {
                    side.doomed_bot = accounts::create_chatbot(&d.store, side.account, &format!("doomed-{n}")).await.unwrap();
                }
                if ep.starts_with("POST /v1/keys/") {
                    let doomed = accounts::create_key(&d.store, side.account, Role::Ingest).await.unwrap();
                    side.doomed_key = uuids(&db, "SELECT id FROM api_keys WHERE prefix = $1", &[&&doomed[4..16]]).await[0];
                }
                let (path, body) = matrix_request(&ep, side, delete_workflow, letter, &tag);
                let r = api.call(m, &path, Auth::Key(&key), body.clone().map(Body::Json)).await;
                let what = format!("{who:?} on {} account: {ep} ({path})", if own { "its own" } else { "another" });
                if r.status != want {
                    failures.push(format!("{what}: want {want}, got {} {}", r.status, r.text));
                    continue;
                }
                if r.status >= 400 && (r.json["error"]["code"].as_str().is_none() || r.json["error"]["message"].as_str().is_none()) {
                    failures.push(format!("{what}: the error is not {{\"error\":{{code,message}}}}: {}", r.text));
                }
                if who != Who::Operator {
                    let request = format!("{path} {}", body.as_ref().map(Value::to_string).unwrap_or_default());
                    let leaked: Vec<&String> =
                        secrets.iter().filter(|s| r.text.contains(s.as_str()) && !request.contains(s.as_str())).collect();
                    if !leaked.is_empty() {
                        failures.push(format!("{what}: the answer shows the other account's {leaked:?}: {}", r.text));
                    }
                }
                if who == Who::Admin && !own && want == 404 {
                    // Indistinguishable from asking for something that does not exist.
                    let (gpath, gbody) = matrix_request(&ep, &ghost, ghost.spare, ghost.witness, &tag);
                    let g = api.call(m, &gpath, Auth::Key(&key), gbody.map(Body::Json)).await;
                    if g.status != r.status || normalise_ids(&g.text) != normalise_ids(&r.text) {
                        failures.push(format!(
                            "{what}: answers differently from a resource that does not exist: {} {} vs {} {}",
                            r.status, r.text, g.status, g.text
                        ));
                    }
                }
                match ep.as_str() {
                    "POST /v1/events" if want == 200 => {
                        let result = &r.json["results"][0];
                        let (op, code) = (result["op"].as_str(), result["error"]["code"].as_str());
                        let fine = if who == Who::Ingest && !own {
                            op == Some("nack") && code == Some("unknown_chatbot")
                        } else {
                            op == Some("ack")
                        };
                        if !fine {
                            failures.push(format!("{what}: unexpected event result {result}"));
                        }
                    }
                    "GET /v1/chatbots" | "GET /v1/keys" | "GET /v1/audit" if who == Who::Admin && !own
                        && r.json["items"] != json!([]) => {
                            failures.push(format!("{what}: listed another account's chatbots: {}", r.text));
                        }
                    "POST /v1/chatbots/{id}/dead-letters/discard" | "POST /v1/chatbots/{id}/dead-letters/replay" if acts
                        && r.json["count"] != 0 => {
                            failures.push(format!("{what}: a filter matching nothing acted on {}", r.text));
                        }
                    "POST /v1/dead-letters/{id}/replay" if acts
                        && r.json["replayed_at"].is_null() => {
                            failures.push(format!("{what}: not marked replayed: {}", r.text));
                        }
                    "DELETE /v1/dead-letters/{id}" if acts
                        && r.json["discarded_at"].is_null() => {
                            failures.push(format!("{what}: not marked discarded: {}", r.text));
                        }
                    _ => {}
                }
            }
        }
    }

    // Resources mixed across accounts: A's chatbot with B's workflow, A's chatbot as the
    // path and B's as the copy target, B's workflow in A's filters.
    let mixed_wf = format!("/v1/chatbots/{}/workflows/{}", a.bot, b.workflow);
    for (m, path, body) in [
        ("GET", mixed_wf.clone(), None),
        ("PUT", mixed_wf.clone(), Some(b.definition.clone())),
        ("PATCH", mixed_wf.clone(), Some(json!({"enabled": false}))),
        ("DELETE", mixed_wf.clone(), None),
        ("GET", format!("{mixed_wf}/versions"), None),
        ("POST", format!("{mixed_wf}/copy"), Some(json!({"target_chatbot_id": a.bot2}))),
        (
            "POST",
            format!("/v1/chatbots/{}/workflows/{}/copy", a.bot, a.workflow),
            Some(json!({"target_chatbot_id": b.bot2, "name": "smuggled"})),
        ),
        (
            "POST",
            format!("/v1/chatbots/{}/workflows/dry-run", a.bot),
            Some(json!({"workflow_id": b.workflow, "event": {"type": "x.go"}})),
        ),
    ] {
        let r = api.call(m, &path, Auth::Key(&admin), body.map(Body::Json)).await;
        if r.status != 404 {
            failures.push(format!("admin {m} {path} mixing accounts: want 404, got {} {}", r.status, r.text));
        }
        if r.text.contains("bravo") || r.text.contains(&b.account.to_string()) || r.text.contains(&b.bot.to_string()) {
            failures.push(format!("admin {m} {path}: the answer names the other account: {}", r.text));
        }
    }
    for path in [
        format!("/v1/chatbots/{}/executions?workflow_id={}", a.bot, b.workflow),
        format!("/v1/chatbots/{}/dead-letters?workflow_id={}&state=all", a.bot, b.workflow),
    ] {
        let r = api.get(&admin, &path).await;
        if r.status != 200 || r.json["items"] != json!([]) {
            failures.push(format!("admin GET {path}: want 200 and no items, got {} {}", r.status, r.text));
        }
    }

    // Nothing A's keys were refused did happen anyway.
    let dbr = &db;
    let open = move |l: Uuid| async move {
        scalar(dbr, "SELECT count(*) FROM dead_letters WHERE id = $1 AND replayed_at IS NULL AND discarded_at IS NULL", &[&l])
            .await
    };
    for (side, l) in [("A", a.witness), ("B", b.witness)] {
        if open(l).await != 1 {
            failures.push(format!("{side}'s witness dead letter was acted on by a refused call"));
        }
    }
    for (side, w) in [("A", a.spare), ("B", b.spare)] {
        if scalar(&db, "SELECT count(*) FROM workflows WHERE id = $1 AND deleted_at IS NULL", &[&w]).await != 1 {
            failures.push(format!("{side}'s spare workflow was deleted by a refused call"));
        }
    }
    let version = move |w: Uuid| async move { scalar(dbr, "SELECT version::int8 FROM workflows WHERE id = $1", &[&w]).await };
    if version(a.workflow).await != 3 {
        failures.push(format!("A's workflow: version {} after an admin and an operator PUT, want 3", version(a.workflow).await));
    }
    if version(b.workflow).await != 2 {
        failures.push(format!("B's workflow: version {} after only an operator PUT, want 2", version(b.workflow).await));
    }
    let refused = scalar(
        &db,
        "SELECT (SELECT count(*) FROM workflows WHERE name ~ '(ingest|admin-other|anon)')
              + (SELECT count(*) FROM chatbots WHERE name ~ '(ingest|admin-other|anon)')",
        &[],
    )
    .await;
    if refused != 0 {
        failures.push(format!("{refused} workflows or chatbots were created by refused calls"));
    }
    // Only the calls expected to act deleted a chatbot: A's admin's, the operator's on each.
    for (side, account, want) in [("A", a.account, 2), ("B", b.account, 1)] {
        let n = scalar(&db, "SELECT count(*) FROM chatbots WHERE account_id = $1 AND name ~ '^doomed-' AND deleted_at IS NOT NULL", &[&account]).await;
        let audited = scalar(&db, "SELECT count(*) FROM audit_log WHERE account_id = $1 AND action = 'chatbot.delete'", &[&account]).await;
        if (n, audited) != (want, want) {
            failures.push(format!("{side}'s chatbots: {n} deleted, {audited} deletions audited, want {want}"));
        }
    }
    // Only the calls expected to act revoked or rotated a key: one each by A's admin and
    // the operator on A's keys, one each by the operator on B's.
    for (side, account, want) in [("A", a.account, 2), ("B", b.account, 1)] {
        for action in ["key.revoke", "key.rotate"] {
            let n = scalar(&db, "SELECT count(*) FROM audit_log WHERE account_id = $1 AND action = $2", &[&account, &action]).await;
            if n != want {
                failures.push(format!("{side}'s keys: {n} {action} entries, want {want}"));
            }
        }
    }
    for (side, bot, want) in [("A", a.bot2, 2), ("B", b.bot2, 1)] {
        let n = scalar(&db, "SELECT count(*) FROM audit_log WHERE target_id = $1 AND action = 'chatbot.rotate_secret'", &[&bot]).await;
        if n != want {
            failures.push(format!("{side}'s chatbot: its secret rotated {n} times, want {want}"));
        }
    }
    for (side, bot) in [("A", a.bot), ("B", b.bot)] {
        let changes = scalar(&db, "SELECT count(*) FROM limit_changes WHERE chatbot_id = $1", &[&bot]).await;
        if changes != 1 {
            failures.push(format!("{side}'s limits changed {changes} times; only the operator's PUT may change them"));
        }
    }

    assert!(failures.is_empty(), "{} ownership failures:\n{}", failures.len(), failures.join("\n"));
}

// ----------------------------------------------------------------------------------
// 2. Workflows

#[actix_rt::test]
async fn workflows_are_created_versioned_toggled_deleted_validated_copied_and_dry_run() {
    let d = TestDaemon::start().await;
    let api = Api::new(&d);
    let db = d.db().await;
    let a = tenant(&d.store, "acme", 2).await;
    let b = tenant(&d.store, "bravo", 1).await;
    let admin = key(&d, a.account, Role::Admin).await;
    let op = operator(&d);
    let (bot, bot2, other_bot) = (a.chatbots[0], a.chatbots[1], b.chatbots[0]);
    let base = format!("/v1/chatbots/{bot}/workflows");

    // Create: version 1.
    let v1 = json!({
        "name": "greeter",
        "trigger": {"event": "message.received", "keywords": {"any": ["hello"]}},
        "steps": [{"id": "r", "action": "reply", "text": "Hi {{event.conversation_id}}"}],
    });
    let w = api.send("POST", &admin, &base, v1.clone()).await.ok(201).clone();
    assert_eq!((w["version"].clone(), w["name"].clone(), w["enabled"].clone()), (json!(1), json!("greeter"), json!(true)));
    assert_eq!(w["chatbot_id"], bot.to_string());
    assert_eq!(w["definition"]["trigger"]["keywords"]["any"], json!(["hello"]));
    let wid = uuid_of(&w["id"]);
    let wf = format!("{base}/{wid}");
    let row = db.query_one("SELECT version, enabled, chatbot_id FROM workflows WHERE id = $1", &[&wid]).await.unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, bool>(1), row.get::<_, Uuid>(2)), (1, true, bot));

    // Replace: version 2, both versions listed newest first with their definitions.
    let mut v2 = v1.clone();
    v2["trigger"]["keywords"]["any"] = json!(["hello", "hi"]);
    v2["steps"][0]["text"] = json!("Hello again");
    let w2 = api.send("PUT", &admin, &wf, v2.clone()).await.ok(200).clone();
    assert_eq!(w2["version"], 2);
    assert_eq!(w2["id"], w["id"]);
    assert_eq!(w2["definition"]["trigger"]["keywords"]["any"], json!(["hello", "hi"]));
    let got = api.get(&admin, &wf).await.ok(200).clone();
    assert_eq!(got["version"], 2);
    assert_eq!(got["definition"]["steps"][0]["text"], "Hello again");
    let versions = api.get(&admin, &format!("{wf}/versions")).await.ok(200).clone();
    let items = versions["items"].as_array().unwrap();
    assert_eq!(items.iter().map(|v| v["version"].as_i64().unwrap()).collect::<Vec<_>>(), vec![2, 1], "{versions}");
    assert_eq!(items[0]["definition"]["steps"][0]["text"], "Hello again");
    assert_eq!(items[0]["definition"]["trigger"]["keywords"]["any"], json!(["hello", "hi"]));
    assert_eq!(items[1]["definition"]["steps"][0]["text"], "Hi {{event.conversation_id}}");
    assert_eq!(items[1]["definition"]["trigger"]["keywords"]["any"], json!(["hello"]));
    assert!(items.iter().all(|v| v["workflow_id"] == w["id"]));
    assert!(versions["next_cursor"].is_null());
    // One version per page, through the cursor.
    let page = api.get(&admin, &format!("{wf}/versions?limit=1")).await.ok(200).clone();
    assert_eq!(page["items"][0]["version"], 2);
    let next = page["next_cursor"].as_str().expect("a second page").to_string();
    let page = api.get(&admin, &format!("{wf}/versions?limit=1&cursor={next}")).await.ok(200).clone();
    assert_eq!(page["items"][0]["version"], 1);
    assert!(page["next_cursor"].is_null(), "{page}");
    let stored: Vec<(i32, String)> = db
        .query(
            "SELECT version, definition->'steps'->0->>'text' FROM workflow_versions WHERE workflow_id = $1 ORDER BY version",
            &[&wid],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(stored, vec![(1, "Hi {{event.conversation_id}}".to_string()), (2, "Hello again".to_string())]);

    // Disable and enable: not a new version.
    let off = api.send("PATCH", &admin, &wf, json!({"enabled": false})).await.ok(200).clone();
    assert_eq!((off["enabled"].clone(), off["version"].clone()), (json!(false), json!(2)));
    assert_eq!(api.get(&admin, &wf).await.ok(200)["enabled"], false);
    assert!(!db.query_one("SELECT enabled FROM workflows WHERE id = $1", &[&wid]).await.unwrap().get::<_, bool>(0));
    let on = api.send("PATCH", &admin, &wf, json!({"enabled": true})).await.ok(200).clone();
    assert_eq!((on["enabled"].clone(), on["version"].clone()), (json!(true), json!(2)));
    assert_eq!(scalar(&db, "SELECT count(*) FROM workflow_versions WHERE workflow_id = $1", &[&wid]).await, 2);
    let listed = api.all(&admin, &base).await;
    assert_eq!(ids(&listed), vec![wid]);

    // One name per chatbot.
    api.send("POST", &admin, &base, v1.clone()).await.err(409, "conflict", None);
    let other = api.send("POST", &admin, &base, tag_wf("other", "x.a")).await.ok(201).clone();
    let other_path = format!("{base}/{}", other["id"].as_str().unwrap());
    api.send("PUT", &admin, &other_path, tag_wf("greeter", "x.a")).await.err(409, "conflict", None);
    assert_eq!(api.get(&admin, &other_path).await.ok(200)["version"], 1);

    // Validation names the field.
    let with = |patch: &dyn Fn(&mut Value)| {
        let mut doc = json!({"name": "checked", "trigger": {"event": "x.a"}, "steps": [{"id": "r", "action": "reply", "text": "ok"}]});
        patch(&mut doc);
        doc
    };
    let cases = [
        (with(&|d| d["steps"][0] = json!({"id": "s", "action": "sms", "to": "+1555"})), "steps[0].action"),
        (with(&|d| d["steps"][0]["text"] = json!("Hello {{event.}}")), "steps[0].text"),
        (with(&|d| d["conditions"] = json!([{"path": "data.text", "op": "matches", "value": "(unclosed"}])), "conditions[0].value"),
        (
            with(&|d| d["trigger"] = json!({"event": "sentiment.analyzed", "sentiment": {"score_below": 3}})),
            "trigger.sentiment.score_below",
        ),
    ];
    for (doc, field) in &cases {
        let r = api.send("POST", &admin, &base, doc.clone()).await;
        r.err(422, "invalid", Some(field));
        assert!(r.json["error"]["message"].as_str().unwrap().contains(field), "the message names {field}: {}", r.text);
        // The same on replace, which keeps the current version.
        api.send("PUT", &admin, &wf, doc.clone()).await.err(422, "invalid", Some(field));
    }
    assert_eq!(api.get(&admin, &wf).await.ok(200)["version"], 2);
    assert_eq!(scalar(&db, "SELECT count(*) FROM workflows WHERE chatbot_id = $1", &[&bot]).await, 2, "nothing invalid was saved");

    // Copy to another chatbot of the account: a new workflow of the target.
    let before = api.get(&admin, &wf).await.ok(200).clone();
    let copy = api.send("POST", &admin, &format!("{wf}/copy"), json!({"target_chatbot_id": bot2})).await.ok(201).clone();
    assert_ne!(copy["id"], before["id"]);
    assert_eq!(copy["chatbot_id"], bot2.to_string());
    assert_eq!(copy["version"], 1);
    assert_eq!(copy["name"], "greeter");
    assert_eq!(copy["definition"], before["definition"]);
    let target = api.all(&admin, &format!("/v1/chatbots/{bot2}/workflows")).await;
    assert_eq!(ids(&target), vec![uuid_of(&copy["id"])]);
    let after = api.get(&admin, &wf).await.ok(200).clone();
    assert_eq!(after, before, "the source is unchanged");
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM workflows WHERE chatbot_id = $1 AND deleted_at IS NULL", &[&bot2]).await,
        1
    );
    api.send("POST", &admin, &format!("{wf}/copy"), json!({"target_chatbot_id": bot2})).await.err(409, "conflict", None);
    let renamed =
        api.send("POST", &admin, &format!("{wf}/copy"), json!({"target_chatbot_id": bot2, "name": "greeter-2"})).await.ok(201).clone();
    assert_eq!((renamed["name"].clone(), renamed["definition"]["name"].clone()), (json!("greeter-2"), json!("greeter-2")));
    // Another account's chatbot: as if it did not exist, for an admin.
    let r = api.send("POST", &admin, &format!("{wf}/copy"), json!({"target_chatbot_id": other_bot})).await;
    r.err(404, "not_found", Some("target_chatbot_id"));
    assert!(!r.text.contains("bravo") && !r.text.contains(&b.account.to_string()), "{}", r.text);
    assert_eq!(scalar(&db, "SELECT count(*) FROM workflows WHERE chatbot_id = $1", &[&other_bot]).await, 0);
    // Operators copy anywhere.
    let far = api.send("POST", &op, &format!("{wf}/copy"), json!({"target_chatbot_id": other_bot})).await.ok(201).clone();
    assert_eq!(far["chatbot_id"], other_bot.to_string());
    api.send("POST", &op, &format!("{wf}/copy"), json!({"target_chatbot_id": Uuid::new_v4()})).await.err(404, "not_found", None);

    // Dry run: matches, or names the filter or condition that failed.
    let dry = format!("{base}/dry-run");
    let msg = |text: &str| json!({"type": "message.received", "conversation_id": "c-1", "data": {"text": text, "language": "fr"}});
    let r = api.send("POST", &admin, &dry, json!({"workflow": v2, "event": msg("hi there")})).await.ok(200).clone();
    assert_eq!(r["matches"], true, "{r}");
    assert!(r["reason"].is_null() && r["field"].is_null(), "{r}");
    let r = api.send("POST", &admin, &dry, json!({"workflow": v2, "event": {"type": "x.other", "data": {}}})).await.ok(200).clone();
    assert_eq!((r["matches"].clone(), r["field"].clone()), (json!(false), json!("trigger.event")), "{r}");
    assert!(r["reason"].as_str().unwrap().contains("x.other"), "{r}");
    let r = api.send("POST", &admin, &dry, json!({"workflow": v2, "event": msg("goodbye")})).await.ok(200).clone();
    assert_eq!((r["matches"].clone(), r["field"].clone()), (json!(false), json!("trigger.keywords.any")), "{r}");
    let mut conditional = v2.clone();
    conditional["conditions"] = json!([{"path": "data.language", "op": "eq", "value": "en"}]);
    let r = api.send("POST", &admin, &dry, json!({"workflow": conditional, "event": msg("hello")})).await.ok(200).clone();
    assert_eq!(r["matches"], false, "{r}");
    assert!(r["reason"].as_str().unwrap().contains("conditions[0]"), "{r}");
    assert_eq!(r["field"], "conditions[0]", "the field of a failed condition, as documented: {r}");
    let r = api.send("POST", &admin, &dry, json!({"workflow_id": wid, "event": msg("hello")})).await.ok(200).clone();
    assert_eq!(r["matches"], true, "{r}");
    api.send("POST", &admin, &dry, json!({"workflow": cases[0].0, "event": msg("hello")}))
        .await
        .err(422, "invalid", Some("workflow.steps[0].action"));
    api.send("POST", &admin, &dry, json!({"event": msg("hello")})).await.err(422, "invalid", Some("workflow"));

    // Delete: gone from every endpoint; the name can be used again.
    let r = api.call("DELETE", &wf, Auth::Key(&admin), None).await;
    assert_eq!(r.status, 204, "{}", r.text);
    api.get(&admin, &wf).await.err(404, "not_found", None);
    assert!(!ids(&api.all(&admin, &base).await).contains(&wid));
    api.get(&admin, &format!("{wf}/versions")).await.err(404, "not_found", None);
    api.send("PATCH", &admin, &wf, json!({"enabled": true})).await.err(404, "not_found", None);
    api.send("PUT", &admin, &wf, v2.clone()).await.err(404, "not_found", None);
    api.call("DELETE", &wf, Auth::Key(&admin), None).await.err(404, "not_found", None);
    api.send("POST", &admin, &format!("{wf}/copy"), json!({"target_chatbot_id": bot2, "name": "late"}))
        .await
        .err(404, "not_found", None);
    assert_eq!(scalar(&db, "SELECT count(*) FROM workflows WHERE id = $1 AND deleted_at IS NOT NULL", &[&wid]).await, 1);
    let again = api.send("POST", &admin, &base, v1).await.ok(201).clone();
    assert_ne!(again["id"], w["id"]);
}

// ----------------------------------------------------------------------------------
// 3. Changes reach the hot path

/// (event id, time sent, execution ids) of every event the streamer sent.
type Streamed = Vec<(String, Instant, Vec<Uuid>)>;

#[actix_rt::test]
async fn workflow_changes_reach_events_within_a_second_while_events_stream() {
    let d = TestDaemon::start().await;
    let api = Api::new(&d);
    let db = d.db().await;
    let t = tenant(&d.store, "acme", 1).await;
    let admin = key(&d, t.account, Role::Admin).await;
    let bot = t.chatbots[0];
    let base = format!("/v1/chatbots/{bot}/workflows");
    let w = api.send("POST", &admin, &base, tag_wf("hot", "x.hot")).await.ok(201).clone();
    let wid = uuid_of(&w["id"]);
    let wf = format!("{base}/{wid}");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let streamer = {
        let (api, key, stop, sent) = (api.clone(), t.key.clone(), stop.clone(), sent.clone());
        tokio::spawn(async move {
            let mut out: Streamed = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let id = format!("s{}", out.len());
                let at = Instant::now();
                let r = api.ingest(&key, &[ev(&id, bot, "x.hot", "c-1", json!({}))]).await;
                assert_eq!(r["results"][0]["op"], "ack", "{r}");
                let execs = r["results"][0]["executions"].as_array().unwrap().iter().map(|e| uuid_of(&e["execution_id"])).collect();
                out.push((id, at, execs));
                sent.fetch_add(1, Ordering::SeqCst);
            }
            out
        })
    };
    wait_until("events streaming", || sent.load(Ordering::SeqCst) >= 5).await;
    let mut v2 = tag_wf("hot", "x.hot");
    v2["steps"][0]["tags"] = json!(["v2"]);
    api.send("PUT", &admin, &wf, v2).await.ok(200);
    let changed = Instant::now();
    // Stream on for more than a second after the change.
    let s = sent.clone();
    wait_until("a second of events after the change", move || {
        changed.elapsed() > Duration::from_millis(1300) && s.load(Ordering::SeqCst) > 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let streamed = streamer.await.unwrap();

    let versions: HashMap<String, Vec<i32>> = {
        let mut m: HashMap<String, Vec<i32>> = HashMap::new();
        for r in db.query("SELECT event_id, workflow_version FROM executions WHERE chatbot_id = $1", &[&bot]).await.unwrap() {
            m.entry(r.get(0)).or_default().push(r.get(1));
        }
        m
    };
    let mut seen_v2 = false;
    let mut after_a_second = 0;
    for (id, at, execs) in &streamed {
        assert_eq!(execs.len(), 1, "{id}: exactly one execution per event (none lost, none doubled)");
        let v = versions.get(id).unwrap_or_else(|| panic!("{id} acked but not in the database"));
        assert_eq!(v.len(), 1, "{id}: {v:?}");
        if v[0] == 2 {
            seen_v2 = true;
        } else {
            assert!(!seen_v2, "{id} matched version {} after an earlier event matched version 2", v[0]);
        }
        if *at >= changed + Duration::from_secs(1) {
            after_a_second += 1;
            assert_eq!(v[0], 2, "{id}, sent {:?} after the change, matched version {}", *at - changed, v[0]);
        }
    }
    assert!(after_a_second > 0 && seen_v2, "the stream covered the change");

    // Disable, enable, delete: each reaches the hot path within a second.
    let probe = |n: &str| ev(n, bot, "x.hot", "c-1", json!({}));
    async fn until_executions(api: &Api, key: &str, probe: &dyn Fn(&str) -> Value, prefix: &str, want: usize) -> Duration {
        let since = Instant::now();
        for i in 0.. {
            let r = api.ingest(key, &[probe(&format!("{prefix}{i}"))]).await;
            if r["results"][0]["executions"].as_array().map(Vec::len) == Some(want) {
                return since.elapsed();
            }
            assert!(since.elapsed() < DEADLINE, "{prefix}: never {want} executions: {r}");
        }
        unreachable!()
    }
    api.send("PATCH", &admin, &wf, json!({"enabled": false})).await.ok(200);
    let took = until_executions(&api, &t.key, &probe, "off", 0).await;
    assert!(took < Duration::from_secs(1), "disabling took {took:?}");
    for i in 0..3 {
        let r = api.ingest(&t.key, &[probe(&format!("still-off{i}"))]).await;
        assert_eq!(r["results"][0]["executions"], json!([]), "a disabled workflow stays off: {r}");
    }
    api.send("PATCH", &admin, &wf, json!({"enabled": true})).await.ok(200);
    let took = until_executions(&api, &t.key, &probe, "on", 1).await;
    assert!(took < Duration::from_secs(1), "enabling took {took:?}");
    let last = scalar(&db, "SELECT max(workflow_version)::int8 FROM executions WHERE event_id LIKE 'on%'", &[]).await;
    assert_eq!(last, 2, "enabling is not a new version");
    let r = api.call("DELETE", &wf, Auth::Key(&admin), None).await;
    assert_eq!(r.status, 204, "{}", r.text);
    let took = until_executions(&api, &t.key, &probe, "gone", 0).await;
    assert!(took < Duration::from_secs(1), "deleting took {took:?}");
}

// ----------------------------------------------------------------------------------
// 4. Executions

#[actix_rt::test]
async fn execution_pages_stay_complete_and_ordered_while_executions_are_inserted() {
    let d = TestDaemon::start().await;
    let api = Api::new(&d);
    let db = d.db().await;
    let t = tenant(&d.store, "acme", 1).await;
    let admin = key(&d, t.account, Role::Admin).await;
    let bot = t.chatbots[0];
    apply(&d.store, bot, tag_wf("count", "x.go")).await;
    for batch in 0..4 {
        let events: Vec<Value> = (0..30).map(|i| ev(&format!("pre-{batch}-{i}"), bot, "x.go", "c-1", json!({}))).collect();
        assert_eq!(api.ingest(&t.key, &events).await["acked"], 30);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let inserted = Arc::new(AtomicUsize::new(0));
    let inserter = {
        let (api, key, stop, inserted) = (api.clone(), t.key.clone(), stop.clone(), inserted.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let i = inserted.load(Ordering::SeqCst);
                let r = api.ingest(&key, &[ev(&format!("live-{i}"), bot, "x.go", "c-1", json!({}))]).await;
                assert_eq!(r["acked"], 1, "{r}");
                inserted.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let counter = inserted.clone();
    wait_until("inserts running", move || counter.load(Ordering::SeqCst) >= 1).await;
    let before = uuids(&db, "SELECT id FROM executions WHERE chatbot_id = $1 ORDER BY created_at DESC, id DESC", &[&bot]).await;
    assert!(before.len() > 120, "{}", before.len());

    let mut seen: Vec<(DateTime<Utc>, Uuid)> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mark = inserted.load(Ordering::SeqCst);
        let path = match &cursor {
            Some(c) => format!("/v1/chatbots/{bot}/executions?limit=25&cursor={c}"),
            None => format!("/v1/chatbots/{bot}/executions?limit=25"),
        };
        let page = api.get(&admin, &path).await.ok(200).clone();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 25, "{} items on a page of 25", items.len());
        seen.extend(items.iter().map(|i| (time_of(&i["created_at"]), uuid_of(&i["id"]))));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        // More rows arrive between pages.
        let counter = inserted.clone();
        wait_until("an insert between pages", move || counter.load(Ordering::SeqCst) > mark).await;
    }
    stop.store(true, Ordering::SeqCst);
    inserter.await.unwrap();

    assert!(pages >= 5, "{pages} pages");
    let unique: HashSet<Uuid> = seen.iter().map(|(_, id)| *id).collect();
    assert_eq!(unique.len(), seen.len(), "an execution was shown twice");
    for w in seen.windows(2) {
        assert!(w[0] > w[1], "not in (created_at, id) descending order: {:?} then {:?}", w[0], w[1]);
    }
    let missing: Vec<&Uuid> = before.iter().filter(|id| !unique.contains(id)).collect();
    assert!(missing.is_empty(), "{} executions that existed before paging were skipped: {missing:?}", missing.len());
}

/// A history filter, for the API and for the reference query.
#[derive(Default, Clone, Debug)]
struct Filter {
    workflow_id: Option<Uuid>,
    status: Option<String>,
    conversation_id: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    q: Option<String>,
}

impl Filter {
    fn query(&self) -> String {
        let mut pairs = vec![("limit", "7".to_string())];
        if let Some(w) = self.workflow_id {
            pairs.push(("workflow_id", w.to_string()));
        }
        if let Some(s) = &self.status {
            pairs.push(("status", s.clone()));
        }
        if let Some(c) = &self.conversation_id {
            pairs.push(("conversation_id", c.clone()));
        }
        if let Some(t) = self.since {
            pairs.push(("since", ts(t)));
        }
        if let Some(t) = self.until {
            pairs.push(("until", ts(t)));
        }
        if let Some(q) = &self.q {
            pairs.push(("q", q.clone()));
        }
        qs(&pairs)
    }

    /// The matching rows, newest first, by a query of the test's own.
    async fn reference(&self, db: &tokio_postgres::Client, bot: Uuid) -> Vec<Uuid> {
        uuids(
            db,
            "SELECT id FROM executions WHERE chatbot_id = $1
               AND ($2::uuid IS NULL OR workflow_id = $2)
               AND ($3::text IS NULL OR status = $3)
               AND ($4::text IS NULL OR conversation_id = $4)
               AND ($5::timestamptz IS NULL OR created_at >= $5)
               AND ($6::timestamptz IS NULL OR created_at < $6)
               AND ($7::text IS NULL OR $7 = '' OR strpos(lower(error), lower($7)) > 0)
             ORDER BY created_at DESC, id DESC",
            &[&bot, &self.workflow_id, &self.status, &self.conversation_id, &self.since, &self.until, &self.q],
        )
        .await
    }
}

#[actix_rt::test]
async fn execution_filters_return_exactly_the_matching_rows_and_bad_parameters_get_400() {
    let receiver = Receiver::start().await;
    receiver.on("/nf", Behaviour::Status(404, r#"{"error":"no such order"}"#.into()));
    receiver.on("/boom", Behaviour::Status(500, r#"{"error":"exploded"}"#.into()));
    receiver.on("/flaky", Behaviour::Script(vec![Reply::new(500, "{}"), Reply::new(200, r#"{"ok":true}"#)]));
    let d = TestDaemon::start().await;
    let api = Api::new(&d);
    let db = d.db().await;
    let a = tenant(&d.store, "acme", 1).await;
    let b = tenant(&d.store, "bravo", 1).await;
    let admin = key(&d, a.account, Role::Admin).await;
    let bot = a.chatbots[0];
    let base = format!("/v1/chatbots/{bot}/workflows");
    let mut wids = HashMap::new();
    for doc in [
        // Commands wait for a chat client's ack and none is connected here: a step that
        // needs nobody.
        json!({"name": "ok", "trigger": {"event": "x.ok"}, "steps": [{"id": "t", "action": "delay", "duration": "0s"}]}),
        hook_wf("nf", "x.nf", "lookup", &receiver.url("/nf"), 3),
        hook_wf("boom", "x.boom", "call", &receiver.url("/boom"), 1),
        hook_wf("flaky", "x.flaky", "call", &receiver.url("/flaky"), 3),
        json!({"name": "later", "trigger": {"event": "x.later"}, "steps": [{"id": "wait", "action": "delay", "duration": "10m"}]}),
    ] {
        let w = api.send("POST", &admin, &base, doc.clone()).await.ok(201).clone();
        wids.insert(doc["name"].as_str().unwrap().to_string(), uuid_of(&w["id"]));
    }
    // Another account's executions with the same errors must never show up.
    apply(&d.store, b.chatbots[0], hook_wf("boom", "x.boom", "call", &receiver.url("/boom"), 1)).await;
    api.ingest(&b.key, &[ev("b1", b.chatbots[0], "x.boom", "conv-0", json!({})), ev("b2", b.chatbots[0], "x.boom", "conv-1", json!({}))])
        .await;

    for round in 0..2 {
        let mut events = Vec::new();
        for i in 0..6 {
            events.push(ev(&format!("ok-{round}-{i}"), bot, "x.ok", &format!("conv-{}", i % 3), json!({})));
        }
        for i in 0..3 {
            events.push(ev(&format!("nf-{round}-{i}"), bot, "x.nf", &format!("conv-{}", i % 2), json!({})));
            events.push(ev(&format!("boom-{round}-{i}"), bot, "x.boom", &format!("conv-{}", i % 3), json!({})));
        }
        if round == 1 {
            events.push(ev("flaky-1", bot, "x.flaky", "conv-9", json!({})));
            events.push(ev("later-1", bot, "x.later", "conv-9", json!({})));
        }
        let r = api.ingest(&a.key, &events).await;
        assert_eq!(r["nacked"], 0, "{r}");
    }
    wait_count(
        &db,
        "SELECT count(*) FROM executions WHERE chatbot_id = $1 AND status IN ('succeeded', 'failed', 'dead')",
        &[&bot],
        25,
    )
    .await;
    wait_count(&db, "SELECT count(*) FROM executions WHERE status = 'dead' AND chatbot_id = $1", &[&b.chatbots[0]], 2).await;

    let times: Vec<DateTime<Utc>> = db
        .query("SELECT created_at FROM executions WHERE chatbot_id = $1 ORDER BY created_at, id", &[&bot])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (early, late) = (times[5], times[20]);
    let mut filters = vec![Filter::default()];
    for w in wids.values() {
        filters.push(Filter { workflow_id: Some(*w), ..Default::default() });
    }
    for s in ["queued", "running", "retrying", "waiting", "succeeded", "failed", "dead", "cancelled"] {
        filters.push(Filter { status: Some(s.into()), ..Default::default() });
    }
    for c in ["conv-0", "conv-1", "conv-2", "conv-9", "nope"] {
        filters.push(Filter { conversation_id: Some(c.into()), ..Default::default() });
    }
    filters.push(Filter { since: Some(early), ..Default::default() });
    filters.push(Filter { until: Some(late), ..Default::default() });
    filters.push(Filter { since: Some(early), until: Some(late), ..Default::default() });
    for q in ["answered 404", "ANSWERED 500", "step \"lookup\"", "%", "_", "' OR 1=1 --", "", "webhook"] {
        filters.push(Filter { q: Some(q.into()), ..Default::default() });
    }
    filters.push(Filter {
        workflow_id: Some(wids["boom"]),
        conversation_id: Some("conv-1".into()),
        q: Some("500".into()),
        since: Some(early),
        ..Default::default()
    });
    filters.push(Filter { status: Some("failed".into()), q: Some("500".into()), ..Default::default() });
    for f in &filters {
        let got = ids(&api.all(&admin, &format!("/v1/chatbots/{bot}/executions?{}", f.query())).await);
        let want = f.reference(&db, bot).await;
        assert_eq!(got, want, "filter {f:?}");
    }
    // The data is what the filters were written for.
    let count = |f: Filter| {
        let db = &db;
        async move { f.reference(db, bot).await.len() }
    };
    assert_eq!(count(Filter { workflow_id: Some(wids["nf"]), ..Default::default() }).await, 6);
    assert_eq!(count(Filter { status: Some("failed".into()), ..Default::default() }).await, 6);
    assert_eq!(count(Filter { status: Some("dead".into()), ..Default::default() }).await, 6);
    assert_eq!(count(Filter { q: Some("answered 404".into()), ..Default::default() }).await, 6);
    assert_eq!(count(Filter { q: Some("ANSWERED 500".into()), ..Default::default() }).await, 6);
    assert_eq!(count(Filter { q: Some("' OR 1=1 --".into()), ..Default::default() }).await, 0);

    // Bad parameters: 400 naming the parameter.
    let list = format!("/v1/chatbots/{bot}/executions");
    let page = api.get(&admin, &format!("{list}?limit=5")).await.ok(200).clone();
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let mut tampered: Vec<char> = cursor.chars().collect();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == 'A' { 'B' } else { 'A' };
    let tampered: String = tampered.into_iter().collect();
    let status_cursor = api.get(&admin, &format!("{list}?limit=5&status=succeeded")).await.ok(200)["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    for (query, field) in [
        (format!("limit=5&cursor={tampered}"), Some("cursor")),
        (format!("limit=5&cursor={}", &cursor[..cursor.len() - 3]), Some("cursor")),
        (qs(&[("cursor", "' OR 1=1 --".to_string())]), Some("cursor")),
        (format!("limit=5&cursor={status_cursor}"), Some("cursor")),
        (format!("limit=5&status=failed&cursor={cursor}"), Some("cursor")),
        ("limit=0".into(), Some("limit")),
        ("limit=501".into(), Some("limit")),
        ("limit=-1".into(), Some("limit")),
        ("limit=ten".into(), None),
        ("workflow_id=not-a-uuid".into(), None),
        ("since=yesterday".into(), None),
        (qs(&[("since", ts(late)), ("until", ts(early))]), Some("since")),
        ("status=exploded".into(), Some("status")),
        ("colour=red".into(), Some("colour")),
        (format!("q={}", "x".repeat(201)), Some("q")),
    ] {
        let r = api.get(&admin, &format!("{list}?{query}")).await;
        r.err(400, "bad_request", field);
    }
    // A cursor from another chatbot's list.
    let other_admin = key(&d, b.account, Role::Admin).await;
    let other_cursor = api.get(&other_admin, &format!("/v1/chatbots/{}/executions?limit=1", b.chatbots[0])).await.ok(200)
        ["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    api.get(&admin, &format!("{list}?limit=1&cursor={other_cursor}")).await.err(400, "bad_request", Some("cursor"));
    api.get(&admin, "/v1/chatbots/not-a-uuid/executions").await.err(400, "bad_request", None);
    api.get(&admin, "/v1/executions/not-a-uuid").await.err(400, "bad_request", None);
    let r = api.get(&admin, &format!("{list}?{}", qs(&[("q", "' OR 1=1 --".into())]))).await;
    assert_eq!(r.ok(200)["items"], json!([]));

    // One execution with every step attempt.
    let one = |event: &str| {
        let db = &db;
        let event = event.to_string();
        async move { uuids(db, "SELECT id FROM executions WHERE event_id = $1", &[&event]).await[0] }
    };
    let nf = api.get(&admin, &format!("/v1/executions/{}", one("nf-0-0").await)).await.ok(200).clone();
    assert_eq!((nf["status"].clone(), nf["workflow_id"].clone()), (json!("failed"), json!(wids["nf"].to_string())));
    assert!(nf["error"].as_str().unwrap().contains("404"), "{nf}");
    assert_eq!(nf["event"]["id"], "nf-0-0");
    let steps = nf["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "{nf}");
    assert_eq!((steps[0]["step_id"].clone(), steps[0]["action"].clone()), (json!("lookup"), json!("webhook")));
    assert_eq!((steps[0]["attempt"].clone(), steps[0]["status"].clone()), (json!(1), json!("failed")));
    assert!(steps[0]["error"].as_str().unwrap().contains("404"), "{nf}");
    let flaky_id = one("flaky-1").await;
    let flaky = api.get(&admin, &format!("/v1/executions/{flaky_id}")).await.ok(200).clone();
    assert_eq!((flaky["status"].clone(), flaky["attempt"].clone()), (json!("succeeded"), json!(2)), "{flaky}");
    let attempts: Vec<(i64, String)> = flaky["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["attempt"].as_i64().unwrap(), s["status"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(attempts, vec![(1, "failed".to_string()), (2, "succeeded".to_string())], "{flaky}");
    assert_eq!(flaky["steps"][1]["output"]["status"], 200);
    assert_eq!(scalar(&db, "SELECT count(*) FROM execution_steps WHERE execution_id = $1", &[&flaky_id]).await, 2);
    let boom_id = one("boom-0-0").await;
    let boom = api.get(&admin, &format!("/v1/executions/{boom_id}")).await.ok(200).clone();
    assert_eq!(boom["status"], "dead");
    let letter = uuids(&db, "SELECT id FROM dead_letters WHERE execution_id = $1", &[&boom_id]).await;
    assert_eq!(boom["dead_letter_id"], letter[0].to_string());
    let ok = api.get(&admin, &format!("/v1/executions/{}", one("ok-0-0").await)).await.ok(200).clone();
    assert_eq!(ok["steps"][0]["action"], "delay");
    assert_eq!(ok["steps"][0]["status"], "succeeded");
    api.get(&admin, &format!("/v1/executions/{}", Uuid::new_v4())).await.err(404, "not_found", None);
}

// ----------------------------------------------------------------------------------
// 5. Analytics

#[actix_rt::test]
async fn analytics_figures_match_executions_with_controlled_outcomes_and_durations() {
    let receiver = Receiver::start().await;
    let delays: Vec<u64> = (1..=10).map(|i| i * 100).collect();
    for ms in &delays {
        receiver.on(&format!("/t/{ms}ms"), Behaviour::Script(vec![Reply::new(200, "{}").after(Duration::from_millis(*ms))]));
    }
    receiver.on("/f/ok", Behaviour::Status(200, "{}".into()));
    receiver.on("/f/nf", Behaviour::Status(404, "{}".into()));
    receiver.on("/f/boom", Behaviour::Status(500, "{}".into()));
    let d = TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(|c| c.executor.concurrency_per_chatbot = 32),
        ..Default::default()
    })
    .await;
    let api = Api::new(&d);
    let db = d.db().await;
    let t = tenant(&d.store, "acme", 1).await;
    let admin = key(&d, t.account, Role::Admin).await;
    let bot = t.chatbots[0];
    let started = Utc::now();
    let base = format!("/v1/chatbots/{bot}/workflows");
    let create = |doc: Value| {
        let (api, admin, base) = (&api, &admin, &base);
        async move { uuid_of(&api.send("POST", admin, base, doc).await.ok(201)["id"]) }
    };
    let timed = create(hook_wf("timed", "x.timed", "call", &receiver.url("/t/{{event.data.path}}"), 1)).await;
    let flaky = create(hook_wf("flaky", "x.flaky", "call", &receiver.url("/f/{{event.data.path}}"), 2)).await;
    let waits =
        create(json!({"name": "waits", "trigger": {"event": "x.wait"}, "steps": [{"id": "w", "action": "delay", "duration": "10m"}]}))
            .await;

    let mut events: Vec<Value> =
        delays.iter().map(|ms| ev(&format!("t{ms}"), bot, "x.timed", "c", json!({"path": format!("{ms}ms")}))).collect();
    for (i, path) in ["ok", "ok", "nf", "nf", "nf", "boom"].iter().enumerate() {
        events.push(ev(&format!("f{i}"), bot, "x.flaky", "c", json!({"path": path})));
    }
    events.push(ev("w0", bot, "x.wait", "c", json!({})));
    let r = api.ingest(&t.key, &events).await;
    assert_eq!(r["acked"], 17, "{r}");
    wait_count(
        &db,
        "SELECT count(*) FROM executions WHERE chatbot_id = $1 AND status IN ('succeeded', 'failed', 'dead')",
        &[&bot],
        16,
    )
    .await;

    // The durations are the ones the receiver was told to take.
    let durations = |w: Uuid| {
        let db = &db;
        async move {
            let mut v: Vec<f64> = db
                .query("SELECT duration_ms FROM executions WHERE workflow_id = $1 AND duration_ms IS NOT NULL", &[&w])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            v.sort_by(f64::total_cmp);
            v
        }
    };
    for r in db.query("SELECT event_id, duration_ms FROM executions WHERE workflow_id = $1", &[&timed]).await.unwrap() {
        let (event, ms): (String, f64) = (r.get(0), r.get(1));
        let delay: f64 = event[1..].parse().unwrap();
        assert!(ms >= delay && ms < delay + 500.0, "{event} took {ms} ms, told {delay}");
    }
    let timed_ms = durations(timed).await;
    let flaky_ms = durations(flaky).await;
    assert_eq!((timed_ms.len(), flaky_ms.len()), (10, 6));

    let until = Utc::now() + TimeDelta::minutes(1);
    let since = started - TimeDelta::minutes(1);
    let get = |query: String| {
        let (api, admin) = (&api, &admin);
        async move { api.get(admin, &format!("/v1/chatbots/{bot}/analytics?{query}")).await.ok(200).clone() }
    };
    let exact = get(qs(&[("since", ts(since)), ("until", ts(until)), ("method", "exact".into())])).await;
    assert_eq!(exact["exact"], true, "{exact}");
    assert_eq!(exact["chatbot_id"], bot.to_string());
    let by_workflow = |a: &Value| -> HashMap<Uuid, Value> {
        a["workflows"].as_array().unwrap().iter().map(|w| (uuid_of(&w["workflow_id"]), w.clone())).collect()
    };
    let e = by_workflow(&exact);
    assert_eq!(e.len(), 3, "{exact}");
    let figures = |w: &Value| {
        ["count", "succeeded", "failed", "dead", "other"].map(|k| w[k].as_i64().unwrap_or_else(|| panic!("{k} in {w}")))
    };
    assert_eq!(figures(&e[&timed]), [10, 10, 0, 0, 0]);
    assert_eq!(figures(&e[&flaky]), [6, 2, 3, 1, 0]);
    assert_eq!(figures(&e[&waits]), [1, 0, 0, 0, 1]);
    assert_eq!(e[&timed]["workflow_name"], "timed");
    assert_eq!(e[&timed]["success_rate"], 1.0);
    assert!((e[&flaky]["success_rate"].as_f64().unwrap() - 2.0 / 6.0).abs() < 1e-9, "{}", e[&flaky]);
    assert!(e[&waits]["success_rate"].is_null() && e[&waits]["p50_seconds"].is_null() && e[&waits]["p95_seconds"].is_null());
    let secs = |w: &Value, k: &str| w[k].as_f64().unwrap_or_else(|| panic!("{k} in {w}"));
    for (w, ms) in [(timed, &timed_ms), (flaky, &flaky_ms)] {
        for (k, q) in [("p50_seconds", 0.5), ("p95_seconds", 0.95)] {
            let want = percentile(ms, q) / 1000.0;
            assert!((secs(&e[&w], k) - want).abs() < 1e-6, "{k} of {w}: {} vs {want}", e[&w]);
        }
    }
    // Against what the test told the receiver: 100..1000 ms, plus at most 500 ms each.
    let (p50, p95) = (secs(&e[&timed], "p50_seconds"), secs(&e[&timed], "p95_seconds"));
    assert!((0.55..1.05).contains(&p50), "p50 {p50}");
    assert!((0.955..1.455).contains(&p95), "p95 {p95}");

    // From the per-minute rollups: whole minutes only, so nothing comes from a scan.
    let minute = TimeDelta::minutes(1);
    let r_since = started.duration_trunc(minute).unwrap() - TimeDelta::minutes(2);
    let r_until = Utc::now().duration_trunc(minute).unwrap() + TimeDelta::minutes(2);
    let rollup = get(qs(&[("since", ts(r_since)), ("until", ts(r_until)), ("method", "rollup".into())])).await;
    assert_eq!(rollup["exact"], false, "{rollup}");
    let r = by_workflow(&rollup);
    assert_eq!(r.len(), 3, "{rollup}");
    for w in [timed, flaky, waits] {
        assert_eq!(figures(&r[&w]), figures(&e[&w]), "exact and rollup counts agree for {w}");
        assert_eq!(r[&w]["success_rate"], e[&w]["success_rate"]);
    }
    for w in [timed, flaky] {
        for k in ["p50_seconds", "p95_seconds"] {
            let (x, y) = (secs(&e[&w], k), secs(&r[&w], k));
            assert!((y - x).abs() <= 0.1 * x, "{k} of {w}: rollup {y} vs exact {x}");
        }
    }
    assert!(r[&waits]["p50_seconds"].is_null());
    let rolled = scalar(&db, "SELECT coalesce(sum(created), 0)::int8 FROM execution_stats WHERE chatbot_id = $1", &[&bot]).await;
    assert_eq!(rolled, 17);

    // The default window (the last 24 hours) and one holding nothing.
    let auto = get(String::new()).await;
    assert_eq!(auto["exact"], true);
    let a = by_workflow(&auto);
    for w in [timed, flaky, waits] {
        assert_eq!(figures(&a[&w]), figures(&e[&w]));
    }
    let empty = get(qs(&[("since", "2020-01-01T00:00:00Z".into()), ("until", "2020-01-02T00:00:00Z".into())])).await;
    assert_eq!(empty["workflows"], json!([]));
    let path = format!("/v1/chatbots/{bot}/analytics");
    api.get(&admin, &format!("{path}?method=guess")).await.err(400, "bad_request", Some("method"));
    api.get(&admin, &format!("{path}?{}", qs(&[("since", ts(until)), ("until", ts(since))]))).await.err(400, "bad_request", Some("since"));
    api.get(&admin, &format!("{path}?since=2000-01-01T00:00:00Z&until=2026-01-01T00:00:00Z")).await.err(400, "bad_request", Some("since"));
}

// ----------------------------------------------------------------------------------
// 6. Dead letters

#[actix_rt::test]
async fn dead_letters_are_listed_replayed_discarded_one_by_one_and_in_bulk() {
    let receiver = Receiver::start().await;
    receiver.on("/boom", Behaviour::Status(500, r#"{"error":"boom"}"#.into()));
    receiver.on("/crash", Behaviour::Status(500, r#"{"error":"crash"}"#.into()));
    let d = TestDaemon::start().await;
    let api = Api::new(&d);
    let db = d.db().await;
    let a = tenant(&d.store, "acme", 1).await;
    let b = tenant(&d.store, "bravo", 1).await;
    let admin = key(&d, a.account, Role::Admin).await;
    let admin_b = key(&d, b.account, Role::Admin).await;
    let op = operator(&d);
    let (bot, bot_b) = (a.chatbots[0], b.chatbots[0]);
    let boom = apply(&d.store, bot, hook_wf("boom", "x.boom", "call", &receiver.url("/boom"), 1)).await[0];
    let crash = apply(&d.store, bot, hook_wf("crash", "x.crash", "hit", &receiver.url("/crash"), 1)).await[0];
    apply(&d.store, bot_b, hook_wf("boom", "x.boom", "call", &receiver.url("/boom"), 1)).await;
    api.ingest(&a.key, &(1..=3).map(|i| ev(&format!("b{i}"), bot, "x.boom", "c", json!({}))).collect::<Vec<_>>()).await;
    let dead = "SELECT count(*) FROM dead_letters WHERE chatbot_id = $1";
    wait_count(&db, dead, &[&bot], 3).await;
    api.ingest(&a.key, &(1..=3).map(|i| ev(&format!("c{i}"), bot, "x.crash", "c", json!({}))).collect::<Vec<_>>()).await;
    api.ingest(&b.key, &[ev("x1", bot_b, "x.boom", "c", json!({}))]).await;
    wait_count(&db, dead, &[&bot], 6).await;
    wait_count(&db, dead, &[&bot_b], 1).await;

    let list = format!("/v1/chatbots/{bot}/dead-letters");
    let all = api.all(&admin, &list).await;
    let newest_first =
        uuids(&db, "SELECT id FROM dead_letters WHERE chatbot_id = $1 ORDER BY created_at DESC, id DESC", &[&bot]).await;
    assert_eq!(ids(&all), newest_first);
    let paged = api.get(&admin, &format!("{list}?limit=4")).await.ok(200).clone();
    assert_eq!(paged["items"].as_array().unwrap().len(), 4);
    assert_eq!(api.all(&admin, &format!("{list}?limit=4")).await.len(), 6);
    let of = |items: &[Value], w: Uuid| items.iter().all(|i| i["workflow_id"] == w.to_string());
    let booms = api.all(&admin, &format!("{list}?workflow_id={boom}")).await;
    assert!(booms.len() == 3 && of(&booms, boom), "{booms:?}");
    let hits = api.all(&admin, &format!("{list}?{}", qs(&[("q", "\"HIT\"".into())]))).await;
    assert!(hits.len() == 3 && of(&hits, crash), "{hits:?}");
    let since = time_of(&all[2]["created_at"]);
    let recent = api.all(&admin, &format!("{list}?{}", qs(&[("since", ts(since))]))).await;
    let want = uuids(
        &db,
        "SELECT id FROM dead_letters WHERE chatbot_id = $1 AND created_at >= $2 ORDER BY created_at DESC, id DESC",
        &[&bot, &since],
    )
    .await;
    assert_eq!(ids(&recent), want);
    assert_eq!(api.all(&admin, &format!("{list}?state=replayed")).await.len(), 0);
    api.get(&admin, &format!("{list}?state=lost")).await.err(400, "bad_request", None);

    // One letter.
    let first = &booms[booms.len() - 1];
    let id = uuid_of(&first["id"]);
    let one = api.get(&admin, &format!("/v1/dead-letters/{id}")).await.ok(200).clone();
    assert_eq!(one["workflow_id"], boom.to_string());
    assert_eq!(one["chatbot_id"], bot.to_string());
    assert_eq!(one["attempts"], 1);
    assert!(one["last_error"].as_str().unwrap().contains("500"), "{one}");
    assert!(one["replayed_at"].is_null() && one["discarded_at"].is_null());
    let execution = uuid_of(&one["execution_id"]);
    assert_eq!(api.get(&admin, &format!("/v1/executions/{execution}")).await.ok(200)["status"], "dead");

    // Replay: the execution runs again; a second replay conflicts.
    receiver.on("/boom", Behaviour::Status(200, "{}".into()));
    let replayed = api.call("POST", &format!("/v1/dead-letters/{id}/replay"), Auth::Key(&admin), None).await.ok(200).clone();
    assert!(!replayed["replayed_at"].is_null() && !replayed["replayed_by"].is_null(), "{replayed}");
    let status = "SELECT count(*) FROM executions WHERE id = $1 AND status = 'succeeded' AND attempt = 2";
    wait_count(&db, status, &[&execution], 1).await;
    let again = api.get(&admin, &format!("/v1/executions/{execution}")).await.ok(200).clone();
    assert_eq!((again["status"].clone(), again["attempt"].clone()), (json!("succeeded"), json!(2)));
    // The replayed run is timed from its own start: the time the letter waited is not
    // part of its duration (nor of the analytics percentiles).
    let replayed_at = scalar(
        &db,
        "SELECT count(*) FROM executions e JOIN dead_letters d ON d.execution_id = e.id
         WHERE d.id = $1 AND e.started_at >= d.replayed_at
           AND e.duration_ms <= extract(epoch FROM e.finished_at - d.replayed_at) * 1000",
        &[&id],
    )
    .await;
    assert_eq!(replayed_at, 1, "the replayed execution starts after the replay: {again}");
    api.call("POST", &format!("/v1/dead-letters/{id}/replay"), Auth::Key(&admin), None).await.err(409, "conflict", None);
    api.call("DELETE", &format!("/v1/dead-letters/{id}"), Auth::Key(&admin), None).await.err(409, "conflict", None);
    assert!(!api.get(&admin, &format!("/v1/dead-letters/{id}")).await.ok(200)["replayed_at"].is_null());
    assert!(!ids(&api.all(&admin, &list).await).contains(&id), "a replayed letter is not open");
    assert!(ids(&api.all(&admin, &format!("{list}?state=replayed")).await).contains(&id));
    assert!(ids(&api.all(&admin, &format!("{list}?state=all")).await).contains(&id));

    // Discard: kept, marked, never run again.
    let victim = uuid_of(&hits[0]["id"]);
    let gone = api.call("DELETE", &format!("/v1/dead-letters/{victim}"), Auth::Key(&admin), None).await.ok(200).clone();
    assert!(!gone["discarded_at"].is_null() && !gone["discarded_by"].is_null(), "{gone}");
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM dead_letters WHERE id = $1 AND discarded_at IS NOT NULL", &[&victim]).await,
        1
    );
    api.call("POST", &format!("/v1/dead-letters/{victim}/replay"), Auth::Key(&admin), None).await.err(409, "conflict", None);
    assert!(ids(&api.all(&admin, &format!("{list}?state=discarded")).await).contains(&victim));
    let victim_execution = uuid_of(&gone["execution_id"]);
    assert_eq!(api.get(&admin, &format!("/v1/executions/{victim_execution}")).await.ok(200)["status"], "dead");

    // Bulk, by filter: the count of letters acted on.
    let r = api.send("POST", &admin, &format!("{list}/replay"), json!({"workflow_id": boom})).await.ok(200).clone();
    assert_eq!(r["count"], 2, "{r}");
    wait_count(
        &db,
        "SELECT count(*) FROM executions WHERE workflow_id = $1 AND status = 'succeeded'",
        &[&boom],
        3,
    )
    .await;
    assert_eq!(api.send("POST", &admin, &format!("{list}/replay"), json!({"workflow_id": boom})).await.ok(200)["count"], 0);
    let r = api.send("POST", &admin, &format!("{list}/discard"), json!({"q": "\"hit\""})).await.ok(200).clone();
    assert_eq!(r["count"], 2, "{r}");
    assert_eq!(api.all(&admin, &list).await.len(), 0, "no open letters left");
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM dead_letters WHERE chatbot_id = $1 AND discarded_at IS NOT NULL", &[&bot]).await,
        3
    );

    // Another account's letters: 404 for an admin, untouched.
    let theirs = uuids(&db, "SELECT id FROM dead_letters WHERE chatbot_id = $1", &[&bot_b]).await[0];
    for (m, path) in [
        ("GET", format!("/v1/dead-letters/{theirs}")),
        ("POST", format!("/v1/dead-letters/{theirs}/replay")),
        ("DELETE", format!("/v1/dead-letters/{theirs}")),
        ("GET", format!("/v1/chatbots/{bot_b}/dead-letters")),
    ] {
        api.call(m, &path, Auth::Key(&admin), None).await.err(404, "not_found", None);
    }
    for action in ["replay", "discard"] {
        let r = api.send("POST", &admin, &format!("/v1/chatbots/{bot_b}/dead-letters/{action}"), json!({})).await;
        r.err(404, "not_found", None);
    }
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM dead_letters WHERE id = $1 AND replayed_at IS NULL AND discarded_at IS NULL", &[&theirs])
            .await,
        1
    );
    assert_eq!(api.get(&admin_b, &format!("/v1/dead-letters/{theirs}")).await.ok(200)["chatbot_id"], bot_b.to_string());
    // Operators see every account's, or one chatbot's.
    let everyone = ids(&api.all(&op, "/v1/dead-letters?state=all").await);
    assert!(everyone.contains(&theirs) && everyone.contains(&id), "{everyone:?}");
    assert_eq!(ids(&api.all(&op, &format!("/v1/dead-letters?chatbot_id={bot_b}")).await), vec![theirs]);
    assert_eq!(api.send("POST", &op, &format!("/v1/chatbots/{bot_b}/dead-letters/discard"), json!({})).await.ok(200)["count"], 1);
}

// ----------------------------------------------------------------------------------
// 7. HTTP ingest

#[actix_rt::test]
async fn http_ingest_answers_each_event_in_order_after_the_commit() {
    let d = TestDaemon::start().await;
    let api = Api::new(&d);
    let db = d.db().await;
    let a = tenant(&d.store, "acme", 2).await;
    let b = tenant(&d.store, "bravo", 1).await;
    let admin = key(&d, a.account, Role::Admin).await;
    let op = operator(&d);
    let (bot, quiet, theirs) = (a.chatbots[0], a.chatbots[1], b.chatbots[0]);
    let w1 = apply(&d.store, bot, tag_wf("one", "x.go")).await[0];
    let w2 = apply(&d.store, bot, tag_wf("two", "x.go")).await[0];
    let events = vec![
        ev("e1", bot, "x.go", "c-1", json!({})),
        json!({"id": "e2", "chatbot_id": bot, "conversation_id": "c-1", "data": {}}),
        ev("e3", theirs, "x.go", "c-1", json!({})),
        ev("e4", Uuid::new_v4(), "x.go", "c-1", json!({})),
        ev("e5", bot, "message.received", "c-1", json!({"text": 5})),
        json!(42),
        ev("e6", quiet, "x.go", "c-1", json!({})),
        ev("e7", bot, "x.go", "c-2", json!({})),
    ];
    let r = api.ingest(&a.key, &events).await;
    // Every acked execution is in the database as the answer arrives.
    let results = r["results"].as_array().unwrap().clone();
    for res in results.iter().filter(|x| x["op"] == "ack") {
        for e in res["executions"].as_array().unwrap() {
            let n = scalar(
                &db,
                "SELECT count(*) FROM executions WHERE id = $1 AND workflow_id = $2 AND event_id = $3",
                &[&uuid_of(&e["execution_id"]), &uuid_of(&e["workflow_id"]), &res["id"].as_str().unwrap()],
            )
            .await;
            assert_eq!(n, 1, "acked {e} of {} is not in the database", res["id"]);
        }
    }
    assert_eq!(results.len(), 8, "{r}");
    assert_eq!((r["acked"].clone(), r["nacked"].clone()), (json!(3), json!(5)), "{r}");
    let ops: Vec<&str> = results.iter().map(|x| x["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["ack", "nack", "nack", "nack", "nack", "nack", "ack", "ack"], "{r}");
    let ids_: Vec<Value> = results.iter().map(|x| x["id"].clone()).collect();
    assert_eq!(ids_[..5], [json!("e1"), json!("e2"), json!("e3"), json!("e4"), json!("e5")], "{r}");
    assert_eq!(ids_[6..], [json!("e6"), json!("e7")]);
    assert_eq!(results[1]["error"]["code"], "invalid_event");
    assert_eq!(results[1]["error"]["field"], "type");
    assert_eq!(results[2]["error"]["code"], "unknown_chatbot");
    assert!(!results[2].to_string().contains("bravo"), "{}", results[2]);
    assert_eq!(results[3]["error"]["code"], "unknown_chatbot", "{}", results[3]);
    assert_eq!(results[4]["error"]["code"], "invalid_event");
    assert_eq!(results[4]["error"]["field"], "data.text");
    assert_eq!(results[5]["error"]["code"], "invalid_event");
    assert_eq!(results[6]["executions"], json!([]));
    let made: HashSet<Uuid> = results[0]["executions"].as_array().unwrap().iter().map(|e| uuid_of(&e["workflow_id"])).collect();
    assert_eq!(made, HashSet::from([w1, w2]));
    assert_eq!(results[0]["duplicate"], false);
    assert_eq!(scalar(&db, "SELECT count(*) FROM executions WHERE chatbot_id = $1", &[&theirs]).await, 0);

    // The same event again: acked as a duplicate with the same executions.
    let dup = api.ingest(&a.key, &[ev("e1", bot, "x.go", "c-1", json!({}))]).await;
    assert_eq!(dup["results"][0]["op"], "ack");
    assert_eq!(dup["results"][0]["duplicate"], true, "{dup}");
    let ex = |v: &Value| -> HashSet<String> {
        v["executions"].as_array().unwrap().iter().map(|e| e["execution_id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(ex(&dup["results"][0]), ex(&results[0]));
    assert_eq!(scalar(&db, "SELECT count(*) FROM executions WHERE event_id = 'e1'", &[]).await, 2);

    // NDJSON, with CRLF and a blank line.
    let lines = ["n1", "n2", "n3"].map(|id| ev(id, bot, "x.go", "c-3", json!({})).to_string());
    let body = format!("{}\r\n\n{}\n{}\n", lines[0], lines[1], lines[2]);
    let r = api.raw("POST", &a.key, "/v1/events", "application/x-ndjson", body).await.ok(200).clone();
    let got: Vec<String> = r["results"].as_array().unwrap().iter().map(|x| format!("{} {}", x["op"], x["id"])).collect();
    assert_eq!(got, [r#""ack" "n1""#, r#""ack" "n2""#, r#""ack" "n3""#], "{r}");
    assert_eq!(scalar(&db, "SELECT count(*) FROM executions WHERE conversation_id = 'c-3'", &[]).await, 6);

    // Operators send to any account.
    let r = api.ingest(&op, &[ev("o1", theirs, "x.go", "c-1", json!({}))]).await;
    assert_eq!(r["results"][0]["op"], "ack", "{r}");

    // Refused requests.
    let big = format!("[{}]", serde_json::to_string(&"x".repeat(8 * 1024 * 1024 + 16)).unwrap());
    api.raw("POST", &a.key, "/v1/events", "application/json", big).await.err(413, "too_large", None);
    let one = serde_json::to_vec(&[ev("p1", bot, "x.go", "c-1", json!({}))]).unwrap();
    api.raw("POST", &a.key, "/v1/events", "text/plain", one.clone()).await.err(415, "unsupported_media_type", None);
    api.raw("POST", &a.key, "/v1/events", "", one.clone()).await.err(415, "unsupported_media_type", None);
    api.raw("POST", &admin, "/v1/events", "application/json", one.clone()).await.err(403, "forbidden", None);
    api.call("POST", "/v1/events", Auth::None, Some(Body::Raw("application/json", one))).await.err(401, "unauthenticated", None);
    api.raw("POST", &a.key, "/v1/events", "application/json", "[]").await.err(400, "bad_request", None);
    api.raw("POST", &a.key, "/v1/events", "application/json", "[{\"id\": ").await.err(400, "bad_request", None);
    assert_eq!(scalar(&db, "SELECT count(*) FROM executions WHERE event_id = 'p1'", &[]).await, 0);
}

// ----------------------------------------------------------------------------------
// 8. Bad input

#[actix_rt::test]
async fn bad_input_gets_the_right_4xx_naming_the_problem_and_never_a_500() {
    let d = TestDaemon::start().await;
    let api = Api::new(&d);
    let db = d.db().await;
    let a = tenant(&d.store, "acme", 2).await;
    let admin = key(&d, a.account, Role::Admin).await;
    let op = operator(&d);
    let (bot, bot2) = (a.chatbots[0], a.chatbots[1]);
    let wid = apply(&d.store, bot, tag_wf("target", "x.go")).await[0];
    let wf = format!("/v1/chatbots/{bot}/workflows/{wid}");
    let workflows = format!("/v1/chatbots/{bot}/workflows");
    let limits = format!("/v1/chatbots/{bot}/limits");
    let json = "application/json";
    let (admin, op) = (admin.as_str(), op.as_str());

    // (key, method, path, content type, body, status, code, field)
    type Case<'a> = (&'a str, &'a str, String, &'static str, Vec<u8>, u16, &'a str, Option<&'a str>);
    let b = |s: &str| s.as_bytes().to_vec();
    let huge = {
        let mut doc = tag_wf("huge", "x.go");
        doc["steps"][0]["tags"] = json!(["x".repeat(1024 * 1024 + 10)]);
        doc.to_string().into_bytes()
    };
    let cases: Vec<Case> = vec![
        (admin, "POST", workflows.clone(), json, b("{\"name\": "), 400, "bad_request", None),
        (admin, "POST", workflows.clone(), json, vec![0xff, 0xfe, b'{'], 400, "bad_request", None),
        (admin, "POST", workflows.clone(), json, b(""), 400, "bad_request", None),
        (admin, "POST", workflows.clone(), json, huge.clone(), 413, "too_large", None),
        (admin, "POST", workflows.clone(), "text/plain", tag_wf("plain", "x.go").to_string().into_bytes(), 415, "unsupported_media_type", None),
        (admin, "PUT", wf.clone(), json, huge.clone(), 413, "too_large", None),
        (admin, "PATCH", wf.clone(), json, b("{\"enabled\": \"yes\"}"), 400, "bad_request", None),
        (admin, "PATCH", wf.clone(), json, b("{\"enabled\": true, \"version\": 3}"), 400, "bad_request", Some("version")),
        (admin, "PATCH", wf.clone(), json, b("{}"), 400, "bad_request", Some("enabled")),
        (admin, "PATCH", wf.clone(), json, b("[true]"), 400, "bad_request", None),
        (admin, "PATCH", wf.clone(), json, b("{\"enabled\": tru"), 400, "bad_request", None),
        (admin, "PATCH", wf.clone(), json, huge.clone(), 413, "too_large", None),
        (admin, "POST", "/v1/chatbots".into(), json, b("{\"name\": 5}"), 400, "bad_request", None),
        (admin, "POST", "/v1/chatbots".into(), json, b("{\"name\": \"x\", \"colour\": \"red\"}"), 400, "bad_request", Some("colour")),
        (admin, "POST", "/v1/chatbots".into(), json, b("{\"name\": \"\"}"), 422, "invalid", Some("name")),
        (admin, "POST", "/v1/chatbots".into(), json, b("{\"name\": \"x\", \"account_id\": \"nope\"}"), 400, "bad_request", None),
        (admin, "POST", "/v1/chatbots".into(), "text/plain", b("{\"name\": \"x\"}"), 415, "unsupported_media_type", None),
        (op, "PUT", limits.clone(), json, b("{\"burst\": \"lots\"}"), 400, "bad_request", None),
        (op, "PUT", limits.clone(), json, b("{\"bursts\": 5}"), 400, "bad_request", Some("bursts")),
        (op, "PUT", limits.clone(), json, b("{\"burst\": -1}"), 400, "bad_request", None),
        (op, "PUT", limits.clone(), json, b("{\"burst\": 0}"), 422, "invalid", Some("burst")),
        (admin, "POST", format!("{wf}/copy"), json, b("{\"target_chatbot_id\": \"nope\"}"), 400, "bad_request", None),
        (
            admin,
            "POST",
            format!("{wf}/copy"),
            json,
            format!("{{\"target_chatbot_id\": \"{bot2}\", \"extra\": 1}}").into_bytes(),
            400,
            "bad_request",
            Some("extra"),
        ),
        (admin, "POST", format!("{wf}/copy"), json, b("{}"), 400, "bad_request", Some("target_chatbot_id")),
        (
            admin,
            "POST",
            format!("{workflows}/dry-run"),
            json,
            format!("{{\"workflow_id\": \"{wid}\", \"event\": {{\"type\": \"x.go\"}}, \"verbose\": true}}").into_bytes(),
            400,
            "bad_request",
            Some("verbose"),
        ),
        (admin, "POST", format!("/v1/chatbots/{bot}/dead-letters/replay"), json, b("{\"max\": 0}"), 400, "bad_request", Some("max")),
        (admin, "POST", format!("/v1/chatbots/{bot}/dead-letters/discard"), json, b("{\"qq\": \"x\"}"), 400, "bad_request", Some("qq")),
        (admin, "GET", format!("{workflows}?limit=99999999999999999999999"), "", vec![], 400, "bad_request", None),
        (admin, "GET", format!("{workflows}?cursor=%00"), "", vec![], 400, "bad_request", Some("cursor")),
        (admin, "GET", format!("/v1/chatbots/{bot}/executions?q=%00"), "", vec![], 400, "bad_request", Some("q")),
        (admin, "GET", format!("/v1/chatbots/{bot}/executions?conversation_id=a%00b"), "", vec![], 400, "bad_request", Some("conversation_id")),
        (admin, "GET", format!("/v1/chatbots/{bot}/dead-letters?state=lost"), "", vec![], 400, "bad_request", None),
        // Times chrono can hold but no arithmetic near them should be tried.
        (admin, "GET", format!("/v1/chatbots/{bot}/analytics?until=-262143-01-01T00:00:00Z"), "", vec![], 400, "bad_request", Some("until")),
        (admin, "GET", format!("/v1/chatbots/{bot}/analytics?since=%2B262142-12-31T00:00:00Z"), "", vec![], 400, "bad_request", Some("since")),
        (admin, "GET", format!("/v1/chatbots/{bot}/analytics?until=0001-01-01T00:00:00Z"), "", vec![], 400, "bad_request", Some("since")),
        (admin, "GET", format!("/v1/chatbots/{bot}/executions?since=-0001-01-01T00:00:00Z"), "", vec![], 400, "bad_request", Some("since")),
        (admin, "GET", "/v1/chatbots/12345/workflows".into(), "", vec![], 400, "bad_request", None),
        (admin, "GET", format!("/v1/chatbots/{bot}/workflows/zzz"), "", vec![], 400, "bad_request", None),
        (admin, "GET", "/v1/dead-letters/%27%20OR%201=1%20--".into(), "", vec![], 400, "bad_request", None),
        (admin, "GET", "/v1/nothing-here".into(), "", vec![], 404, "not_found", None),
    ];
    for (key, m, path, ct, body, status, code, field) in cases {
        let r = api.call(m, &path, Auth::Key(key), if m == "GET" { None } else { Some(Body::Raw(ct, body)) }).await;
        assert!(
            r.status == status && r.json["error"]["code"] == code && field.is_none_or(|f| r.json["error"]["field"] == f),
            "{m} {path} ({ct}): want {status} {code} {field:?}, got {} {}",
            r.status,
            r.text.chars().take(500).collect::<String>()
        );
    }

    // Workflow bodies are validated by the workflow parser: unknown fields and wrong
    // types are named too (400 or 422).
    for (doc, field) in [
        (json!({"name": "n", "trigger": {"event": "x.a"}, "steps": [], "owner": "me"}), "owner"),
        (json!({"name": 5, "trigger": {"event": "x.a"}, "steps": []}), "name"),
        (json!({"name": "n", "trigger": {"event": "x.a"}, "steps": [{"id": "a", "action": "reply", "txt": "typo"}]}), "steps[0]"),
        (json!(["not", "an", "object"]), "workflow"),
    ] {
        let r = api.send("POST", admin, &workflows, doc.clone()).await;
        assert!(r.status == 400 || r.status == 422, "{doc}: {} {}", r.status, r.text);
        let named = r.json["error"]["field"].as_str().unwrap_or_default();
        assert!(named.starts_with(field), "{doc}: the error names {field}: {}", r.text);
    }

    // Text PostgreSQL cannot store (NUL) and nesting serde refuses: a 4xx, never a 500.
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    for (m, path, body) in [
        ("POST", "/v1/chatbots".to_string(), json!({"name": "nul\u{0}name"}).to_string()),
        ("POST", workflows.clone(), tag_wf("nul\u{0}name", "x.go").to_string()),
        ("POST", workflows.clone(), {
            let mut w = tag_wf("nul-tag", "x.go");
            w["steps"][0]["tags"] = json!(["a\u{0}b"]);
            w.to_string()
        }),
        ("POST", workflows.clone(), deep.clone()),
        ("PATCH", wf.clone(), deep.clone()),
        ("POST", "/v1/events".to_string(), deep.clone()),
    ] {
        let k = if path == "/v1/events" { a.key.as_str() } else { admin };
        let r = api.raw(m, k, &path, json, body).await;
        // Ingest answers per event: a batch whose one event is not an object is a 200
        // that nacks it, naming why.
        let nacked = path == "/v1/events" && r.status == 200 && r.json["nacked"] == 1 && r.json["acked"] == 0;
        assert!(nacked || (400..500).contains(&r.status), "{m} {path}: want a 4xx, got {} {}", r.status, r.text);
    }

    // Every documented endpoint with garbage bodies and garbage query values: no 5xx.
    let mut fives = Vec::new();
    let doc = serde_json::to_value(botflow::admin::openapi()).unwrap();
    let garbage: [&[u8]; 9] = [b"", b"null", b"[]", b"{", b"\"text\"", b"{\"a\":", b"\xff\xfe\xfd", b"{\"name\": {\"$gt\": \"\"}}", b"1e999999"];
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{id}/workflows/{wid}", &format!("{bot}/workflows/{wid}"))
            .replace("/v1/dead-letters/{id}", &format!("/v1/dead-letters/{}", Uuid::new_v4()))
            .replace("{id}", &bot.to_string())
            .replace("{eid}", &Uuid::new_v4().to_string());
        for (method, op_doc) in item.as_object().unwrap() {
            let m = method.to_uppercase();
            let k = if path == "/v1/events" { a.key.as_str() } else { op };
            if op_doc.get("requestBody").is_some() {
                for g in garbage {
                    let r = api.raw(&m, k, &concrete, json, g.to_vec()).await;
                    if r.status >= 500 {
                        fives.push(format!("{m} {concrete} {:?}: {} {}", String::from_utf8_lossy(g), r.status, r.text));
                    }
                }
            }
            if m == "GET" {
                for param in op_doc["parameters"].as_array().into_iter().flatten().filter(|p| p["in"] == "query") {
                    let name = param["name"].as_str().unwrap();
                    for v in ["%00", "%27%20OR%201%3D1%20--", "-1", "99999999999999999999999", "", "%F0%9F%92%A5", "2026-13-45T99:99:99Z"] {
                        let r = api.get(k, &format!("{concrete}?{name}={v}")).await;
                        if r.status >= 500 {
                            fives.push(format!("GET {concrete}?{name}={v}: {} {}", r.status, r.text));
                        }
                    }
                }
            }
        }
    }
    assert!(fives.is_empty(), "5xx answers:\n{}", fives.join("\n"));
    // The target workflow survived the garbage and the daemon is fine.
    assert_eq!(scalar(&db, "SELECT count(*) FROM workflows WHERE id = $1 AND deleted_at IS NULL", &[&wid]).await, 1);
    api.call("GET", "/livez", Auth::None, None).await.ok(200);
}

// ----------------------------------------------------------------------------------
// 9. Health

#[actix_rt::test]
async fn health_needs_no_key_and_readyz_says_draining_while_the_daemon_shuts_down() {
    let receiver = Receiver::start().await;
    receiver.on("/slow", Behaviour::Script(vec![Reply::new(200, "{}").after(Duration::from_secs(3))]));
    let mut d = TestDaemon::start().await;
    // No pooled connections: the admin server stops at the end of the drain.
    let api = Api { base: d.admin(), http: reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap() };
    let db = d.db().await;

    let live = api.call("GET", "/livez", Auth::None, None).await;
    assert_eq!(live.ok(200)["status"], "ok");
    let ready = api.call("GET", "/readyz", Auth::None, None).await.ok(200).clone();
    assert_eq!(ready["status"], "ok");
    let latest = botflow::store::migrate::latest_version();
    assert_eq!(ready["schema_version"], latest, "{ready}");
    assert_eq!(ready["expected_schema_version"], latest, "{ready}");
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap().count();
    assert_eq!(latest as usize, migrations);
    let doc = api.call("GET", "/v1/openapi.json", Auth::None, None).await.ok(200).clone();
    assert_eq!(doc, serde_json::to_value(botflow::admin::openapi()).unwrap(), "the served document is the generated one");

    // Draining: an execution is still running while the daemon shuts down.
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(&d.store, bot, hook_wf("slow", "x.slow", "call", &receiver.url("/slow"), 1)).await;
    let r = api.ingest(&t.key, &[ev("s1", bot, "x.slow", "c-1", json!({}))]).await;
    assert_eq!(r["acked"], 1, "{r}");
    receiver.wait_for("/slow", 1).await;
    let app = d.app.take().unwrap();
    let stopping = actix_rt::spawn(async move { app.shutdown().await });
    let start = Instant::now();
    let draining = loop {
        let r = api.call("GET", "/readyz", Auth::None, None).await;
        if r.status == 503 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(start.elapsed() < Duration::from_secs(2), "/readyz never said draining");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(draining.json["status"], "draining", "{}", draining.text);
    let refused = api.raw("POST", &t.key, "/v1/events", "application/json", json!([ev("s2", bot, "x.slow", "c-1", json!({}))]).to_string()).await;
    refused.err(503, "unavailable", None);
    assert_eq!(api.call("GET", "/livez", Auth::None, None).await.status, 200, "alive while draining");
    stopping.await.unwrap();
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM executions WHERE event_id = 's1' AND status = 'succeeded'", &[]).await,
        1,
        "the drain let the running execution finish"
    );
    assert_eq!(scalar(&db, "SELECT count(*) FROM executions WHERE event_id = 's2'", &[]).await, 0);
}
