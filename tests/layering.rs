//! The shape of `src/`: imports point one way, down the data path.
//!
//! Reads every file under `src/`, finds each `use` and each `crate::…`/`super::…`
//! path, resolves it to the file that defines the item (following `pub use`
//! re-exports), and fails naming the file, the line and the rule when
//! - a module imports a module above it in `LAYERS` (the layers `src/lib.rs` draws);
//! - a file breaks one of the `FILE_RULES` (an order inside a module);
//! - a module uses a crate its layer must not (`CRATE_RULES`);
//! - files import each other in a circle, at any length.
//!
//! A parent module naming its own children (`mod x;`, `pub use x::Y`) is ownership,
//! not an import, so it draws no arrow; what a child imports from its parent does.
//! Code under `#[cfg(test)]` is not read: tests may reach across for their fixtures.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The top-level modules, bottom first: each may import those before it, never one
/// after. (`src/lib.rs` shows the same order as a diagram.)
const LAYERS: &[(&str, &str)] = &[
    ("wire", "the wire vocabulary: outcomes, nacks, commands, error codes (a leaf)"),
    ("event", "an event as it came in (a leaf)"),
    ("execution", "an execution's states (a leaf)"),
    ("workflow", "the model users write and the pure logic over it"),
    ("telemetry", "logs and metric names"),
    ("tls", "TLS configuration for the listener, clients and PostgreSQL"),
    ("egress", "which addresses webhooks and notifications may reach"),
    ("config", "the configuration file"),
    ("postgres", "the embedded PostgreSQL server's process manager"),
    ("store", "persistence in PostgreSQL"),
    ("notify", "operator notifications"),
    ("outbox", "commands to chat services"),
    ("chatbot", "a chatbot's supervisor, executors and actions"),
    ("router", "chatbot id to supervisor"),
    ("scheduler", "due executions"),
    ("ingest", "listeners and connections"),
    ("admin", "the admin HTTP API"),
    ("app", "starting and stopping the daemon"),
    ("cli", "the botflow command"),
];

/// Orders inside one module: (file, must not import, why).
const FILE_RULES: &[(&str, &str, &str)] = &[
    ("chatbot/executor.rs", "chatbot/supervisor.rs", "an executor gets what it needs from its own deps, not from the supervisor"),
    ("chatbot/actions", "chatbot/supervisor.rs", "an action knows only the executor's context"),
    ("chatbot/actions", "chatbot/executor.rs", "an action knows only the context it is given"),
    ("workflow/model.rs", "workflow/validate.rs", "model → validate → compiled: the model does not validate"),
    ("workflow/model.rs", "workflow/compiled.rs", "model → validate → compiled: the model does not compile"),
    ("workflow/validate.rs", "workflow/compiled.rs", "model → validate → compiled: validation does not build the compiled form"),
    ("workflow/condition.rs", "workflow/compiled.rs", "a condition is compiled on its own"),
    ("workflow/actions", "workflow/validate.rs", "an action checks its own fields; validation calls it, not the reverse"),
    ("workflow/actions", "workflow/compiled.rs", "an action knows nothing of the compiled workflow"),
];

/// Crates a module must not use: (module, crate, why).
const CRATE_RULES: &[(&str, &str, &str)] = &[
    ("workflow", "actix", "workflow is the plain model: no actors"),
    ("workflow", "tokio_postgres", "workflow is the plain model: no database"),
    ("workflow", "deadpool_postgres", "workflow is the plain model: no database"),
    ("workflow", "reqwest", "workflow is the plain model: actions that call out live beside the executor"),
    ("wire", "tokio_postgres", "the wire vocabulary is a leaf"),
    ("wire", "reqwest", "the wire vocabulary is a leaf"),
];

/// Where a leaf must stay a leaf: (module, text that must not appear, why).
const TEXT_RULES: &[(&str, &str, &str)] = &[
    ("wire", "impl Actor for", "the wire vocabulary holds no actor"),
    ("wire", "impl actix::Actor for", "the wire vocabulary holds no actor"),
];

