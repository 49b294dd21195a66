//! `handoff`: the conversation goes to a queue of human agents (a `handoff` command
//! through the outbox; the step ends when a client acks it).

use super::{Effects, Scope, StepError, StepField, StepInput, StepOutcome};
use crate::wire::CommandKind;
use crate::workflow::error::ValidationError;
use crate::workflow::template::Template;
use serde::{Deserialize, Serialize};

// The fields of a `handoff` step (documented through `Step`'s schema).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub id: String,
    pub queue: String,
}

#[derive(Debug, Clone)]
pub struct Compiled {
    pub queue: Template,
}

impl Spec {
    pub(crate) fn compile(&self, at: &StepField, scope: &Scope<'_>) -> Result<Compiled, ValidationError> {
        Ok(Compiled { queue: scope.required_template(&at.at("queue"), &self.queue)? })
    }
}

impl Compiled {
    pub(crate) async fn run<E: Effects>(&self, input: &StepInput<'_>, fx: &E) -> Result<StepOutcome, StepError> {
        let payload = serde_json::json!({ "queue": self.queue.render_string(&input.templates)? });
        fx.send_command(CommandKind::Handoff, payload).await.map(StepOutcome::Output)
    }
}
