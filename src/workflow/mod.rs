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

/// Actions this version of botflow can run. `delay` needs the durable timer of the
/// scheduler; until it exists such a workflow is refused when saved rather than
/// failing every execution at run time.
pub fn check_supported(spec: &WorkflowSpec) -> Result<(), ValidationError> {
    for (i, step) in spec.steps.iter().enumerate() {
        if let Step::Delay { .. } = step {
            return Err(ValidationError::new(
                format!("steps[{i}].action"),
                "delay steps are not supported by this version of botflow yet",
            ));
        }
    }
    Ok(())
}