struct SourceFile {
    /// Relative to `src/`, e.g. `store/journal.rs`.
    rel: String,
    /// The module path, e.g. `["store", "journal"]`.
    module: Vec<String>,
    /// The code with comments, strings and test modules blanked (same offsets).
    code: String,
    /// Child modules declared with `mod x;`.
    children: BTreeSet<String>,
}

#[test]
fn imports_point_one_way_down_the_data_path() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = read_tree(&src);
    let problems = check(&files);
    assert!(
        problems.is_empty(),
        "{} import(s) across the layering rules (tests/layering.rs says which may use which):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Every problem, one line each.
fn check(files: &[SourceFile]) -> Vec<String> {
    let by_module: HashMap<Vec<String>, usize> = files.iter().enumerate().map(|(i, f)| (f.module.clone(), i)).collect();
    let exports: Vec<Vec<(String, Vec<String>)>> = files.iter().map(reexports).collect();
    let rank: HashMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, (m, _))| (*m, i)).collect();
    let mut problems = Vec::new();
    // file → (file, line) arrows
    let mut edges: BTreeMap<usize, BTreeMap<usize, usize>> = BTreeMap::new();

    for (fi, f) in files.iter().enumerate() {
        let top = f.module.first().map(String::as_str).unwrap_or("");
        for (line, path) in imports(f) {
            match resolve(&path, files, &by_module, &exports) {
                Target::File(ti) => {
                    let t = &files[ti];
                    if ti == fi || owns(f, t) {
                        continue;
                    }
                    edges.entry(fi).or_default().entry(ti).or_insert(line);
                    let ttop = t.module.first().map(String::as_str).unwrap_or("");
                    if let (Some(&a), Some(&b)) = (rank.get(top), rank.get(ttop)) {
                        if b > a {
                            problems.push(format!(
                                "src/{}:{line}: `{top}` ({}) may not import `{ttop}` ({}), a layer above it: {}",
                                f.rel,
                                LAYERS[a].1,
                                LAYERS[b].1,
                                path.join("::")
                            ));
                        }
                    }
                    for (from, to, why) in FILE_RULES {
                        if f.rel.starts_with(from) && t.rel.starts_with(to) {
                            problems.push(format!("src/{}:{line}: may not import src/{}: {why}", f.rel, t.rel));
                        }
                    }
                }
                Target::Extern(name) => {
                    for (module, krate, why) in CRATE_RULES {
                        if top == *module && name == *krate {
                            problems.push(format!("src/{}:{line}: `{top}` may not use the crate `{krate}`: {why}", f.rel));
                        }
                    }
                }
                Target::Unknown => {}
            }
        }
        for (module, text, why) in TEXT_RULES {
            if top == *module {
                if let Some(at) = f.code.find(text) {
                    problems.push(format!("src/{}:{}: `{text}`: {why}", f.rel, line_of(&f.code, at)));
                }
            }
        }
    }
    for (members, cycle) in cycles(&edges) {
        let mut shown = Vec::new();
        for (i, &from) in cycle.iter().enumerate() {
            let to = cycle[(i + 1) % cycle.len()];
            shown.push(format!("src/{}:{} → src/{}", files[from].rel, edges[&from][&to], files[to].rel));
        }
        let names: Vec<String> = members.iter().map(|&i| format!("src/{}", files[i].rel)).collect();
        problems.push(format!(
            "import circle among {} files ({}); the shortest: {}",
            members.len(),
            names.join(", "),
            shown.join(", ")
        ));
    }
    // A path named twice on a line (in a `use` and again inline) is one problem.
    let mut seen = BTreeSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    problems
}

fn owns(parent: &SourceFile, child: &SourceFile) -> bool {
    child.module.len() > parent.module.len() && child.module.starts_with(&parent.module)
}

enum Target {
    File(usize),
    Extern(String),
    Unknown,
}

