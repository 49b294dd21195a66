//! The actions a step can take, one file each: its spec (the fields users write), its
//! validation and compiled form, and its effect, written against [`Effects`] (call a
//! webhook, send a command to the chat service, notify the operators), which the
//! executor implements. Nothing here touches the world: no actors, no database, no
//! network.
//!
//! `actions!` below is the one table of actions: it declares [`Step`] (the serde
//! model, tagged by `action`), [`CompiledAction`], the list of names, and every
//! dispatch from an action's name to its file. A new action is a new file and one line
//! in that table.

use super::error::ValidationError;
use super::template::{Reference, Template, TemplateContext, TemplateError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

macro_rules! actions {
    ($($name:literal => $module:ident :: $Variant:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// One step of a workflow, tagged by `action`.
        #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
        #[serde(tag = "action")]
        pub enum Step {
            $(#[serde(rename = $name)] $Variant($module::Spec),)*
        }

        // Documented as users write it: one object per action, its own fields and
        // `action` side by side (a derived schema would nest each spec by reference).
        impl utoipa::PartialSchema for Step {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::OneOfBuilder::new()
                    $(.item(tagged::<$module::Spec>($name)))*
                    .description(Some("One step of a workflow, tagged by `action`."))
                    .into()
            }
        }

        impl Step {
            /// Every value `action` may take, in documentation order.
            pub const ACTIONS: &'static [&'static str] = &[$($name),*];

            pub fn id(&self) -> &str {
                match self { $(Step::$Variant(s) => &s.id,)* }
            }

            pub fn action(&self) -> &'static str {
                match self { $(Step::$Variant(_) => $name,)* }
            }

            /// Validates the step and compiles what it runs.
            pub(crate) fn compile(&self, at: &StepField, scope: &Scope<'_>) -> Result<CompiledAction, ValidationError> {
                match self { $(Step::$Variant(s) => s.compile(at, scope).map(CompiledAction::$Variant),)* }
            }
        }

        /// A step's action ready to run: templates parsed, durations read, defaults applied.
        #[derive(Debug, Clone)]
        pub enum CompiledAction {
            $($Variant($module::Compiled),)*
        }

        impl CompiledAction {
            /// The `action` name as written in the workflow.
            pub fn name(&self) -> &'static str {
                match self { $(CompiledAction::$Variant(_) => $name,)* }
            }

            /// Runs the action: renders its templates from `input` and acts through `fx`.
            pub async fn run<E: Effects>(&self, input: &StepInput<'_>, fx: &E) -> Result<StepOutcome, StepError> {
                match self { $(CompiledAction::$Variant(c) => c.run(input, fx).await,)* }
            }
        }

        /// For a step that does not deserialise: reads its fields again as that action's
        /// spec alone, so the error names the field inside the step (serde's internally
        /// tagged enums hide it). `None` for an unknown action or no error.
        pub(crate) fn locate_error(action: &str, fields: &Value) -> Option<(String, String)> {
            match action {
                $($name => super::fields::variant_error::<$module::Spec>(fields),)*
                _ => None,
            }
        }
    };
}

actions! {
    "webhook" => webhook::Webhook,
    "reply" => reply::Reply,
    "tag" => tag::Tag,
    "handoff" => handoff::Handoff,
    "delay" => delay::Delay,
    "notify" => notify::Notify,
}

impl utoipa::ToSchema for Step {}

/// An action's spec as a schema, with its `action` tag among its properties.
fn tagged<T: utoipa::PartialSchema>(name: &str) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
    use utoipa::openapi::RefOr;
    let mut schema = T::schema();
    if let RefOr::T(Schema::Object(object)) = &mut schema {
        // The tag is a property of the same object: unknown fields are refused by
        // the spec's deserialiser, and the document leaves them open as before.
        object.additional_properties = None;
        let tag = ObjectBuilder::new().schema_type(Type::String).enum_values(Some([name])).build();
        object.properties.insert("action".to_string(), tag.into());
        object.required.push("action".to_string());
    }
    schema
}

/// A step ready to run.
#[derive(Debug, Clone)]
pub struct CompiledStep {
    pub id: String,
    pub action: CompiledAction,
}

/// What a step's templates are rendered from, and when it started.
pub struct StepInput<'a> {
    pub templates: TemplateContext<'a>,
    pub started_at: DateTime<Utc>,
}

