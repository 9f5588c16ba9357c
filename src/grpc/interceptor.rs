//! Service-client authentication for our three gRPC services: every call carries
//! `authorization: Bearer <service token>`; the verified `Caller` goes into the
//! request extensions, and the service each method calls decides what that
//! caller may do (VerifyApiKey, whose use case takes no caller, still names its
//! scope here with `require_scope`).

use tonic::service::Interceptor;
use tonic::{Request, Status};

use std::sync::Arc;

use crate::service::service_clients::ServiceClients;
use crate::service::Caller;

/// Refuses a call without a valid service token (UNAUTHENTICATED). Repeat tokens
/// are served from an in-process cache, so the cost per call is a hash.
#[derive(Clone)]
pub struct ServiceAuth(pub Arc<ServiceClients>);

impl Interceptor for ServiceAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .ok_or_else(|| Status::unauthenticated("missing service token"))?;
        let caller = self
            .0
            .verify_token(token)
            .map_err(|_| Status::unauthenticated("invalid service token"))?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The service client behind this call, if it holds `scope`: UNAUTHENTICATED
/// without a verified token, PERMISSION_DENIED without the scope.
pub fn require_scope<'r, T>(req: &'r Request<T>, scope: &str) -> Result<&'r Caller, Status> {
    let caller = req
        .extensions()
        .get::<Caller>()
        .ok_or_else(|| Status::unauthenticated("missing service token"))?;
    match caller {
        Caller::ServiceClient { scopes, .. } if scopes.iter().any(|s| s == scope) => Ok(caller),
        _ => Err(Status::permission_denied(format!("scope {scope} required"))),
    }
}