/// The file that defines what `path` (absolute, from the crate root) names.
fn resolve(
    path: &[String],
    files: &[SourceFile],
    by_module: &HashMap<Vec<String>, usize>,
    exports: &[Vec<(String, Vec<String>)>],
) -> Target {
    if path.first().map(String::as_str) != Some("crate") {
        return match path.first() {
            Some(name) => Target::Extern(name.clone()),
            None => Target::Unknown,
        };
    }
    let mut path: Vec<String> = path[1..].to_vec();
    for _ in 0..8 {
        // The longest prefix that is a module with a file of its own.
        let mut found = None;
        for len in (0..=path.len()).rev() {
            if let Some(&i) = by_module.get(&path[..len].to_vec()) {
                found = Some((i, len));
                break;
            }
        }
        let Some((i, len)) = found else { return Target::Unknown };
        // An item re-exported there is defined elsewhere: follow it.
        if let Some(name) = path.get(len) {
            if let Some((_, target)) = exports[i].iter().find(|(n, _)| n == name) {
                let mut next = target[1..].to_vec();
                next.extend_from_slice(&path[len + 1..]);
                if next != path {
                    path = next;
                    continue;
                }
            }
        }
        if files[i].module.is_empty() {
            return Target::Unknown; // lib.rs itself
        }
        return Target::File(i);
    }
    Target::Unknown
}

/// `pub use` items of a file: (name it is known by here, absolute path).
fn reexports(f: &SourceFile) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (start, tree) in use_trees(&f.code) {
        let before = f.code[..start].trim_end();
        if !(before.ends_with("pub") || before.ends_with(')')) {
            continue;
        }
        for (path, alias) in expand(&tree) {
            let abs = absolute(f, &path);
            let name = alias.or_else(|| path.last().cloned()).unwrap_or_default();
            if name != "*" && name != "self" {
                out.push((name, abs));
            }
        }
    }
    out
}

/// Every path a file imports, with its line: `use` trees and inline `crate::`/`super::`.
fn imports(f: &SourceFile) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    for (start, tree) in use_trees(&f.code) {
        let line = line_of(&f.code, start);
        for (path, _) in expand(&tree) {
            out.push((line, absolute(f, &path)));
        }
    }
    let bytes = f.code.as_bytes();
    for key in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = f.code[from..].find(key).map(|i| i + from) {
            from = at + key.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_' || bytes[at - 1] == b':') {
                continue;
            }
            let mut end = at;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':') {
                end += 1;
            }
            let path: Vec<String> =
                f.code[at..end].split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
            out.push((line_of(&f.code, at), absolute(f, &path)));
        }
    }
    out
}

/// A path as written in a file, made absolute (`crate::…`); extern crates stay as
/// they are.
fn absolute(f: &SourceFile, path: &[String]) -> Vec<String> {
    let mut base: Vec<String> = f.module.clone();
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => return path.to_vec(),
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        Some(first) if f.children.contains(first) => {}
        _ => return path.to_vec(), // an extern crate, or a name in scope
    }
    let mut abs = vec!["crate".to_string()];
    abs.extend(base);
    abs.extend(rest.iter().cloned());
    abs
}

/// The `use` declarations of a file: (offset of `use`, the tree's text).
fn use_trees(code: &str) -> Vec<(usize, String)> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("use").map(|i| i + from) {
        from = at + 3;
        let before_ok = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let after_ok = bytes.get(at + 3).is_some_and(|b| b.is_ascii_whitespace());
        if !before_ok || !after_ok {
            continue;
        }
        let Some(end) = code[at..].find(';').map(|i| i + at) else { break };
        out.push((at, code[at + 3..end].trim().to_string()));
        from = end;
    }
    out
}

/// `a::{b, c::{d as e}, f::*}` → the paths it names, each with its alias.
fn expand(tree: &str) -> Vec<(Vec<String>, Option<String>)> {
    fn go(s: &str, prefix: &[String], out: &mut Vec<(Vec<String>, Option<String>)>) {
        let s = s.trim();
        if s.is_empty() {
            return;
        }
        if let Some(open) = s.find('{') {
            let head: Vec<String> =
                s[..open].split("::").map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect();
            let close = s.rfind('}').unwrap_or(s.len());
            let inner = &s[open + 1..close];
            let mut base = prefix.to_vec();
            base.extend(head);
            for part in split_top(inner) {
                go(part, &base, out);
            }
            return;
        }
        let (path, alias) = match s.split_once(" as ") {
            Some((p, a)) => (p.trim(), Some(a.trim().to_string())),
            None => (s, None),
        };
        let mut full = prefix.to_vec();
        for seg in path.split("::").map(str::trim).filter(|p| !p.is_empty()) {
            if seg == "self" && !full.is_empty() {
                continue;
            }
            full.push(seg.to_string());
        }
        out.push((full, alias));
    }
    let mut out = Vec::new();
    go(tree, &[], &mut out);
    out
}

