//! Broker credentials: written by the account's owner or manager, sealed under
//! the active key and bound to the account and field; read back only by a
//! service client holding `credentials:read`, every read audited; re-sealed
//! under a new key by the `reencrypt-credentials` command.

use serde_json::json;
use uuid::Uuid;

use super::authz::RowLock;
use super::{AccountsService, TARGET};
use crate::crypto::aead::{credential_aad, AeadError, KeyRing};
use crate::domain::account::{credentials_hint, BrokerCredentials, Permission, TradingAccount};
use crate::service::audit::{AuditEntry, Outcome};
use crate::service::invalidation::Change;
use crate::service::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::store::accounts::{self as store, SealedCredentials};
use crate::store::Db;

/// What `reencrypt_credentials` did, printed by the admin command.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReencryptSummary {
    pub active_key_id: String,
    pub candidates: usize,
    pub reencrypted: usize,
    pub already_current: usize,
    pub failed: Vec<ReencryptFailure>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReencryptFailure {
    pub account_id: Uuid,
    pub error: String,
}

impl AccountsService {
    /// Owner or manager. Seals each value under the active key, bound to this
    /// account and field; stores a masked hint of the API key.
    #[tracing::instrument(skip_all, fields(account_id = %id))]
    pub async fn set_credentials(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        creds: BrokerCredentials,
    ) -> ServiceResult<()> {
        self.require_verified(caller).await?;
        self.step_up
            .require_step_up(caller, meta, "trading_account.credentials.update")
            .await?;
        let keys = self.keys()?;
        let mut op = self
            .open(caller, meta, id, Permission::Manage, RowLock::Hold)
            .await?;
        let owner = op.granted.account.owner_user_id;
        let sealed = seal_credentials(keys, id, &creds)?;
        store::set_credentials(&mut op.tx, id, &sealed, &credentials_hint(&creds.api_key)).await?;
        op.audit(
            "trading_account.credentials.updated",
            json!({
                "key_id": sealed.credentials_key_id,
                "has_access_token": creds.access_token.is_some(),
            }),
        )
        .await?;
        // The owner hears of it, in this transaction.
        crate::service::notify::notify(
            &mut op.tx,
            crate::domain::recovery::Template::BrokerCredentialsChanged,
            owner,
            json!({ "account_id": id }),
        )
        .await?;
        op.commit().await?;
        // Cached account lists show has_credentials and the hint.
        self.invalidation.publish(Change::Account(id)).await;
        Ok(())
    }

