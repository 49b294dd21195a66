//! `tag`: tags for the conversation, set by the chat service (a `tag` command through
//! the outbox; the step ends when a client acks it).

use super::{Effects, Scope, StepError, StepField, StepInput, StepOutcome};
use crate::wire::CommandKind;
use crate::workflow::error::ValidationError;
use crate::workflow::template::Template;
use serde::{Deserialize, Serialize};

pub const MAX_TAGS: usize = 20;

// The fields of a `tag` step (documented through `Step`'s schema).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub id: String,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Compiled {
    pub tags: Vec<Template>,
}

impl Spec {
    pub(crate) fn compile(&self, at: &StepField, scope: &Scope<'_>) -> Result<Compiled, ValidationError> {
        if self.tags.is_empty() {
            return Err(ValidationError::new(at.at("tags"), "must have at least one tag"));
        }
        if self.tags.len() > MAX_TAGS {
            return Err(ValidationError::new(at.at("tags"), format!("must have at most {MAX_TAGS} tags")));
        }
        let mut tags = Vec::with_capacity(self.tags.len());
        for (j, tag) in self.tags.iter().enumerate() {
            let field = at.at(&format!("tags[{j}]"));
            if tag.trim().is_empty() {
                return Err(ValidationError::new(field, "must not be blank"));
            }
            tags.push(scope.template(&field, tag)?);
        }
        Ok(Compiled { tags })
    }
}

impl Compiled {
    pub(crate) async fn run<E: Effects>(&self, input: &StepInput<'_>, fx: &E) -> Result<StepOutcome, StepError> {
        let tags = self.tags.iter().map(|t| t.render_string(&input.templates)).collect::<Result<Vec<_>, _>>()?;
        fx.send_command(CommandKind::Tag, serde_json::json!({ "tags": tags })).await.map(StepOutcome::Output)
    }
}
