//! Workflows: the model users write, its validation, templates and conditions, and
//! the compiled form the chatbot supervisor and executors run.
//!
//! `model` parses and holds what users send; `validate` decides what is acceptable and
//! names the field when it is not; `compiled` keeps everything parsed once (templates,
//! regexes, durations) so matching and running an event does no parsing.

pub mod compiled;
pub mod condition;
pub mod duration;
pub mod model;
pub mod template;
pub mod validate;

pub use compiled::{
    CompiledAction, CompiledStep, CompiledWorkflow, DelaySpec, DEFAULT_WEBHOOK_TIMEOUT,
};
pub use condition::CompiledCondition;
pub use duration::parse_duration;
pub use model::{
    parse_workflows, Condition, ConditionOp, ImageFilter, IntentFilter, KeywordFilter, RetryPolicy,
    SentimentFilter, Step, Trigger, WorkflowSpec,
};
pub use template::{
    lookup, FieldPath, JsonTemplate, JsonTemplateError, PathSegment, Reference, Template,
    TemplateContext, TemplateError,
};
pub use validate::{validate, ValidationError};
pub mod actions;
