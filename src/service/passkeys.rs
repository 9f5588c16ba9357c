//! Passkeys (WebAuthn via webauthn-rs, DESIGN §8): registration, listing and
//! removal by the signed-in user, passwordless login with discoverable
//! credentials, and a passkey as the second step of a password login.
//!
//! Ceremony state lives in PostgreSQL (`store::passkeys`), so a ceremony started
//! on one replica finishes on any other, and each challenge is consumed by the
//! first finish that names it, valid or not. A signature counter that does not
//! grow (a cloned authenticator) is refused and audited.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;
use webauthn_rs::prelude::{
    DiscoverableAuthentication, DiscoverableKey, Passkey, PasskeyAuthentication,
    PasskeyRegistration, PublicKeyCredential, RegisterPublicKeyCredential, Url, Webauthn,
    WebauthnBuilder, WebauthnError,
};

use super::sessions::LoginTokens;
use super::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::config::Settings;
use crate::domain::audit::{AuditEntry, Outcome};
use crate::domain::passkey::{
    Ceremony, PasskeyName, PasskeySummary, AMR_PASSWORDLESS, CHALLENGE_TTL_SECONDS, MAX_PER_USER,
};
use crate::store::passkeys::{self as store, NewPasskey, StoredPasskey};
use crate::store::{users, Db, Tx};

/// Factors are never managed with an API key: the refusal says so.
const MANAGED_WITH: &str = "passkeys are managed with";

/// The relying party's name, shown by authenticators next to the account.
const RP_NAME: &str = "StocksBlitz";

/// A started ceremony: the id to finish it with, and the `publicKey` options
/// for `navigator.credentials.create()` / `.get()`.
#[derive(Debug)]
pub struct Challenge {
    pub id: Uuid,
    pub options: Value,
}

/// A passkey assertion that verified, as the second step of a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedPasskey {
    pub user_id: Uuid,
    pub passkey_id: Uuid,
}

#[derive(Clone)]
pub struct PasskeyService {
    db: Db,
    /// Opens the session of a passwordless login, as a password login does.
    sessions: std::sync::Arc<super::sessions::Sessions>,
    /// The per-IP login throttle, shared with password logins.
    throttle: std::sync::Arc<super::throttle::Throttle>,
    login_ip_max_per_minute: u32,
    webauthn: std::sync::Arc<Webauthn>,
    /// Removing a passkey is a step-up operation (DESIGN §8).
    step_up: Option<super::mfa::StepUp>,
}

/// The `webauthn` method's two fields, both required.
fn assertion(
    challenge_id: Option<String>,
    credential: Option<Value>,
) -> ServiceResult<(Uuid, Value)> {
    let challenge = challenge_id
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            ServiceError::validation(
                "challenge_id",
                "required",
                "challenge_id is required for webauthn",
            )
        })?
        .parse()
        .map_err(|_| {
            ServiceError::validation("challenge_id", "invalid", "challenge_id must be a UUID")
        })?;
    let credential = credential.ok_or_else(|| {
        ServiceError::validation(
            "credential",
            "required",
            "credential is required for webauthn",
        )
    })?;
    Ok((challenge, credential))
}

/// The browser's credential JSON as webauthn-rs reads it; a shape it cannot
/// read is the client's mistake (400), not a failed authentication.
fn parse_credential<T: serde::de::DeserializeOwned>(credential: Value) -> ServiceResult<T> {
    serde_json::from_value(credential).map_err(|_| {
        ServiceError::validation(
            "credential",
            "invalid",
            "credential must be the PublicKeyCredential as JSON (base64url binary fields)",
        )
    })
}

/// The `publicKey` member of a challenge response, which is what the browser
/// API takes (the rest, such as conditional mediation, is the client's choice).
fn public_key_options(response: &impl serde::Serialize) -> ServiceResult<Value> {
    let mut v = serde_json::to_value(response).map_err(ServiceError::internal)?;
    v.get_mut("publicKey")
        .map(Value::take)
        .ok_or_else(|| ServiceError::internal(anyhow::anyhow!("challenge without publicKey")))
}

