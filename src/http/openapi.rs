//! The gateway's OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! annotations, and `GET /openapi.json` serving it.

use std::sync::LazyLock;

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterIn, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, Response as DocResponse, Type};
use utoipa::{Modify, OpenApi};

use super::problem::Problem;
use super::{
    accounts, admin_audit, api_keys, auth_api, health, invitations, metrics, mfa, passkeys,
    recovery, users,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "user-service JSON gateway",
        description = "Users, sessions, API keys and trading accounts of StocksBlitz. \
            Errors are RFC 9457 `application/problem+json` with a stable `code`."
    ),
    paths(
        health::health,
        health::live,
        auth_api::register,
        auth_api::login,
        auth_api::refresh,
        auth_api::logout,
        auth_api::token,
        auth_api::jwks,
        recovery::verify_email,
        recovery::request_password_reset,
        recovery::confirm_password_reset,
        users::me,
        users::update_me,
        users::change_password,
        users::list_sessions,
        users::end_session,
        users::admin_list_users,
        users::admin_update_user,
        recovery::change_email,
        recovery::resend_verification,
        recovery::admin_password_reset,
        accounts::create,
        accounts::list,
        accounts::my_accounts,
        accounts::show,
        accounts::update,
        accounts::remove,
        accounts::set_credentials,
        accounts::credentials_status,
        accounts::list_members,
        invitations::invite,
        invitations::pending,
        invitations::revoke,
        invitations::received,
        invitations::accept,
        invitations::decline,
        accounts::change_member,
        accounts::remove_member,
        admin_audit::list,
        api_keys::create,
        api_keys::list,
        api_keys::show,
        api_keys::revoke,
        api_keys::rotate,
        api_keys::usage,
        mfa::status,
        mfa::start_totp,
        mfa::confirm_totp,
        mfa::remove_totp,
        mfa::recovery_codes,
        mfa::second_step,
        mfa::step_up,
        mfa::admin_remove,
        passkeys::list,
        passkeys::register_start,
        passkeys::register_finish,
        passkeys::remove,
        passkeys::login_start,
        passkeys::login_finish,
        passkeys::mfa_start,
        passkeys::step_up_start,
        metrics::metrics,
        openapi_json,
    ),
    components(schemas(Problem)),
    modifiers(&Conventions),
    tags(
        (name = "health", description = "Probes"),
        (name = "auth", description = "Login, tokens, sign-up"),
        (name = "users", description = "The caller's profile and sessions"),
        (name = "mfa", description = "The caller's second factors (TOTP, recovery codes)"),
        (name = "accounts", description = "Trading accounts, members and broker credentials"),
        (name = "admin", description = "Admin only"),
        (name = "api_keys", description = "The caller's API keys (managed with a session, not with a key)"),
        (name = "ops", description = "Operations"),
        (name = "meta", description = "This document"),
    )
)]
pub struct ApiDoc;

/// Built once: the document is a pure function of the code.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        .expect("the OpenAPI document serializes")
});

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)),
)]
pub async fn openapi_json() -> Response {
    let mut res = DOCUMENT.as_str().into_response();
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    res
}

/// Security schemes, and the problem+json answers every operation can give, added
/// in one place so no handler's annotation can forget them (explicit ones win).
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        // utoipa copies Cargo.toml's license, which is unset: an empty name is noise.
        if doc.info.license.as_ref().is_some_and(|l| l.name.is_empty()) {
            doc.info.license = None;
        }
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("Access token from /v1/auth/login or /v1/auth/refresh"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "An API key from POST /v1/api-keys",
            ))),
        );
        components.add_security_scheme(
            "session_cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "sb_session",
                "The browser session set at login (`__Host-sb_session` when Secure)",
            ))),
        );

        unique_operation_ids(doc);
        for (path, item) in doc.paths.paths.iter_mut() {
            for op in operations_mut(item) {
                add_common_errors(path, op);
            }
        }
    }
}

/// utoipa names an operation after its handler, and several modules have a `list`
/// or `create`; OpenAPI requires unique ids, so a shared name gets its tag as prefix
/// (`accounts_create`, `api_keys_create`).
fn unique_operation_ids(doc: &mut utoipa::openapi::OpenApi) {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for op in doc.paths.paths.values().flat_map(operations) {
        if let Some(id) = &op.operation_id {
            *seen.entry(id.clone()).or_default() += 1;
        }
    }
    for item in doc.paths.paths.values_mut() {
        for op in operations_mut(item) {
            let tag = op.tags.as_ref().and_then(|t| t.first()).cloned();
            if let (Some(id), Some(tag)) = (&mut op.operation_id, tag) {
                if seen.get(id.as_str()).is_some_and(|n| *n > 1) {
                    *id = format!("{tag}_{id}");
                }
            }
        }
    }
}

fn operations(item: &PathItem) -> impl Iterator<Item = &Operation> {
    [&item.get, &item.put, &item.post, &item.delete, &item.patch]
        .into_iter()
        .flatten()
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .flatten()
}

fn add_common_errors(path: &str, op: &mut Operation) {
    let params = op.parameters.as_deref().unwrap_or_default();
    let has_query = params
        .iter()
        .any(|p| matches!(p.parameter_in, ParameterIn::Query));
    let has_path = params
        .iter()
        .any(|p| matches!(p.parameter_in, ParameterIn::Path));
    let has_body = op.request_body.is_some();
    let secured = op.security.as_ref().is_some_and(|reqs| {
        reqs.iter().any(|r| {
            serde_json::to_value(r).is_ok_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
        })
    });
    let api = path.starts_with("/v1/");

    // Every error answers problem+json, so an error a handler lists with only a
    // description gets the Problem body here.
    for (status, response) in op.responses.responses.iter_mut() {
        if let RefOr::T(r) = response {
            if (status.starts_with('4') || status.starts_with('5')) && r.content.is_empty() {
                r.content = problem(&r.description).content;
            }
        }
    }

    let mut add = |status: &str, response: DocResponse| {
        op.responses
            .responses
            .entry(status.to_string())
            .or_insert(RefOr::T(response));
    };
    if has_body || has_query {
        add(
            "400",
            problem("Invalid input (`validation_failed`, with `errors[]`)"),
        );
    }
    if secured {
        let mut r = problem("Missing, invalid or expired credentials (`invalid_token`)");
        r.headers.insert(
            "WWW-Authenticate".into(),
            HeaderBuilder::new()
                .schema(string())
                .description(Some("`Bearer error=\"invalid_token\"`"))
                .build(),
        );
        add("401", r);
    }
    if has_path {
        add(
            "404",
            problem("No such resource, or not the caller's (`not_found`)"),
        );
    }
    if has_body {
        add("413", problem("Body over 1 MiB (`payload_too_large`)"));
        add(
            "415",
            problem("Body is not `application/json` (`unsupported_media_type`)"),
        );
    }
    if api {
        let mut r = problem("Too many requests (`rate_limited`)");
        r.headers.insert(
            "Retry-After".into(),
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::Integer))
                .description(Some("Seconds to wait"))
                .build(),
        );
        add("429", r);
        add(
            "503",
            problem("A dependency is unavailable (`unavailable`)"),
        );
    }
    add("500", problem("Internal error (`internal`, no detail)"));
}

fn problem(description: &str) -> DocResponse {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}
