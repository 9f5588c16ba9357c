//! ServiceError → tonic::Status, exhaustive so a new variant breaks the build here.

use tonic::{Code, Status};

use crate::service::ServiceError;

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Validation(errors) => Status::invalid_argument(
                errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            ServiceError::InvalidCredentials => Status::unauthenticated("invalid credentials"),
            ServiceError::InvalidToken => Status::unauthenticated("missing or invalid token"),
            ServiceError::InvalidClient => Status::unauthenticated("invalid client credentials"),
            ServiceError::SecondFactorRefused => {
                Status::unauthenticated("invalid or expired second factor")
            }
            e @ ServiceError::StepUp(_) => Status::permission_denied(e.to_string()),
            ServiceError::Forbidden(detail) => Status::permission_denied(detail),
            ServiceError::EmailUnverified => {
                Status::permission_denied("verify your email address first")
            }
            ServiceError::NotFound(what) => Status::not_found(format!("{what} not found")),
            ServiceError::Conflict(detail)
            | ServiceError::Taken {
                message: detail, ..
            } => Status::already_exists(detail),
            ServiceError::RateLimited { .. } => {
                Status::new(Code::ResourceExhausted, "too many requests")
            }
            ServiceError::Unavailable(cause) => {
                tracing::warn!(%cause, "dependency unavailable");
                Status::unavailable("a dependency is unavailable, retry later")
            }
            ServiceError::Integrity(what) => {
                tracing::error!(what, "integrity check failed");
                Status::data_loss(format!("{what} failed an integrity check"))
            }
            ServiceError::Internal(err) => {
                tracing::error!(error = format!("{err:#}"), "internal error");
                Status::internal("internal error")
            }
        }
    }
}
