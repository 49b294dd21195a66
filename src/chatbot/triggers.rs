//! The `TriggerIndex`: which of a chatbot's workflows an event starts.
//!
//! The chatbot supervisor owns one index, rebuilt from its enabled workflows whenever
//! they change, and asks it about every event. It is a plain struct: the supervisor
//! moves messages, this decides.
//!
//! Matching must cost about the same for 10 workflows as for 10,000, so nothing here
//! walks the workflow list. The event type selects a per-type index; within it, each
//! filter kind has a structure that yields only plausible candidates:
//! - keywords: one Aho-Corasick automaton over every keyword of the chatbot, run once
//!   over the lower-cased message text;
//! - intents: lists by intent name, sorted by `min_confidence`, so the candidates are
//!   a prefix found by binary search;
//! - sentiment: lists by label, sorted by score bound;
//! - images: maps by label and by mime type.
//!
//! Conditions then run on the candidates only. The semantics of every filter are
//! defined once, per workflow, in `workflow::compiled::filter_mismatch`; the tests
//! below check the index against it.

use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::event::EventType;
use crate::workflow::compiled::{
    contains_whole_word, data_f64, data_str, data_strings, intent_confidence, keyword_matches,
    whole_word_at,
};
use crate::workflow::CompiledWorkflow;

/// The enabled workflows of one chatbot, indexed by what their triggers listen to.
#[derive(Debug)]
pub struct TriggerIndex {
    workflows: Vec<Arc<CompiledWorkflow>>,
    /// One slot per native event type, in the order of `native_slot`.
    native: [TypeIndex; 6],
    custom: HashMap<Box<str>, TypeIndex>,
}

impl TriggerIndex {
    /// Indexes `workflows`; a workflow's index is its position among the enabled ones
    /// passed in (disabled ones are skipped).
    pub fn build(workflows: Vec<Arc<CompiledWorkflow>>) -> TriggerIndex {
        let mut workflows: Vec<Arc<CompiledWorkflow>> =
            workflows.into_iter().filter(|w| w.spec.enabled).collect();
        // Indices are u32 to halve the size of candidate lists; no chatbot comes close.
        workflows.truncate(u32::MAX as usize);

        let mut index = TriggerIndex {
            workflows: Vec::new(),
            native: Default::default(),
            custom: HashMap::new(),
        };
        for (i, workflow) in workflows.iter().enumerate() {
            let id = i as u32;
            let kind = EventType::parse(&workflow.spec.trigger.event);
            let type_index = match native_slot(&kind) {
                Some(slot) => &mut index.native[slot],
                None => index.custom.entry(kind.as_str().into()).or_default(),
            };
            type_index.add(id, workflow);
        }
        for type_index in index.native.iter_mut().chain(index.custom.values_mut()) {
            type_index.finish(&workflows);
        }
        index.workflows = workflows;
        index
    }

    pub fn empty() -> TriggerIndex {
        TriggerIndex::build(Vec::new())
    }

    pub fn len(&self) -> usize {
        self.workflows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workflows.is_empty()
    }

    /// The workflow at `idx` as returned by [`match_event`](Self::match_event).
    /// Panics when `idx` did not come from this index.
    pub fn workflow(&self, idx: u32) -> &Arc<CompiledWorkflow> {
        &self.workflows[idx as usize]
    }

    pub fn workflows(&self) -> &[Arc<CompiledWorkflow>] {
        &self.workflows
    }

    /// Cheap check used before parsing an event's JSON at all: does any workflow
    /// listen to this type?
    pub fn has_candidates(&self, kind: &EventType) -> bool {
        self.type_index(kind).is_some_and(|t| t.count > 0)
    }

    /// Appends to `out` (cleared first) the indices of workflows whose trigger and
    /// conditions match, ascending, without duplicates. `doc` is the whole event
    /// document (`type`, `conversation_id`, `data`, …); `kind` is its type.
    pub fn match_event(&self, kind: &EventType, doc: &Value, out: &mut Vec<u32>) {
        out.clear();
        let Some(type_index) = self.type_index(kind) else {
            return;
        };
        type_index.candidates(doc, &self.workflows, out);
        // Several keywords or labels can nominate the same workflow; sorting also
        // gives callers a stable order (the order workflows were passed to `build`).
        out.sort_unstable();
        out.dedup();
        out.retain(|&i| self.workflows[i as usize].conditions_match(doc));
    }

    fn type_index(&self, kind: &EventType) -> Option<&TypeIndex> {
        match native_slot(kind) {
            Some(slot) => Some(&self.native[slot]),
            None => self.custom.get(kind.as_str()),
        }
    }
}

