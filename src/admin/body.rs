//! JSON object bodies: `Object<T>` reads the body as actix-web's `Json` does (same size
//! limit, content type and errors), then insists on a JSON object before building `T`.
//! serde's derived structs also accept a JSON array of their fields in order, so
//! `[true]` would pass as `{"enabled": true}`; the API documents objects and answers
//! anything else with 400.

use super::error::ApiError;
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use futures::future::LocalBoxFuture;
use serde::de::DeserializeOwned;

pub struct Object<T>(pub T);

impl<T> Object<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Object<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for Object<T> {
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let json = web::Json::<serde_json::Value>::from_request(req, payload);
        Box::pin(async move {
            let value = json.await?.into_inner();
            if !value.is_object() {
                return Err(ApiError::bad_request("the JSON body must be an object").into());
            }
            serde_json::from_value(value).map(Object).map_err(|e| invalid_body(&e.to_string()).into())
        })
    }
}

/// A body that is JSON but not of the documented shape: 400, naming the unknown or
/// missing field when serde says which.
pub fn invalid_body(message: &str) -> ApiError {
    let field = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field") || message.starts_with("missing field"));
    let e = ApiError::bad_request(format!("the JSON body is not valid: {message}"));
    match field {
        Some(f) => e.field(f),
        None => e,
    }
}
