//! `notify`: a message for the operators, always logged, and sent to
//! `notify.webhook_url` when one is configured.

use super::{Effects, Scope, StepError, StepField, StepInput, StepOutcome};
use crate::workflow::error::ValidationError;
use crate::workflow::template::Template;
use serde::{Deserialize, Serialize};

// The fields of a `notify` step (documented through `Step`'s schema).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub id: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Compiled {
    pub message: Template,
}

impl Spec {
    pub(crate) fn compile(&self, at: &StepField, scope: &Scope<'_>) -> Result<Compiled, ValidationError> {
        Ok(Compiled { message: scope.required_template(&at.at("message"), &self.message)? })
    }
}

impl Compiled {
    pub(crate) async fn run<E: Effects>(&self, input: &StepInput<'_>, fx: &E) -> Result<StepOutcome, StepError> {
        let message = self.message.render_string(&input.templates)?;
        fx.notify(message).await.map(StepOutcome::Output)
    }
}