fn native_slot(kind: &EventType) -> Option<usize> {
    match kind {
        EventType::ConversationStarted => Some(0),
        EventType::MessageReceived => Some(1),
        EventType::SentimentAnalyzed => Some(2),
        EventType::ImageUploaded => Some(3),
        EventType::IntentDetected => Some(4),
        EventType::ConversationEnded => Some(5),
        EventType::Custom(_) => None,
    }
}

/// Everything listening to one event type.
#[derive(Debug, Default)]
struct TypeIndex {
    count: usize,
    /// Workflows without a filter: always candidates.
    unfiltered: Vec<u32>,
    /// Collected while building, turned into `keywords` by `finish`.
    keyword_workflows: Vec<u32>,
    keywords: Option<KeywordIndex>,
    intents: IntentIndex,
    sentiments: SentimentIndex,
    images: ImageIndex,
}

impl TypeIndex {
    fn add(&mut self, id: u32, workflow: &CompiledWorkflow) {
        self.count += 1;
        let trigger = &workflow.spec.trigger;
        // Validation allows one filter; should more get through, the first one in this
        // order is the one `filter_mismatch` applies too.
        if trigger.keywords.is_some() {
            self.keyword_workflows.push(id);
        } else if let Some(filter) = &trigger.intent {
            self.intents.add(id, filter);
        } else if let Some(filter) = &trigger.sentiment {
            self.sentiments.add(id, filter);
        } else if let Some(filter) = &trigger.image {
            self.images.add(id, filter);
        } else {
            self.unfiltered.push(id);
        }
    }

    fn finish(&mut self, workflows: &[Arc<CompiledWorkflow>]) {
        if !self.keyword_workflows.is_empty() {
            let ids = std::mem::take(&mut self.keyword_workflows);
            self.keywords = Some(KeywordIndex::build(workflows, ids));
        }
        self.intents.finish();
        self.sentiments.finish();
    }

    fn candidates(&self, doc: &Value, workflows: &[Arc<CompiledWorkflow>], out: &mut Vec<u32>) {
        out.extend_from_slice(&self.unfiltered);
        if let Some(keywords) = &self.keywords {
            keywords.candidates(doc, workflows, out);
        }
        self.intents.candidates(doc, out);
        self.sentiments.candidates(doc, out);
        self.images.candidates(doc, workflows, out);
    }
}

#[derive(Debug)]
struct KeywordPosting {
    workflow: u32,
    /// The keyword as written, for `case_sensitive` workflows: the automaton finds the
    /// lower-cased form, this must then also appear exactly.
    exact: Option<Box<str>>,
}

#[derive(Debug)]
enum KeywordIndex {
    Automaton {
        automaton: AhoCorasick,
        /// Postings of pattern `p` are `postings[offsets[p]..offsets[p + 1]]`: one flat
        /// vector instead of one allocation per keyword.
        offsets: Vec<u32>,
        postings: Vec<KeywordPosting>,
    },
    /// The automaton could not be built (far beyond any real keyword set): check
    /// each keyword workflow directly, slower but still correct.
    Scan(Vec<u32>),
}

impl KeywordIndex {
    fn build(workflows: &[Arc<CompiledWorkflow>], ids: Vec<u32>) -> KeywordIndex {
        let mut pattern_ids: HashMap<String, usize> = HashMap::new();
        let mut patterns: Vec<String> = Vec::new();
        let mut per_pattern: Vec<Vec<KeywordPosting>> = Vec::new();
        for &id in &ids {
            let Some(filter) = &workflows[id as usize].spec.trigger.keywords else {
                continue;
            };
            for keyword in &filter.any {
                // An empty pattern would match at every position; validation forbids it.
                if keyword.is_empty() {
                    continue;
                }
                let lower = keyword.to_lowercase();
                let pattern = *pattern_ids.entry(lower).or_insert_with_key(|lower| {
                    patterns.push(lower.clone());
                    per_pattern.push(Vec::new());
                    patterns.len() - 1
                });
                per_pattern[pattern].push(KeywordPosting {
                    workflow: id,
                    exact: filter.case_sensitive.then(|| keyword.as_str().into()),
                });
            }
        }
        // Overlapping search needs the standard match semantics; it is what lets
        // "cancel" and "cancel order" both match the same text.
        let automaton = match AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(&patterns)
        {
            Ok(automaton) => automaton,
            Err(error) => {
                tracing::warn!(%error, patterns = patterns.len(), "keyword automaton too large; scanning keyword workflows one by one");
                return KeywordIndex::Scan(ids);
            }
        };
        let mut offsets = Vec::with_capacity(per_pattern.len() + 1);
        let mut postings = Vec::with_capacity(per_pattern.iter().map(Vec::len).sum());
        offsets.push(0);
        for list in per_pattern {
            postings.extend(list);
            offsets.push(postings.len() as u32);
        }
        KeywordIndex::Automaton {
            automaton,
            offsets,
            postings,
        }
    }