/// Splits at the commas outside braces.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn line_of(code: &str, at: usize) -> usize {
    code[..at].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Circles in the file graph (Tarjan's strongly connected components), each as one
/// cycle through its files.
fn cycles(edges: &BTreeMap<usize, BTreeMap<usize, usize>>) -> Vec<(BTreeSet<usize>, Vec<usize>)> {
    struct State<'a> {
        edges: &'a BTreeMap<usize, BTreeMap<usize, usize>>,
        index: HashMap<usize, usize>,
        low: HashMap<usize, usize>,
        stack: Vec<usize>,
        on_stack: BTreeSet<usize>,
        next: usize,
        found: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State<'_>, v: usize) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let targets: Vec<usize> = s.edges.get(&v).map(|m| m.keys().copied().collect()).unwrap_or_default();
        for w in targets {
            if !s.index.contains_key(&w) {
                visit(s, w);
                let lw = s.low[&w];
                let lv = s.low.get_mut(&v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(&w) {
                let iw = s.index[&w];
                let lv = s.low.get_mut(&v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[&v] == s.index[&v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(&w);
                component.push(w);
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    let nodes: Vec<usize> = edges.keys().copied().collect();
    for v in nodes {
        if !s.index.contains_key(&v) {
            visit(&mut s, v);
        }
    }
    // A walk that stays inside each component and comes back to its start.
    s.found
        .into_iter()
        .map(|component| {
            let members: BTreeSet<usize> = component.iter().copied().collect();
            let start = *members.iter().next().unwrap();
            let cycle = shortest_cycle(edges, &members, start);
            (members, cycle)
        })
        .collect()
}

/// The shortest way from `start` back to itself inside `members` (breadth first).
fn shortest_cycle(edges: &BTreeMap<usize, BTreeMap<usize, usize>>, members: &BTreeSet<usize>, start: usize) -> Vec<usize> {
    let mut prev: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &w in edges.get(&v).map(|m| m.keys().collect::<Vec<_>>()).unwrap_or_default() {
            if !members.contains(&w) {
                continue;
            }
            if w == start {
                let mut path = vec![v];
                let mut at = v;
                while at != start {
                    at = prev[&at];
                    path.push(at);
                }
                path.reverse();
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(w) {
                e.insert(v);
                queue.push_back(w);
            }
        }
    }
    members.iter().copied().collect()
}

// ---------------------------------------------------------------------------
// Reading the tree

fn read_tree(src: &Path) -> Vec<SourceFile> {
    let mut paths = Vec::new();
    walk(src, &mut paths);
    paths.sort();
    let mut files = Vec::new();
    for path in paths {
        let rel = path.strip_prefix(src).unwrap().to_string_lossy().replace('\\', "/");
        if rel == "main.rs" {
            continue; // the binary: a crate of its own
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = blank_tests(&blank_comments_and_strings(&text));
        let module = module_of(&rel);
        let children = declared_children(&code);
        files.push(SourceFile { rel, module, code, children });
    }
    files
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel.trim_end_matches(".rs").split('/').map(str::to_string).collect();
    if matches!(parts.last().map(String::as_str), Some("mod") | Some("lib")) {
        parts.pop();
    }
    parts
}

fn declared_children(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let l = line.trim();
        let l = l.strip_prefix("pub(crate) ").or_else(|| l.strip_prefix("pub ")).unwrap_or(l);
        if let Some(name) = l.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
            out.insert(name.trim().to_string());
        }
    }
    out
}

/// Comments, string and char literals become spaces (newlines kept), so what is left
/// is code at the same offsets.
fn blank_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for x in &mut out[from..to.min(b.len())] {
            if *x != b'\n' {
                *x = b' ';
            }
        }
    };
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            let end = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if b[i] == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) && (i == 0 || !is_ident(b[i - 1])) {
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            let body = i + 2 + hashes;
            let end = find(&b[body..], &close).map_or(b.len(), |p| body + p + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if b[i] == b'\'' {
            // A char literal ('a', '\n', '\u{..}'), not a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..].iter().position(|&c| c == b'\'').map(|p| i + 2 + p + 1)
            } else {
                let ch_len = std::str::from_utf8(&b[i + 1..]).ok().and_then(|s| s.chars().next()).map_or(1, char::len_utf8);
                (b.get(i + 1 + ch_len) == Some(&b'\'')).then_some(i + 2 + ch_len)
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Blanks `#[cfg(test)]` items (test modules and test-only functions).
fn blank_tests(code: &str) -> String {
    let mut out = code.as_bytes().to_vec();
    let mut from = 0;
    while let Some(at) = code[from..].find("#[cfg(test)]").map(|i| i + from) {
        // The item ends at its closing brace, or at a `;` before any brace.
        let rest = &code[at..];
        let brace = rest.find('{');
        let semi = rest.find(';');
        let end = match (brace, semi) {
            (Some(b), Some(s)) if s < b => at + s + 1,
            (Some(b), _) => {
                let mut depth = 0;
                let mut end = code.len();
                for (i, c) in code[at + b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = at + b + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, Some(s)) => at + s + 1,
            (None, None) => code.len(),
        };
        for x in &mut out[at..end] {
            if *x != b'\n' {
                *x = b' ';
            }
        }
        from = end;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------
// The checker checks itself: a tree with each kind of fault is refused, naming it.

fn fake(files: &[(&str, &str)]) -> Vec<SourceFile> {
    files
        .iter()
        .map(|(rel, text)| {
            let code = blank_tests(&blank_comments_and_strings(text));
            SourceFile { rel: rel.to_string(), module: module_of(rel), children: declared_children(&code), code }
        })
        .collect()
}

#[test]
fn the_checker_names_an_upward_import_with_its_line() {
    let files = fake(&[
        ("lib.rs", "pub mod store;\npub mod ingest;\n"),
        ("store/mod.rs", "pub mod journal;\n"),
        ("store/journal.rs", "//! x\nuse crate::ingest::connection::EventOutcomes;\n"),
        ("ingest/mod.rs", "pub mod connection;\n"),
        ("ingest/connection.rs", "pub struct EventOutcomes;\n"),
    ]);
    let problems = check(&files);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("src/store/journal.rs:2: `store`"), "{}", problems[0]);
    assert!(problems[0].contains("may not import `ingest`"), "{}", problems[0]);
}

#[test]
fn the_checker_follows_reexports_and_finds_circles_inside_a_module() {
    let files = fake(&[
        ("lib.rs", "pub mod workflow;\n"),
        ("workflow/mod.rs", "pub mod compiled;\npub mod validate;\npub mod model;\npub use compiled::{Compiled};\n"),
        ("workflow/compiled.rs", "use super::validate::check;\npub struct Compiled;\n"),
        ("workflow/validate.rs", "use crate::workflow::{Compiled, model::Spec};\npub fn check() {}\n"),
        ("workflow/model.rs", "pub struct Spec;\n#[cfg(test)]\nmod tests { use crate::workflow::validate::check; }\n"),
    ]);
    let problems = check(&files);
    assert!(problems.iter().any(|p| p.starts_with("src/workflow/validate.rs:1: may not import src/workflow/compiled.rs")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("import circle among 2 files")), "{problems:?}");
    // The test module of model.rs is not read.
    assert!(!problems.iter().any(|p| p.contains("src/workflow/model.rs")), "{problems:?}");
}

#[test]
fn the_checker_ignores_paths_in_comments_and_strings_and_names_forbidden_crates() {
    let files = fake(&[
        ("lib.rs", "pub mod wire;\npub mod workflow;\npub mod router;\n"),
        ("wire.rs", "// use crate::router::Scope;\nconst S: &str = \"crate::router::Scope\";\n"),
        ("workflow/mod.rs", "use actix::prelude::*;\n"),
        ("router.rs", "use crate::wire::Outcome;\n"),
    ]);
    let problems = check(&files);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("may not use the crate `actix`"), "{}", problems[0]);
}
