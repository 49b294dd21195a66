//! What steps do to the world, beside the executor that runs them: `webhook` (the
//! signed HTTP POST), `command` (reply, tag and handoff to the chat service through the
//! journal and the outbox) and `notify` (the operator channel). The actions themselves
//! (`workflow::actions`) render their inputs and reach these through the executor's
//! `Effects`; each answers the step's output as JSON, or a `StepError`.

pub mod command;
pub mod notify;
pub mod webhook;

pub use crate::workflow::StepError;