    fn candidates(&self, doc: &Value, workflows: &[Arc<CompiledWorkflow>], out: &mut Vec<u32>) {
        let Some(text) = data_str(doc, "text") else {
            return;
        };
        let lower = text.to_lowercase();
        match self {
            KeywordIndex::Automaton {
                automaton,
                offsets,
                postings,
            } => {
                // Patterns found as whole words; a pattern may occur many times.
                let mut hits: Vec<u32> = Vec::new();
                for found in automaton.find_overlapping_iter(&lower) {
                    if whole_word_at(&lower, found.start(), found.end()) {
                        hits.push(found.pattern().as_u32());
                    }
                }
                hits.sort_unstable();
                hits.dedup();
                for pattern in hits {
                    let range =
                        offsets[pattern as usize] as usize..offsets[pattern as usize + 1] as usize;
                    for posting in &postings[range] {
                        if let Some(exact) = &posting.exact {
                            if !contains_whole_word(text, exact) {
                                continue;
                            }
                        }
                        out.push(posting.workflow);
                    }
                }
            }
            KeywordIndex::Scan(ids) => {
                for &id in ids {
                    let trigger = &workflows[id as usize].spec.trigger;
                    if trigger
                        .keywords
                        .as_ref()
                        .is_some_and(|filter| keyword_matches(filter, text, &lower))
                    {
                        out.push(id);
                    }
                }
            }
        }
    }
}

/// Pushes the ids of `list` (sorted by threshold) whose threshold is at most `value`.
fn push_up_to(list: &[(f64, u32)], value: f64, out: &mut Vec<u32>) {
    let end = list.partition_point(|(threshold, _)| *threshold <= value);
    out.extend(list[..end].iter().map(|(_, id)| *id));
}

fn sort_by_bound(list: &mut [(f64, u32)]) {
    list.sort_by(|a, b| a.0.total_cmp(&b.0));
}

#[derive(Debug, Default)]
struct IntentIndex {
    /// (min_confidence, workflow), sorted by min_confidence.
    by_name: HashMap<Box<str>, Vec<(f64, u32)>>,
    /// Workflows with an empty `names` list: any intent.
    any_name: Vec<(f64, u32)>,
}

impl IntentIndex {
    fn add(&mut self, id: u32, filter: &crate::workflow::IntentFilter) {
        if filter.names.is_empty() {
            self.any_name.push((filter.min_confidence, id));
        }
        for name in &filter.names {
            self.by_name
                .entry(name.as_str().into())
                .or_default()
                .push((filter.min_confidence, id));
        }
    }

    fn finish(&mut self) {
        sort_by_bound(&mut self.any_name);
        for list in self.by_name.values_mut() {
            sort_by_bound(list);
        }
    }

    fn candidates(&self, doc: &Value, out: &mut Vec<u32>) {
        if self.by_name.is_empty() && self.any_name.is_empty() {
            return;
        }
        let (Some(name), Some(confidence)) = (data_str(doc, "name"), intent_confidence(doc)) else {
            return;
        };
        push_up_to(&self.any_name, confidence, out);
        if let Some(list) = self.by_name.get(name) {
            push_up_to(list, confidence, out);
        }
    }
}

#[derive(Debug, Default)]
struct SentimentIndex {
    by_label: HashMap<Box<str>, ScoreBuckets>,
    /// Workflows without labels (score bounds only).
    any_label: ScoreBuckets,
}

impl SentimentIndex {
    fn add(&mut self, id: u32, filter: &crate::workflow::SentimentFilter) {
        let (above, below) = (filter.score_above, filter.score_below);
        if filter.labels.is_empty() {
            self.any_label.add(id, above, below);
        }
        for label in &filter.labels {
            self.by_label
                .entry(label.as_str().into())
                .or_default()
                .add(id, above, below);
        }
    }

    fn finish(&mut self) {
        self.any_label.finish();
        self.by_label.values_mut().for_each(ScoreBuckets::finish);
    }

    fn candidates(&self, doc: &Value, out: &mut Vec<u32>) {
        if self.by_label.is_empty() && self.any_label.is_empty() {
            return;
        }
        let score = data_f64(doc, "score");
        self.any_label.candidates(score, out);
        if let Some(buckets) = data_str(doc, "label").and_then(|l| self.by_label.get(l)) {
            buckets.candidates(score, out);
        }
    }
}

