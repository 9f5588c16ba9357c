//! RFC 9457 problem+json: every gateway error, with a stable machine `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::service::ServiceError;

/// An RFC 9457 problem: `code` is stable for machines; `errors` lists field failures
/// when `code` is `validation_failed`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    #[schema(
        format = "uri",
        example = "https://docs.stocksblitz.com/problems/not-found"
    )]
    pub type_: String,
    #[schema(example = "Not Found")]
    pub title: &'static str,
    #[schema(example = 404)]
    pub status: u16,
    pub detail: String,
    #[schema(example = "not_found")]
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

/// One field-level validation failure.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The request field (or `body` / `query`) that failed.
    #[schema(example = "password")]
    pub field: String,
    /// Machine code of the failure, e.g. `invalid`, `too_weak`, `required`.
    #[schema(example = "invalid")]
    pub code: &'static str,
    pub message: String,
}

impl From<crate::service::FieldError> for FieldError {
    fn from(e: crate::service::FieldError) -> Self {
        Self {
            field: e.field,
            code: e.code,
            message: e.message,
        }
    }
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            type_: format!(
                "https://docs.stocksblitz.com/problems/{}",
                code.replace('_', "-")
            ),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: detail.into(),
            code,
            errors: None,
            retry_after: None,
        }
    }

    pub fn validation(errors: Vec<crate::service::FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            errors: Some(errors.into_iter().map(FieldError::from).collect()),
            ..Self::new(StatusCode::BAD_REQUEST, "validation_failed", detail)
        }
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after;
        let code = self.code;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = (status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED && code == "invalid_token" {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        if let Some(secs) = retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                h.insert(header::RETRY_AFTER, v);
            }
        }
        res
    }
}

/// Exhaustive on purpose: a new ServiceError variant must be mapped here.
impl From<ServiceError> for Problem {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Validation(errors) => Problem::validation(errors),
            ServiceError::InvalidCredentials => Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "invalid email or password",
            ),
            ServiceError::InvalidToken => Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "missing, invalid or expired credentials",
            ),
            ServiceError::InvalidClient => Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "invalid client credentials",
            ),
            ServiceError::SecondFactorRefused => Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "invalid or expired second factor",
            ),
            ServiceError::StepUp(r) => {
                let code = match r {
                    crate::domain::mfa::StepUpRefusal::MfaRequired => "mfa_required",
                    crate::domain::mfa::StepUpRefusal::EnrollmentRequired => {
                        "mfa_enrollment_required"
                    }
                };
                Problem::new(
                    StatusCode::FORBIDDEN,
                    code,
                    ServiceError::StepUp(r).to_string(),
                )
            }
            ServiceError::Forbidden(detail) => {
                Problem::new(StatusCode::FORBIDDEN, "forbidden", detail)
            }
            ServiceError::EmailUnverified => Problem::new(
                StatusCode::FORBIDDEN,
                "email_unverified",
                "verify your email address first (POST /v1/users/me/email/verification resends the link)",
            ),
            ServiceError::NotFound(what) => Problem::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            ServiceError::Conflict(detail) => {
                Problem::new(StatusCode::CONFLICT, "conflict", detail)
            }
            ServiceError::Taken { field, message } => Problem {
                errors: Some(vec![FieldError {
                    field: field.into(),
                    code: "taken",
                    message: message.clone(),
                }]),
                ..Problem::new(StatusCode::CONFLICT, "conflict", message)
            },
            ServiceError::RateLimited { retry_after_secs } => Problem {
                retry_after: Some(retry_after_secs),
                ..Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many requests, retry later",
                )
            },
            ServiceError::Unavailable(cause) => {
                tracing::warn!(%cause, "dependency unavailable");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "a dependency is unavailable, retry later",
                )
            }
            ServiceError::Integrity(what) => {
                tracing::error!(what, "integrity check failed");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("{what} failed an integrity check"),
                )
            }
            ServiceError::Internal(err) => {
                // The full chain goes to the log (and Sentry); the client learns nothing.
                tracing::error!(error = format!("{err:#}"), "internal error");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}