fn internal(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::internal(anyhow::anyhow!("webauthn: {e}"))
}

fn assertions(ceremony: &'static str, result: &'static str) {
    metrics::counter!("passkey_assertions_total", "ceremony" => ceremony, "result" => result)
        .increment(1);
}

/// The signature counter of a stored passkey (webauthn-rs keeps it private;
/// its JSON form is stable across its 0.5 releases).
fn stored_counter(passkey: &Value) -> i64 {
    passkey["cred"]["counter"].as_i64().unwrap_or(0)
}

/// Why an assertion was refused, for the audit row and the metric.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// No live challenge of this ceremony with that id (expired, used, unknown).
    Challenge,
    /// The credential is not registered (to the user it names).
    UnknownCredential,
    /// Signature, origin, rp id, challenge or user verification did not verify.
    Invalid,
    /// The signature counter did not grow: a cloned authenticator.
    Cloned,
    /// The user is disabled.
    Disabled,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Challenge => "challenge",
            Refusal::UnknownCredential => "unknown_credential",
            Refusal::Invalid => "invalid_assertion",
            Refusal::Cloned => "counter_regression",
            Refusal::Disabled => "disabled",
        }
    }
}

impl PasskeyService {
    /// The relying party from WEBAUTHN_RP_ID and WEBAUTHN_ORIGINS (checked at
    /// start-up by `Settings::problems`).
    pub fn new(
        settings: &Settings,
        db: Db,
        sessions: std::sync::Arc<super::sessions::Sessions>,
        throttle: std::sync::Arc<super::throttle::Throttle>,
    ) -> anyhow::Result<Self> {
        let origins = settings
            .webauthn_origins()
            .iter()
            .map(|o| Url::parse(o).map_err(|e| anyhow::anyhow!("WEBAUTHN_ORIGINS {o:?}: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (first, rest) = origins
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("WEBAUTHN_ORIGINS is empty"))?;
        let rp_id = settings.webauthn_rp_id.as_str();
        let mut builder = WebauthnBuilder::new(rp_id, first)
            .map_err(|e| anyhow::anyhow!("WEBAUTHN_RP_ID {rp_id:?} and origin {first}: {e}"))?
            .rp_name(RP_NAME)
            .timeout(Duration::from_secs(CHALLENGE_TTL_SECONDS as u64));
        for o in rest {
            builder = builder.append_allowed_origin(o);
        }
        let webauthn = builder
            .build()
            .map_err(|e| anyhow::anyhow!("WebAuthn relying party: {e}"))?;
        Ok(Self {
            db,
            sessions,
            throttle,
            login_ip_max_per_minute: settings.login_ip_max_per_minute,
            webauthn: std::sync::Arc::new(webauthn),
            step_up: None,
        })
    }

    /// Removing a passkey then needs a recent second factor (DESIGN §8).
    pub fn with_step_up(mut self, step_up: super::mfa::StepUp) -> Self {
        self.step_up = Some(step_up);
        self
    }

    async fn new_challenge(
        &self,
        ceremony: Ceremony,
        user_id: Option<Uuid>,
        state: &impl serde::Serialize,
        options: Value,
    ) -> ServiceResult<Challenge> {
        // Random (v4): a login challenge is consumed by whoever names it first.
        let id = Uuid::new_v4();
        let state = serde_json::to_value(state).map_err(ServiceError::internal)?;
        store::insert_challenge(
            &self.db,
            id,
            ceremony,
            user_id,
            state,
            CHALLENGE_TTL_SECONDS,
        )
        .await?;
        Ok(Challenge { id, options })
    }

    async fn take_state<T: serde::de::DeserializeOwned>(
        &self,
        id: Uuid,
        ceremony: Ceremony,
        user_id: Option<Uuid>,
    ) -> ServiceResult<Option<T>> {
        match store::take_challenge(&self.db, id, ceremony, user_id).await? {
            None => Ok(None),
            Some(v) => serde_json::from_value(v).map(Some).map_err(internal),
        }
    }

    // ---- the signed-in user's passkeys ----

    /// Starts adding a passkey: creation options asking for a discoverable,
    /// user-verified credential, excluding the ones the user already has.
    #[tracing::instrument(skip_all)]
    pub async fn start_registration(&self, caller: &Caller) -> ServiceResult<Challenge> {
        let user_id = caller.session_user_for(MANAGED_WITH)?.0;
        let user = users::get(&self.db, user_id)
            .await?
            .ok_or(ServiceError::InvalidToken)?;
        let existing = store::credentials_for_user(&self.db, user_id).await?;
        if existing.len() as i64 >= MAX_PER_USER {
            return Err(ServiceError::Conflict(format!(
                "at most {MAX_PER_USER} passkeys per user: remove one first"
            )));
        }
        let exclude = existing
            .iter()
            .filter_map(|c| serde_json::from_value::<Passkey>(c.passkey.clone()).ok())
            .map(|p| p.cred_id().clone())
            .collect();
        let (ccr, state) = self
            .webauthn
            .start_passkey_registration(user_id, &user.email, &user.full_name, Some(exclude))
            .map_err(internal)?;
        let mut options = public_key_options(&ccr)?;
        // A passkey is a discoverable credential: that is what lets a login name
        // no user (webauthn-rs leaves residency to the authenticator).
        if let Some(sel) = options
            .get_mut("authenticatorSelection")
            .and_then(Value::as_object_mut)
        {
            sel.insert("residentKey".into(), "required".into());
            sel.insert("requireResidentKey".into(), true.into());
        }
        self.new_challenge(Ceremony::Register, Some(user_id), &state, options)
            .await
    }

    /// Finishes adding a passkey: verifies the authenticator's response against
    /// the challenge, the origins and the rp id, then stores it (audited).
    #[tracing::instrument(skip_all)]
    pub async fn finish_registration(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        challenge_id: Uuid,
        name: Option<&str>,
        credential: Value,
    ) -> ServiceResult<PasskeySummary> {
        let user_id = caller.session_user_for(MANAGED_WITH)?.0;
        let name =
            PasskeyName::parse(name).map_err(|m| ServiceError::validation("name", "invalid", m))?;
        let reg: RegisterPublicKeyCredential = parse_credential(credential)?;
        let state: PasskeyRegistration = self
            .take_state(challenge_id, Ceremony::Register, Some(user_id))
            .await?
            .ok_or_else(|| {
                ServiceError::validation(
                    "challenge_id",
                    "invalid",
                    "no such registration challenge: expired, already used or not yours",
                )
            })?;
        let passkey = self
            .webauthn
            .finish_passkey_registration(&reg, &state)
            .map_err(|e| {
                tracing::info!(error = %e, "passkey registration refused");
                ServiceError::validation(
                    "credential",
                    "invalid",
                    "the credential does not verify for this challenge, origin and relying party",
                )
            })?;
        let json = serde_json::to_value(&passkey).map_err(ServiceError::internal)?;
        let id = Uuid::now_v7();
        let mut tx = self.db.begin().await?;
        let summary = store::insert(
            &mut tx,
            NewPasskey {
                id,
                user_id,
                credential_id: passkey.cred_id().as_ref(),
                name: name.as_str(),
                sign_count: stored_counter(&json),
                passkey: json,
            },
        )
        .await?;
        tx.audit(
            &AuditEntry::new("mfa.passkey.registered", Outcome::Success)
                .by(caller)
                .target("passkey", id)
                .meta(meta)
                .details(serde_json::json!({ "user_id": user_id, "name": name.as_str() })),
        )
        .await?;
        // A factor changed: the user hears of it (a security notice, DESIGN §8).
        super::notify::notify(
            &mut tx,
            crate::domain::recovery::Template::MfaEnabled,
            user_id,
            serde_json::json!({}),
        )
        .await?;
        tx.commit().await?;
        Ok(summary)
    }

    /// The caller's passkeys, oldest first.
    pub async fn list(&self, caller: &Caller) -> ServiceResult<Vec<PasskeySummary>> {
        let user_id = caller.session_user_for(MANAGED_WITH)?.0;
        Ok(store::list_for_user(&self.db, user_id).await?)
    }

    /// Removes one of the caller's passkeys (audited); another user's is 404.
    #[tracing::instrument(skip_all)]
    pub async fn remove(&self, caller: &Caller, meta: &RequestMeta, id: Uuid) -> ServiceResult<()> {
        let user_id = caller.session_user_for(MANAGED_WITH)?.0;
        if let Some(step_up) = &self.step_up {
            step_up
                .require_step_up(caller, meta, "mfa.passkey.remove")
                .await?;
        }
        let mut tx = self.db.begin().await?;
        let removed = store::delete(&mut tx, user_id, id)
            .await?
            .ok_or(ServiceError::NotFound("passkey"))?;
        tx.audit(
            &AuditEntry::new("mfa.passkey.removed", Outcome::Success)
                .by(caller)
                .target("passkey", id)
                .meta(meta)
                .details(serde_json::json!({ "user_id": user_id, "name": removed.name })),
        )
        .await?;
        super::notify::notify(
            &mut tx,
            crate::domain::recovery::Template::MfaDisabled,
            user_id,
            serde_json::json!({}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// How many passkeys a user has (GET /v1/users/me/mfa, and whether a login
    /// offers `webauthn` as a second factor).
    pub async fn count(&self, user_id: Uuid) -> ServiceResult<i64> {
        Ok(store::count_for_user(&self.db, user_id).await?)
    }

    /// Removes every passkey of a user inside the caller's unit of work (an
    /// administrator removing all factors; the caller writes the audit row).
    pub async fn remove_all_in(tx: &mut Tx, user_id: Uuid) -> ServiceResult<u64> {
        Ok(store::delete_all_for_user(tx, user_id).await?)
    }

    // ---- assertions ----

    /// Refuses an assertion: a metric, a log line (the reason, nothing of the
    /// assertion), an audit row for a login or a clone, and the same 401
    /// whatever the reason.
    async fn refuse(
        &self,
        ceremony: &'static str,
        meta: &RequestMeta,
        reason: Refusal,
        user_id: Option<Uuid>,
        details: Value,
    ) -> ServiceError {
        assertions(ceremony, reason.as_str());
        tracing::info!(
            ceremony,
            reason = reason.as_str(),
            "passkey assertion refused"
        );
        let (action, outcome) = match (reason, ceremony) {
            (Refusal::Cloned, _) => ("auth.passkey.cloned", Outcome::Denied),
            (_, "login") => ("auth.login.failed", Outcome::Failure),
            // A failed second factor is audited by the login or step-up flow
            // that asked (`auth.mfa.failed`, counted toward the lockout there).
            _ => return ServiceError::InvalidCredentials,
        };
        let mut entry = AuditEntry::new(action, outcome)
            .meta(meta)
            .details(details)
            .detail("method", "passkey")
            .detail("reason", reason.as_str());
        if let Some(uid) = user_id {
            entry = entry.target("user", uid);
        }
        super::audit::write_alone(&self.db, entry).await;
        ServiceError::InvalidCredentials
    }

    /// Verifies an assertion against one stored credential and advances its
    /// counter in `tx`. A counter that does not grow — seen by webauthn-rs, or by
    /// the conditional update when two copies race — is `Cloned`.
    async fn verify(
        &self,
        tx: &mut Tx,
        stored: &StoredPasskey,
        verdict: Result<webauthn_rs::prelude::AuthenticationResult, WebauthnError>,
        mut passkey: Passkey,
    ) -> ServiceResult<Result<(), Refusal>> {
        let result = match verdict {
            Ok(r) => r,
            Err(WebauthnError::CredentialPossibleCompromise) => return Ok(Err(Refusal::Cloned)),
            Err(e) => {
                tracing::info!(error = %e, "passkey assertion does not verify");
                return Ok(Err(Refusal::Invalid));
            }
        };
        passkey.update_credential(&result);
        let json = serde_json::to_value(&passkey).map_err(ServiceError::internal)?;
        let counter = i64::from(result.counter());
        if !store::record_use(tx, stored.id, json, counter).await? {
            return Ok(Err(Refusal::Cloned));
        }
        Ok(Ok(()))
    }

    // ---- passwordless login ----

    /// Starts a passwordless login: request options with no allowed credentials,
    /// so the authenticator offers the discoverable passkeys it holds for us.
    #[tracing::instrument(skip_all)]
    pub async fn start_login(&self, meta: &RequestMeta) -> ServiceResult<Challenge> {
        self.throttle_login(meta).await?;
        let (rcr, state) = self
            .webauthn
            .start_discoverable_authentication()
            .map_err(internal)?;
        let options = public_key_options(&rcr)?;
        self.new_challenge(Ceremony::Login, None, &state, options)
            .await
    }

    /// Finishes a passwordless login: the assertion names its credential and
    /// user; it must verify against that registered passkey, whose counter must
    /// grow. Then a session with `amr` ["hwk","mfa"], as a password login's.
    /// Every refusal is the same 401 `invalid_credentials`, audited.
    #[tracing::instrument(skip_all)]
    pub async fn finish_login(
        &self,
        meta: &RequestMeta,
        challenge_id: Uuid,
        credential: Value,
    ) -> ServiceResult<LoginTokens> {
        self.throttle_login(meta).await?;
        let cred: PublicKeyCredential = parse_credential(credential)?;
        let none = serde_json::json!({});
        let Some(state) = self
            .take_state::<DiscoverableAuthentication>(challenge_id, Ceremony::Login, None)
            .await?
        else {
            return Err(self
                .refuse("login", meta, Refusal::Challenge, None, none)
                .await);
        };
        let Ok((user_id, cred_id)) = self.webauthn.identify_discoverable_authentication(&cred)
        else {
            let e = self.refuse("login", meta, Refusal::UnknownCredential, None, none);
            return Err(e.await);
        };
        let stored = store::by_credential_id(&self.db, cred_id)
            .await?
            .filter(|s| s.user_id == user_id);
        let Some(stored) = stored else {
            let e = self.refuse("login", meta, Refusal::UnknownCredential, None, none);
            return Err(e.await);
        };
        let passkey: Passkey = serde_json::from_value(stored.passkey.clone()).map_err(internal)?;
        let verdict = self.webauthn.finish_discoverable_authentication(
            &cred,
            state,
            &[DiscoverableKey::from(&passkey)],
        );
        let details =
            serde_json::json!({ "passkey_id": stored.id, "stored_counter": stored.sign_count });
        let mut tx = self.db.begin().await?;
        if let Err(reason) = self.verify(&mut tx, &stored, verdict, passkey).await? {
            drop(tx);
            let e = self.refuse("login", meta, reason, Some(user_id), details);
            return Err(e.await);
        }
        let user = match users::by_id(&mut tx, user_id).await? {
            Some(u) if u.status == crate::domain::user::UserStatus::Active => u.into_user(),
            _ => {
                drop(tx);
                let e = self.refuse("login", meta, Refusal::Disabled, Some(user_id), details);
                return Err(e.await);
            }
        };
        assertions("login", "succeeded");
        // The counter moved forward; it commits even if opening the session
        // fails (a counter only ever grows, so that loses nothing).
        tx.commit().await?;
        let amr: Vec<String> = AMR_PASSWORDLESS.iter().map(|s| s.to_string()).collect();
        let audit = AuditEntry::new("auth.login.succeeded", Outcome::Success)
            .actor("user", user.id)
            .details(serde_json::json!({ "method": "passkey", "passkey_id": stored.id }));
        let tokens = self.sessions.open(meta, user, &amr, audit).await?;
        metrics::counter!("logins_total", "result" => "succeeded").increment(1);
        Ok(tokens)
    }

    /// Passwordless login shares the per-IP login throttle
    /// (LOGIN_IP_MAX_PER_MINUTE) with password logins: starting a ceremony
    /// writes a row, so it counts too.
    async fn throttle_login(&self, meta: &RequestMeta) -> ServiceResult<()> {
        self.throttle
            .per_ip(
                meta,
                "login",
                self.login_ip_max_per_minute,
                Duration::from_secs(60),
            )
            .await
    }

    // ---- second factor (the "mfa" flow calls these) ----

    /// Starts a passkey as the second step of `user_id`'s login: request options
    /// listing the user's passkeys. 400 when the user has none.
    #[tracing::instrument(skip_all)]
    pub async fn start_second_factor(&self, user_id: Uuid) -> ServiceResult<Challenge> {
        let passkeys: Vec<Passkey> = store::credentials_for_user(&self.db, user_id)
            .await?
            .into_iter()
            .filter_map(|c| serde_json::from_value(c.passkey).ok())
            .collect();
        if passkeys.is_empty() {
            return Err(ServiceError::validation(
                "method",
                "unavailable",
                "this account has no passkey",
            ));
        }
        let (rcr, state) = self
            .webauthn
            .start_passkey_authentication(&passkeys)
            .map_err(internal)?;
        let options = public_key_options(&rcr)?;
        self.new_challenge(Ceremony::SecondFactor, Some(user_id), &state, options)
            .await
    }

    /// Starts a passkey step-up for the signed-in user (a session, not an API
    /// key): the same assertion as a second factor, finished through
    /// `POST /v1/auth/step-up {method: "webauthn", challenge_id, credential}`.
    pub async fn start_step_up(&self, caller: &Caller) -> ServiceResult<Challenge> {
        self.start_second_factor(caller.session_user_for(MANAGED_WITH)?.0)
            .await
    }

    /// A passkey assertion as a second factor: right, wrong (counted toward the
    /// lockout like a wrong code), or an error that is neither.
    /// The fields are checked here, after the flow has checked the method, so a
    /// user without passkeys hears about the method first.
    /// The `verify` of `MfaService::finish_login_with` / `step_up_with`.
    pub async fn check_second_factor(
        &self,
        meta: &RequestMeta,
        user_id: Uuid,
        challenge_id: Option<String>,
        credential: Option<Value>,
    ) -> ServiceResult<bool> {
        let (challenge, credential) = assertion(challenge_id, credential)?;
        match self
            .finish_second_factor(meta, user_id, challenge, credential)
            .await
        {
            Ok(_) => Ok(true),
            Err(ServiceError::InvalidCredentials) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Verifies a passkey assertion as `user_id`'s second factor, for a challenge
    /// from [`Self::start_second_factor`] for that user, and advances its
    /// counter. A refusal is `InvalidCredentials`, audited here only when it is
    /// a cloned authenticator (`auth.passkey.cloned`): the flow that asked
    /// audits the failure (`auth.mfa.failed`) and counts it toward the lockout.
    #[tracing::instrument(skip_all)]
    pub async fn finish_second_factor(
        &self,
        meta: &RequestMeta,
        user_id: Uuid,
        challenge_id: Uuid,
        credential: Value,
    ) -> ServiceResult<VerifiedPasskey> {
        let cred: PublicKeyCredential = parse_credential(credential)?;
        let none = serde_json::json!({});
        let Some(state) = self
            .take_state::<PasskeyAuthentication>(
                challenge_id,
                Ceremony::SecondFactor,
                Some(user_id),
            )
            .await?
        else {
            let e = self.refuse("mfa", meta, Refusal::Challenge, Some(user_id), none);
            return Err(e.await);
        };
        let stored = store::by_credential_id(&self.db, cred.get_credential_id())
            .await?
            .filter(|s| s.user_id == user_id);
        let Some(stored) = stored else {
            let e = self.refuse("mfa", meta, Refusal::UnknownCredential, Some(user_id), none);
            return Err(e.await);
        };
        let passkey: Passkey = serde_json::from_value(stored.passkey.clone()).map_err(internal)?;
        let verdict = self.webauthn.finish_passkey_authentication(&cred, &state);
        let details =
            serde_json::json!({ "passkey_id": stored.id, "stored_counter": stored.sign_count });
        let mut tx = self.db.begin().await?;
        if let Err(reason) = self.verify(&mut tx, &stored, verdict, passkey).await? {
            drop(tx);
            let e = self.refuse("mfa", meta, reason, Some(user_id), details);
            return Err(e.await);
        }
        tx.commit().await?;
        assertions("mfa", "succeeded");
        Ok(VerifiedPasskey {
            user_id,
            passkey_id: stored.id,
        })
    }
}