/// Sentiment workflows of one label, split by which score bounds they set. Bounds are
/// strict: `score_below: b` means score < b, `score_above: a` means score > a.
#[derive(Debug, Default)]
struct ScoreBuckets {
    unbounded: Vec<u32>,
    /// (score_below, workflow), sorted: matches are a suffix.
    below: Vec<(f64, u32)>,
    /// (score_above, workflow), sorted: matches are a prefix.
    above: Vec<(f64, u32)>,
    /// (score_above, score_below, workflow), sorted by score_above: candidates are a
    /// prefix, each then checked against its upper bound.
    between: Vec<(f64, f64, u32)>,
}

impl ScoreBuckets {
    fn add(&mut self, id: u32, above: Option<f64>, below: Option<f64>) {
        match (above, below) {
            (None, None) => self.unbounded.push(id),
            (None, Some(below)) => self.below.push((below, id)),
            (Some(above), None) => self.above.push((above, id)),
            (Some(above), Some(below)) => self.between.push((above, below, id)),
        }
    }

    fn is_empty(&self) -> bool {
        self.unbounded.is_empty()
            && self.below.is_empty()
            && self.above.is_empty()
            && self.between.is_empty()
    }

    fn finish(&mut self) {
        sort_by_bound(&mut self.below);
        sort_by_bound(&mut self.above);
        self.between.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    fn candidates(&self, score: Option<f64>, out: &mut Vec<u32>) {
        out.extend_from_slice(&self.unbounded);
        // Bounded workflows need a numeric score.
        let Some(score) = score else {
            return;
        };
        let start = self.below.partition_point(|(below, _)| *below <= score);
        out.extend(self.below[start..].iter().map(|(_, id)| *id));
        let end = self.above.partition_point(|(above, _)| *above < score);
        out.extend(self.above[..end].iter().map(|(_, id)| *id));
        let end = self.between.partition_point(|(above, _, _)| *above < score);
        out.extend(
            self.between[..end]
                .iter()
                .filter(|(_, below, _)| score < *below)
                .map(|(_, _, id)| *id),
        );
    }
}

#[derive(Debug, Default)]
struct ImageIndex {
    /// Workflows with `labels_any`, by label; the flag says the workflow also lists
    /// mime types, which the event must then satisfy too.
    by_label: HashMap<Box<str>, Vec<(u32, bool)>>,
    /// Workflows with only `mime_types`, by lower-cased mime type.
    by_mime: HashMap<Box<str>, Vec<u32>>,
}

impl ImageIndex {
    fn add(&mut self, id: u32, filter: &crate::workflow::ImageFilter) {
        if filter.labels_any.is_empty() {
            for mime in &filter.mime_types {
                self.by_mime
                    .entry(mime.to_ascii_lowercase().into())
                    .or_default()
                    .push(id);
            }
            return;
        }
        let needs_mime = !filter.mime_types.is_empty();
        for label in &filter.labels_any {
            self.by_label
                .entry(label.as_str().into())
                .or_default()
                .push((id, needs_mime));
        }
    }

    fn candidates(&self, doc: &Value, workflows: &[Arc<CompiledWorkflow>], out: &mut Vec<u32>) {
        if self.by_label.is_empty() && self.by_mime.is_empty() {
            return;
        }
        let mime = data_str(doc, "mime_type");
        if !self.by_mime.is_empty() {
            if let Some(mime) = mime {
                let lower: Cow<'_, str> = if mime.bytes().any(|b| b.is_ascii_uppercase()) {
                    Cow::Owned(mime.to_ascii_lowercase())
                } else {
                    Cow::Borrowed(mime)
                };
                if let Some(list) = self.by_mime.get(lower.as_ref()) {
                    out.extend_from_slice(list);
                }
            }
        }
        if self.by_label.is_empty() {
            return;
        }
        let Some(labels) = data_strings(doc, "labels") else {
            return;
        };
        for label in labels {
            let Some(list) = self.by_label.get(label) else {
                continue;
            };
            for &(id, needs_mime) in list {
                if needs_mime && !mime.is_some_and(|m| mime_listed(&workflows[id as usize], m)) {
                    continue;
                }
                out.push(id);
            }
        }
    }
}

