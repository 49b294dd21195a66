//! Workflows: the model users write, its validation, templates and conditions.