/// How a step that did not fail ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// Its output, for later steps (`{{steps.<id>.…}}`).
    Output(Value),
    /// A `delay`: the execution goes on at this time.
    Delay(DateTime<Utc>),
}

/// A webhook request, rendered: the executor signs it and adds the headers that name
/// the execution (idempotency key, attempt, lease epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookCall {
    pub url: String,
    pub body: Value,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

/// What actions do to the world, implemented by the executor. Each answers the step's
/// output, or a `StepError`.
pub trait Effects {
    /// POSTs a webhook and answers `{"status": …, "response": …}`.
    fn call_webhook(&self, call: WebhookCall) -> impl Future<Output = Result<Value, StepError>>;
    /// Sends a command into the conversation and answers once a client acked it.
    fn send_command(&self, kind: crate::wire::CommandKind, payload: Value) -> impl Future<Output = Result<Value, StepError>>;
    /// Tells the operators.
    fn notify(&self, message: String) -> impl Future<Output = Result<Value, StepError>>;
}

/// A failed step: the message recorded in `execution_steps.error`, and any output
/// worth keeping (a webhook's error response, say).
#[derive(Debug, Clone)]
pub struct StepError {
    pub message: String,
    pub output: Option<Value>,
    /// Worth retrying (5xx, timeouts, connection errors) or not (4xx, bad templates).
    pub retryable: bool,
    /// The receiver asked for this wait before the next attempt (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl StepError {
    pub fn new(message: impl Into<String>) -> StepError {
        StepError { message: message.into(), output: None, retryable: false, retry_after: None }
    }

    pub fn retryable(message: impl Into<String>) -> StepError {
        StepError { message: message.into(), output: None, retryable: true, retry_after: None }
    }
}

impl From<TemplateError> for StepError {
    fn from(e: TemplateError) -> StepError {
        StepError::new(e.to_string())
    }
}

/// Where a step sits in its workflow, for naming its fields in errors.
pub(crate) struct StepField(pub usize);

impl StepField {
    /// `steps[i].<name>`.
    pub fn at(&self, name: &str) -> String {
        format!("steps[{}].{name}", self.0)
    }

    /// `steps[i]`.
    pub fn whole(&self) -> String {
        format!("steps[{}]", self.0)
    }
}

/// Step ids a template may refer to, and every id (to tell "later" from "unknown").
pub(crate) struct Scope<'a> {
    pub earlier: &'a HashSet<&'a str>,
    pub all: &'a HashSet<&'a str>,
}

impl Scope<'_> {
    pub fn check_references(&self, field: &str, template: &Template) -> Result<(), ValidationError> {
        for reference in template.references() {
            if let Reference::Step { id, .. } = reference {
                if self.earlier.contains(id.as_str()) {
                    continue;
                }
                let message = if self.all.contains(id.as_str()) {
                    format!("template refers to step \"{id}\" which does not run before this step")
                } else {
                    format!("template refers to unknown step \"{id}\"")
                };
                return Err(ValidationError::new(field, message));
            }
        }
        Ok(())
    }

    /// Parses a template field and checks what it refers to.
    pub fn template(&self, field: &str, text: &str) -> Result<Template, ValidationError> {
        let template = Template::parse(text).map_err(|e| ValidationError::new(field, format!("invalid template: {e}")))?;
        self.check_references(field, &template)?;
        Ok(template)
    }

    /// A template field that must hold more than blanks.
    pub fn required_template(&self, field: &str, text: &str) -> Result<Template, ValidationError> {
        if text.trim().is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        self.template(field, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_is_tagged_with_its_name_in_the_table() {
        let cases = [
            json!({"id": "a", "action": "webhook", "url": "https://x.example/"}),
            json!({"id": "a", "action": "reply", "text": "t"}),
            json!({"id": "a", "action": "tag", "tags": ["t"]}),
            json!({"id": "a", "action": "handoff", "queue": "q"}),
            json!({"id": "a", "action": "delay", "duration": "1s"}),
            json!({"id": "a", "action": "notify", "message": "m"}),
        ];
        assert_eq!(cases.len(), Step::ACTIONS.len());
        for (doc, name) in cases.iter().zip(Step::ACTIONS) {
            let step: Step = serde_json::from_value(doc.clone()).unwrap();
            assert_eq!(step.action(), *name);
            assert_eq!(serde_json::to_value(&step).unwrap(), *doc, "round trip of {name}");
        }
    }

    use serde_json::json;
}
