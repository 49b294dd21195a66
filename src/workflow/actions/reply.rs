//! `reply`: a message sent into the conversation by the chat service (a `reply`
//! command through the outbox; the step ends when a client acks it).

use super::{Effects, Scope, StepError, StepField, StepInput, StepOutcome};
use crate::wire::CommandKind;
use crate::workflow::error::ValidationError;
use crate::workflow::template::Template;
use serde::{Deserialize, Serialize};

pub const MAX_CHARS: usize = 4096;

// The fields of a `reply` step (documented through `Step`'s schema).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub id: String,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Compiled {
    pub text: Template,
}

impl Spec {
    pub(crate) fn compile(&self, at: &StepField, scope: &Scope<'_>) -> Result<Compiled, ValidationError> {
        let field = at.at("text");
        if self.text.chars().count() > MAX_CHARS && !self.text.trim().is_empty() {
            return Err(ValidationError::new(field, format!("must be at most {MAX_CHARS} characters")));
        }
        Ok(Compiled { text: scope.required_template(&field, &self.text)? })
    }
}

impl Compiled {
    pub(crate) async fn run<E: Effects>(&self, input: &StepInput<'_>, fx: &E) -> Result<StepOutcome, StepError> {
        let payload = serde_json::json!({ "text": self.text.render_string(&input.templates)? });
        fx.send_command(CommandKind::Reply, payload).await.map(StepOutcome::Output)
    }
}
