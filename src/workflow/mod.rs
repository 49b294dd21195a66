//! Workflows: the model users write, its validation, templates and conditions, and
//! the compiled form the chatbot supervisor and executors run.
//!
//! One direction: `model` holds what users send (plain serde data; each step's fields
//! are its action's, in `actions`, one file per action with its validation, compiled
//! form and effect); `validate` decides what is acceptable, names the field when it is
//! not (`error`), and parses templates, conditions and durations on the way; `parse` turns bytes
//! into validated models; `compiled` assembles a validated workflow ready to match and
//! run, so matching and running an event does no parsing. No actors, no database, no
//! network here: an action's effect goes through `actions::Effects`, which the executor
//! implements beside the code that calls out (`chatbot::actions`).

pub mod actions;
pub mod compiled;
pub mod condition;
pub mod duration;
pub mod error;
pub mod fields;
pub mod model;
pub mod parse;
pub mod template;
pub mod validate;

pub use compiled::CompiledWorkflow;
pub use condition::CompiledCondition;
pub use duration::parse_duration;
pub use error::ValidationError;
pub use model::{
    Condition, ConditionOp, ImageFilter, IntentFilter, KeywordFilter, RetryPolicy, SentimentFilter, Step, Trigger,
    WorkflowSpec,
};
pub use parse::{parse_one, parse_workflows};
pub use actions::{CompiledAction, CompiledStep, Effects, StepError, StepInput, StepOutcome, WebhookCall};
pub use template::{
    lookup, FieldPath, JsonTemplate, JsonTemplateError, PathSegment, Reference, Template,
    TemplateContext, TemplateError,
};
pub use validate::validate;