fn mime_listed(workflow: &CompiledWorkflow, mime: &str) -> bool {
    workflow
        .spec
        .trigger
        .image
        .as_ref()
        .is_some_and(|f| f.mime_types.iter().any(|m| m.eq_ignore_ascii_case(mime)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::WorkflowSpec;
    use serde_json::json;
    use uuid::Uuid;

    fn workflow(n: u128, trigger: Value, conditions: Value) -> Arc<CompiledWorkflow> {
        let spec: WorkflowSpec = serde_json::from_value(json!({
            "name": format!("wf {n}"),
            "trigger": trigger,
            "conditions": conditions,
            "steps": [{"id": "r", "action": "reply", "text": "hi"}]
        }))
        .unwrap();
        Arc::new(CompiledWorkflow::compile(Uuid::from_u128(n), 1, spec).unwrap())
    }

    fn index(triggers: Vec<Value>) -> TriggerIndex {
        TriggerIndex::build(
            triggers
                .into_iter()
                .enumerate()
                .map(|(i, t)| workflow(i as u128, t, json!([])))
                .collect(),
        )
    }

    fn event(kind: &str, data: Value) -> Value {
        json!({"id": "e-1", "type": kind, "conversation_id": "c-1", "data": data})
    }

    /// Matches `doc` and checks the result against the one-workflow-at-a-time
    /// definition of a match (`explain`), so every test also checks the index agrees
    /// with `filter_mismatch` and the conditions.
    fn matched(index: &TriggerIndex, doc: &Value) -> Vec<u32> {
        let kind = EventType::parse(doc["type"].as_str().unwrap());
        let mut out = vec![999];
        index.match_event(&kind, doc, &mut out);
        let expected: Vec<u32> = (0..index.len() as u32)
            .filter(|&i| index.workflow(i).explain(doc).is_none())
            .collect();
        assert_eq!(out, expected, "index and explain disagree on {doc}");
        out
    }

    fn text(index: &TriggerIndex, text: &str) -> Vec<u32> {
        matched(index, &event("message.received", json!({"text": text})))
    }

    #[test]
    fn keywords_match_whole_words_in_any_case() {
        let idx = index(vec![
            json!({"event": "message.received", "keywords": {"any": ["cancel", "unsubscribe"]}}),
            json!({"event": "message.received", "keywords": {"any": ["refund"]}}),
        ]);
        assert_eq!(text(&idx, "Please CANCEL my plan"), [0]);
        assert_eq!(text(&idx, "unsubscribe."), [0]);
        assert_eq!(text(&idx, "refund, then Unsubscribe!"), [0, 1]);
        assert_eq!(text(&idx, "cancellation pending"), Vec::<u32>::new());
        assert_eq!(text(&idx, "precancel"), Vec::<u32>::new());
        assert_eq!(text(&idx, "cancel_now"), Vec::<u32>::new());
        assert_eq!(text(&idx, "refund2"), Vec::<u32>::new());
        assert_eq!(text(&idx, "nothing here"), Vec::<u32>::new());
        // Missing or mistyped text matches nothing.
        assert_eq!(
            matched(&idx, &event("message.received", json!({"text": 7}))),
            Vec::<u32>::new()
        );
        assert_eq!(
            matched(&idx, &event("message.received", json!({}))),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn keywords_fold_non_ascii_case() {
        let idx = index(vec![
            json!({"event": "message.received", "keywords": {"any": ["échec"]}}),
            json!({"event": "message.received", "keywords": {"any": ["GRÜSSE"]}}),
        ]);
        assert_eq!(text(&idx, "ÉCHEC du paiement"), [0]);
        assert_eq!(text(&idx, "un échec"), [0]);
        assert_eq!(text(&idx, "échecs"), Vec::<u32>::new());
        // 'é' is a letter, so "xéchec" is not the word "échec".
        assert_eq!(text(&idx, "xéchec"), Vec::<u32>::new());
        assert_eq!(text(&idx, "viele Grüsse"), [1]);
    }

    #[test]
    fn case_sensitive_keywords_need_the_exact_word() {
        let idx = index(vec![
            json!({"event": "message.received", "keywords": {"any": ["STOP"], "case_sensitive": true}}),
            json!({"event": "message.received", "keywords": {"any": ["stop"]}}),
            json!({"event": "message.received", "keywords": {"any": ["Stop", "HALT"], "case_sensitive": true}}),
        ]);
        assert_eq!(text(&idx, "STOP now"), [0, 1]);
        assert_eq!(text(&idx, "stop now"), [1]);
        assert_eq!(text(&idx, "Stop now"), [1, 2]);
        assert_eq!(text(&idx, "stop and HALT"), [1, 2]);
        // The exact form must be a whole word too, not just the folded one.
        assert_eq!(text(&idx, "STOPPED, then stop"), [1]);
        assert_eq!(text(&idx, "halt"), Vec::<u32>::new());
    }

    #[test]
    fn overlapping_keywords_all_match() {
        let idx = index(vec![
            json!({"event": "message.received", "keywords": {"any": ["cancel"]}}),
            json!({"event": "message.received", "keywords": {"any": ["cancel order"]}}),
            json!({"event": "message.received", "keywords": {"any": ["order"]}}),
            json!({"event": "message.received", "keywords": {"any": ["my cancel", "cancel", "CANCEL ORDER"]}}),
        ]);
        assert_eq!(text(&idx, "please cancel order 42"), [0, 1, 2, 3]);
        assert_eq!(text(&idx, "cancel orders"), [0, 3]);
        assert_eq!(text(&idx, "order"), [2]);
        assert_eq!(text(&idx, "cancel cancel cancel"), [0, 3]);
    }

    #[test]
    fn intent_min_confidence_boundaries() {
        let idx = index(vec![
            json!({"event": "intent.detected", "intent": {"names": ["refund"], "min_confidence": 0.7}}),
            json!({"event": "intent.detected", "intent": {"names": ["refund", "billing"]}}),
            json!({"event": "intent.detected", "intent": {"names": [], "min_confidence": 0.9}}),
            json!({"event": "intent.detected", "intent": {"names": ["billing"], "min_confidence": 1.0}}),
        ]);
        let intent = |name: &str, confidence: Value| {
            let mut data = json!({"name": name});
            if !confidence.is_null() {
                data["confidence"] = confidence;
            }
            matched(&idx, &event("intent.detected", data))
        };
        assert_eq!(intent("refund", json!(0.7)), [0, 1]);
        assert_eq!(intent("refund", json!(0.6999)), [1]);
        assert_eq!(intent("refund", json!(0.95)), [0, 1, 2]);
        assert_eq!(intent("billing", json!(1)), [1, 2, 3]);
        assert_eq!(intent("billing", json!(0.99)), [1, 2]);
        assert_eq!(intent("other", json!(0.9)), [2]);
        assert_eq!(intent("other", json!(0.89)), Vec::<u32>::new());
        // Missing confidence counts as 0; a mistyped one matches nothing.
        assert_eq!(intent("refund", Value::Null), [1]);
        assert_eq!(intent("refund", json!("high")), Vec::<u32>::new());
        assert_eq!(
            matched(&idx, &event("intent.detected", json!({"confidence": 1}))),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn sentiment_labels_and_bounds() {
        let idx = index(vec![
            json!({"event": "sentiment.analyzed", "sentiment": {"labels": ["negative"], "score_below": -0.6}}),
            json!({"event": "sentiment.analyzed", "sentiment": {"labels": ["negative", "neutral"]}}),
            json!({"event": "sentiment.analyzed", "sentiment": {"score_above": 0.5}}),
            json!({"event": "sentiment.analyzed", "sentiment": {"score_above": -0.2, "score_below": 0.2}}),
            json!({"event": "sentiment.analyzed", "sentiment": {"labels": ["positive"], "score_above": 0.9}}),
            json!({"event": "sentiment.analyzed", "sentiment": {"score_below": -0.9}}),
        ]);
        let sentiment = |label: &str, score: Value| {
            matched(
                &idx,
                &event(
                    "sentiment.analyzed",
                    json!({"label": label, "score": score}),
                ),
            )
        };
        assert_eq!(sentiment("negative", json!(-0.7)), [0, 1]);
        assert_eq!(sentiment("negative", json!(-0.6)), [1]);
        assert_eq!(sentiment("negative", json!(-0.95)), [0, 1, 5]);
        assert_eq!(sentiment("neutral", json!(0)), [1, 3]);
        assert_eq!(sentiment("neutral", json!(0.2)), [1]);
        assert_eq!(sentiment("neutral", json!(-0.2)), [1]);
        assert_eq!(sentiment("positive", json!(0.5)), Vec::<u32>::new());
        assert_eq!(sentiment("positive", json!(0.6)), [2]);
        assert_eq!(sentiment("positive", json!(0.95)), [2, 4]);
        // Without a numeric score only label-only workflows can match.
        assert_eq!(sentiment("negative", json!("bad")), [1]);
        // Without a label only the label-free workflows can match.
        assert_eq!(
            matched(&idx, &event("sentiment.analyzed", json!({"score": -0.95}))),
            [5]
        );
    }

    #[test]
    fn image_labels_and_mime_types() {
        let idx = index(vec![
            json!({"event": "image.uploaded", "image": {"labels_any": ["receipt", "invoice"]}}),
            json!({"event": "image.uploaded", "image": {"mime_types": ["image/png"]}}),
            json!({"event": "image.uploaded", "image": {"labels_any": ["receipt"], "mime_types": ["image/png", "Image/JPEG"]}}),
        ]);
        let image = |labels: Value, mime: Value| {
            matched(
                &idx,
                &event(
                    "image.uploaded",
                    json!({"labels": labels, "mime_type": mime}),
                ),
            )
        };
        assert_eq!(
            image(json!(["cat", "receipt"]), json!("image/png")),
            [0, 1, 2]
        );
        assert_eq!(image(json!(["receipt"]), json!("image/jpeg")), [0, 2]);
        assert_eq!(image(json!(["receipt"]), json!("image/gif")), [0]);
        assert_eq!(image(json!(["invoice"]), json!("IMAGE/PNG")), [0, 1]);
        assert_eq!(image(json!(["cat"]), json!("image/png")), [1]);
        assert_eq!(image(json!("receipt"), json!("image/png")), [1]);
        assert_eq!(image(json!(["receipt", 5]), Value::Null), [0]);
        assert_eq!(image(json!([]), json!(7)), Vec::<u32>::new());
    }

    #[test]
    fn custom_and_unfiltered_types_match_by_type_and_conditions() {
        let idx = TriggerIndex::build(vec![
            workflow(0, json!({"event": "x.order.paid"}), json!([])),
            workflow(
                1,
                json!({"event": "x.order.paid"}),
                json!([{"path": "data.total", "op": "gte", "value": 100}]),
            ),
            workflow(2, json!({"event": "x.order.refunded"}), json!([])),
            workflow(
                3,
                json!({"event": "conversation.started"}),
                json!([{"path": "data.channel", "op": "eq", "value": "web"}]),
            ),
            workflow(4, json!({"event": "conversation.ended"}), json!([])),
        ]);
        assert_eq!(
            matched(&idx, &event("x.order.paid", json!({"total": 150}))),
            [0, 1]
        );
        assert_eq!(
            matched(&idx, &event("x.order.paid", json!({"total": 99.5}))),
            [0]
        );
        assert_eq!(matched(&idx, &event("x.order.refunded", json!({}))), [2]);
        assert_eq!(
            matched(&idx, &event("x.order.cancelled", json!({}))),
            Vec::<u32>::new()
        );
        assert_eq!(
            matched(
                &idx,
                &event("conversation.started", json!({"channel": "web"}))
            ),
            [3]
        );
        assert_eq!(
            matched(
                &idx,
                &event("conversation.started", json!({"channel": "sms"}))
            ),
            Vec::<u32>::new()
        );
        assert_eq!(matched(&idx, &event("conversation.ended", json!({}))), [4]);
        assert!(idx.has_candidates(&EventType::parse("x.order.paid")));
        assert!(idx.has_candidates(&EventType::ConversationEnded));
        assert!(!idx.has_candidates(&EventType::parse("x.order.cancelled")));
        assert!(!idx.has_candidates(&EventType::MessageReceived));
        assert!(!idx.has_candidates(&EventType::IntentDetected));
    }

    #[test]
    fn conditions_filter_the_candidates() {
        let idx = TriggerIndex::build(vec![
            workflow(
                0,
                json!({"event": "message.received", "keywords": {"any": ["cancel"]}}),
                json!([{"path": "data.language", "op": "eq", "value": "en"}]),
            ),
            workflow(
                1,
                json!({"event": "message.received", "keywords": {"any": ["cancel"]}}),
                json!([]),
            ),
        ]);
        let doc = |language: &str| {
            event(
                "message.received",
                json!({"text": "cancel", "language": language}),
            )
        };
        assert_eq!(matched(&idx, &doc("en")), [0, 1]);
        assert_eq!(matched(&idx, &doc("fr")), [1]);
    }

    #[test]
    fn disabled_workflows_are_skipped_and_indices_follow_input_order() {
        let mut disabled = (*workflow(0, json!({"event": "message.received"}), json!([]))).clone();
        disabled.spec.enabled = false;
        let idx = TriggerIndex::build(vec![
            Arc::new(disabled),
            workflow(1, json!({"event": "message.received"}), json!([])),
        ]);
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.workflows().len(), 1);
        assert_eq!(idx.workflow(0).id, Uuid::from_u128(1));
        assert_eq!(text(&idx, "hi"), [0]);

        let empty = TriggerIndex::empty();
        assert!(empty.is_empty());
        assert!(!empty.has_candidates(&EventType::MessageReceived));
        let mut out = vec![1, 2, 3];
        empty.match_event(
            &EventType::MessageReceived,
            &event("message.received", json!({})),
            &mut out,
        );
        assert!(out.is_empty());
    }

    /// 10,000 workflows of every kind in one index; the matches must be exactly the
    /// workflows chosen by construction, and agree with `explain` for all 10,000.
    #[test]
    fn ten_thousand_workflows() {
        let mut workflows = Vec::with_capacity(10_000);
        let labels = ["positive", "neutral", "negative"];
        for i in 0..10_000u32 {
            let n = i as u128;
            let wf = match i {
                // Keywords kw0..kw2499; every 7th one case-sensitive and spelled "KW<i>".
                0..2500 if i % 7 == 0 => workflow(
                    n,
                    json!({"event": "message.received",
                    "keywords": {"any": [format!("KW{i}")], "case_sensitive": true}}),
                    json!([]),
                ),
                0..2500 => workflow(
                    n,
                    json!({"event": "message.received",
                    "keywords": {"any": [format!("kw{i}"), format!("shared {}", i % 10)]}}),
                    json!([]),
                ),
                // Intents with distinct names and min_confidence (i % 10) / 10.
                2500..5000 => workflow(
                    n,
                    json!({"event": "intent.detected",
                    "intent": {"names": [format!("intent{i}")], "min_confidence": (i % 10) as f64 / 10.0}}),
                    json!([]),
                ),
                // Sentiment: a label each, upper bound -(i % 100) / 100.
                5000..6500 => workflow(
                    n,
                    json!({"event": "sentiment.analyzed",
                    "sentiment": {"labels": [labels[i as usize % 3]], "score_below": -((i % 100) as f64) / 100.0}}),
                    json!([]),
                ),
                // Images: a distinct label each, every other one also needs image/png.
                6500..8000 if i % 2 == 0 => workflow(
                    n,
                    json!({"event": "image.uploaded",
                    "image": {"labels_any": [format!("label{i}")], "mime_types": ["image/png"]}}),
                    json!([]),
                ),
                6500..8000 => workflow(
                    n,
                    json!({"event": "image.uploaded",
                    "image": {"labels_any": [format!("label{i}")]}}),
                    json!([]),
                ),
                // Custom types, 50 of them.
                8000..9000 => workflow(n, json!({"event": format!("x.t{}", i % 50)}), json!([])),
                // Unfiltered with a condition on the channel.
                _ => workflow(
                    n,
                    json!({"event": "conversation.started"}),
                    json!([{"path": "data.channel", "op": "eq", "value": format!("c{}", i % 100)}]),
                ),
            };
            workflows.push(wf);
        }
        let idx = TriggerIndex::build(workflows);
        assert_eq!(idx.len(), 10_000);

        // kw17 matches; kw14 and kw2499 are case-sensitive ("KW14") and written in
        // lower case here;
        // KW21 is written exactly; "kw1" must not match inside "kw1234"; "shared 3"
        // matches every non-case-sensitive keyword workflow with i % 10 == 3.
        let doc = event(
            "message.received",
            json!({"text": "kw17 kw14 KW21 kw1234x kw2498 kw2499 shared 3"}),
        );
        let mut expected: Vec<u32> = vec![17, 21, 2498];
        expected.extend((0..2500).filter(|i| i % 7 != 0 && i % 10 == 3));
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(matched(&idx, &doc), expected);

        let doc = event(
            "intent.detected",
            json!({"name": "intent3456", "confidence": 0.6}),
        );
        assert_eq!(matched(&idx, &doc), [3456]);
        let doc = event(
            "intent.detected",
            json!({"name": "intent3459", "confidence": 0.6}),
        );
        assert_eq!(matched(&idx, &doc), Vec::<u32>::new());

        // negative labels: i % 3 == 2; score -0.955 is below -(i % 100)/100 for i % 100 <= 95.
        let doc = event(
            "sentiment.analyzed",
            json!({"label": "negative", "score": -0.955}),
        );
        let expected: Vec<u32> = (5000..6500)
            .filter(|i| i % 3 == 2 && i % 100 <= 95)
            .collect();
        assert_eq!(matched(&idx, &doc), expected);

        let doc = event(
            "image.uploaded",
            json!({"labels": ["label7000", "label7001", "label42"], "mime_type": "image/jpeg"}),
        );
        assert_eq!(matched(&idx, &doc), [7001]);
        let doc = event(
            "image.uploaded",
            json!({"labels": ["label7000", "label7001"], "mime_type": "image/png"}),
        );
        assert_eq!(matched(&idx, &doc), [7000, 7001]);

        let doc = event("x.t7", json!({}));
        let expected: Vec<u32> = (8000..9000).filter(|i| i % 50 == 7).collect();
        assert_eq!(matched(&idx, &doc), expected);

        let doc = event("conversation.started", json!({"channel": "c42"}));
        assert_eq!(
            matched(&idx, &doc),
            (9000..10_000)
                .filter(|i| i % 100 == 42)
                .collect::<Vec<u32>>()
        );
    }
}