    /// The credentials' metadata (never their values): owner or manager only.
    pub async fn credentials_status(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<TradingAccount> {
        let g = self
            .open(caller, meta, id, Permission::Manage, RowLock::Skip)
            .await?
            .commit()
            .await?;
        Ok(g.account)
    }

    /// GetBrokerCredentials (scope credentials:read, service clients only). Every
    /// call leaves an audit row naming the client, committed before the values
    /// leave; a value that fails authentication is refused and audited.
    #[tracing::instrument(skip_all, fields(account_id = %id))]
    pub async fn broker_credentials(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<BrokerCredentials> {
        self.policy
            .require_client_scope(caller, meta, "credentials:read", Some(id))
            .await?;
        let keys = self.keys()?;
        if store::get_live(&self.db, id).await?.is_none() {
            return Err(ServiceError::NotFound("trading account"));
        }
        let sealed = store::sealed_credentials(&self.db, id)
            .await?
            .ok_or(ServiceError::NotFound("broker credentials"))?;
        let creds = match open_credentials(keys, id, &sealed) {
            Ok(c) => c,
            Err(e) => {
                let mut tx = self.db.begin().await?;
                tx.audit(
                    &AuditEntry::new(
                        "trading_account.credentials.decrypt_failed",
                        Outcome::Failure,
                    )
                    .by(caller)
                    .meta(meta)
                    .target(TARGET, id)
                    .details(json!({
                        "key_id": sealed.credentials_key_id,
                        "error": aead_reason(&e),
                    })),
                )
                .await?;
                tx.commit().await?;
                return Err(ServiceError::Integrity("stored broker credentials"));
            }
        };
        let mut tx = self.db.begin().await?;
        tx.audit(
            &AuditEntry::new("trading_account.credentials.read", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target(TARGET, id)
                .details(json!({ "key_id": sealed.credentials_key_id })),
        )
        .await?;
        tx.commit().await?;
        Ok(creds)
    }

    /// Moves every sealed value to the active key (see `reencrypt_credentials`).
    pub async fn reencrypt_credentials(&self) -> ServiceResult<ReencryptSummary> {
        reencrypt_credentials(&self.db, self.keys()?).await
    }

    fn keys(&self) -> ServiceResult<&KeyRing> {
        self.keys.as_deref().ok_or_else(|| {
            ServiceError::Unavailable("CREDENTIALS_ENCRYPTION_KEYS is not configured".into())
        })
    }
}

/// Moves every sealed value to the active key. Each account is its own
/// transaction (row locked, re-checked), so the command can be interrupted and
/// re-run; values already under the active key are left alone.
pub async fn reencrypt_credentials(db: &Db, keys: &KeyRing) -> ServiceResult<ReencryptSummary> {
    let active = keys.active_kid().to_string();
    let ids = store::ids_sealed_with_other_key(db, &active).await?;
    let mut summary = ReencryptSummary {
        active_key_id: active.clone(),
        candidates: ids.len(),
        reencrypted: 0,
        already_current: 0,
        failed: Vec::new(),
    };
    for id in ids {
        let mut tx = db.begin().await?;
        let Some(sealed) = store::sealed_for_update(&mut tx, id).await? else {
            summary.already_current += 1;
            continue;
        };
        if sealed.credentials_key_id == active {
            summary.already_current += 1;
            continue;
        }
        let from = sealed.credentials_key_id.clone();
        let (outcome, action, details) = match open_credentials(keys, id, &sealed)
            .and_then(|c| seal_credentials_raw(keys, id, &c))
        {
            Ok(resealed) => {
                store::reseal(&mut tx, id, &resealed).await?;
                summary.reencrypted += 1;
                (
                    Outcome::Success,
                    "trading_account.credentials.reencrypted",
                    json!({ "from_key_id": from, "to_key_id": active }),
                )
            }
            Err(e) => {
                summary.failed.push(ReencryptFailure {
                    account_id: id,
                    error: e.to_string(),
                });
                (
                    Outcome::Failure,
                    "trading_account.credentials.decrypt_failed",
                    json!({ "key_id": from, "error": aead_reason(&e), "during": "reencrypt" }),
                )
            }
        };
        tx.audit(
            &AuditEntry::new(action, outcome)
                .actor("system", "reencrypt-credentials")
                .target(TARGET, id)
                .details(details),
        )
        .await?;
        tx.commit().await?;
    }
    Ok(summary)
}

fn aead_reason(e: &AeadError) -> &'static str {
    match e {
        AeadError::UnknownKey(_) => "unknown_key",
        AeadError::Tampered => "authentication_failed",
        AeadError::BadKeyRing(_) | AeadError::Seal => "crypto_error",
    }
}

fn seal_credentials_raw(
    keys: &KeyRing,
    id: Uuid,
    c: &BrokerCredentials,
) -> Result<SealedCredentials, AeadError> {
    let seal = |field: &str, v: &str| keys.seal(&credential_aad(id, field), v.as_bytes());
    Ok(SealedCredentials {
        api_key_ciphertext: seal("api_key", &c.api_key)?,
        api_secret_ciphertext: seal("api_secret", &c.api_secret)?,
        access_token_ciphertext: c
            .access_token
            .as_deref()
            .map(|t| seal("access_token", t))
            .transpose()?,
        credentials_key_id: keys.active_kid().to_string(),
    })
}

fn seal_credentials(
    keys: &KeyRing,
    id: Uuid,
    c: &BrokerCredentials,
) -> ServiceResult<SealedCredentials> {
    seal_credentials_raw(keys, id, c).map_err(ServiceError::internal)
}

fn open_credentials(
    keys: &KeyRing,
    id: Uuid,
    s: &SealedCredentials,
) -> Result<BrokerCredentials, AeadError> {
    let open = |field: &str, ct: &[u8]| -> Result<String, AeadError> {
        let bytes = keys.open(&s.credentials_key_id, &credential_aad(id, field), ct)?;
        String::from_utf8(bytes).map_err(|_| AeadError::Tampered)
    };
    Ok(BrokerCredentials {
        api_key: open("api_key", &s.api_key_ciphertext)?,
        api_secret: open("api_secret", &s.api_secret_ciphertext)?,
        access_token: s
            .access_token_ciphertext
            .as_deref()
            .map(|ct| open("access_token", ct))
            .transpose()?,
    })
}
