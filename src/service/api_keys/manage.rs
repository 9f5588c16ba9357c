//! The owner's use cases: issue, list, read, revoke, rotate, usage. Keys are
//! managed in person (a session), never with an API key or by a service.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use super::ApiKeyService;
use crate::domain::account::Access;
use crate::domain::api_key::{ApiKeySecret, RevocationReason};
use crate::domain::api_key_grant::{Grant, GrantFacts, NewKey};
use crate::service::audit::{AuditEntry, Outcome};
use crate::service::invalidation::Change;
use crate::service::paging::{Page, PageQuery};
use crate::service::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::store::api_keys::{self as store, ApiKeyRow, NewApiKey};

/// The public facts of a key (never the key or its hash).
#[derive(Debug, Clone)]
pub struct KeyView {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub scopes: Vec<String>,
    pub allowed_ips: Vec<String>,
    pub trading_account_ids: Vec<Uuid>,
    pub rate_limit_per_minute: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRow> for KeyView {
    fn from(r: ApiKeyRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            prefix: r.prefix,
            scopes: r.scopes,
            allowed_ips: r.allowed_ips,
            trading_account_ids: r.trading_account_ids,
            rate_limit_per_minute: r.rate_limit_per_minute,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
        }
    }
}

/// A freshly issued key: the plaintext is in here and nowhere else, ever.
#[derive(Debug)]
pub struct IssuedKey {
    pub view: KeyView,
    pub secret: ApiKeySecret,
}

#[derive(Debug, Clone)]
pub struct UsageItem {
    pub used_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub operation: String,
    pub result: String,
    /// Identical uses in one flush window share a row; `used_at` is the last.
    pub count: i32,
}

impl ApiKeyService {
    #[tracing::instrument(skip_all, fields(user_id))]
    pub async fn create(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        input: NewKey,
    ) -> ServiceResult<IssuedKey> {
        let user_id = key_manager(caller)?;
        tracing::Span::current().record("user_id", tracing::field::display(user_id));
        // A step-up operation, refused until the email is verified.
        self.accounts.require_verified(caller).await?;
        self.accounts
            .step_up
            .require_step_up(caller, meta, "api_key.create")
            .await?;
        let grant = self.check_grants(user_id, input).await?;
        let secret = ApiKeySecret::generate(self.env);
        let hash = self.hasher.hash(&secret);
        let id = Uuid::now_v7();
        let mut tx = self.db.begin().await?;
        let row = store::insert(
            &mut tx,
            &NewApiKey {
                id,
                user_id,
                name: &grant.name,
                prefix: secret.prefix(),
                key_hash: &hash,
                scopes: &grant.scopes,
                allowed_ips: &grant.allowed_ips,
                trading_account_ids: &grant.trading_account_ids,
                rate_limit_per_minute: grant.rate_limit_per_minute,
                expires_at: grant.expires_at,
                rotated_from: None,
            },
        )
        .await?;
        tx.audit(
            &AuditEntry::new("api_key.created", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target("api_key", id)
                .details(json!({
                    "key_id": id,
                    "prefix": secret.prefix(),
                    "name": grant.name,
                    "scopes": grant.scopes,
                })),
        )
        .await?;
        // The `api_key_created` notice, in this transaction.
        crate::service::notify::notify(
            &mut tx,
            crate::domain::recovery::Template::ApiKeyCreated,
            user_id,
            json!({ "name": grant.name, "prefix": secret.prefix() }),
        )
        .await?;
        tx.commit().await?;
        Ok(IssuedKey {
            view: row.into(),
            secret,
        })
    }

    /// The grant rules (`domain::api_key_grant`) against the scope catalog and
    /// the owner's accounts: 400 for what is malformed or unknown, then 403 for a
    /// scope the user does not hold.
    async fn check_grants(&self, user_id: Uuid, input: NewKey) -> ServiceResult<Grant> {
        let catalog = store::grantable_scopes(&self.db).await?;
        let access: HashMap<Uuid, Access> = if input.trading_account_ids.is_empty() {
            HashMap::new()
        } else {
            self.accounts
                .accounts_of(user_id)
                .await?
                .into_iter()
                .map(|a| (a.account.id, a.access))
                .collect()
        };
        let facts = GrantFacts {
            catalog: &catalog,
            access: &access,
            now: Utc::now(),
        };
        let grant = Grant::parse(input, facts).map_err(ServiceError::Validation)?;
        let held = self.policy.user_scopes(user_id).await?;
        if let Some(s) = grant.first_unheld(&held) {
            return Err(ServiceError::Forbidden(format!(
                "you do not hold the scope {s:?}"
            )));
        }
        Ok(grant)
    }

    pub async fn list(&self, caller: &Caller, page: PageQuery) -> ServiceResult<Page<KeyView>> {
        let user_id = key_manager(caller)?;
        let page = page.parse::<Uuid>()?;
        let rows = store::list_for_user(&self.db, user_id, page.after, page.fetch()).await?;
        Ok(page.page(rows, |r| r.id).map(KeyView::from))
    }

    pub async fn get(&self, caller: &Caller, id: Uuid) -> ServiceResult<KeyView> {
        let user_id = key_manager(caller)?;
        store::get_for_user(&self.db, user_id, id)
            .await?
            .map(KeyView::from)
            .ok_or(ServiceError::NotFound("api key"))
    }

    /// Revokes at once on this replica and within a second on the others.
    /// Revoking a revoked key is a no-op.
    pub async fn revoke(&self, caller: &Caller, meta: &RequestMeta, id: Uuid) -> ServiceResult<()> {
        let user_id = key_manager(caller)?;
        let mut tx = self.db.begin().await?;
        let key = store::lock_for_user(&mut tx, user_id, id)
            .await?
            .ok_or(ServiceError::NotFound("api key"))?;
        if store::revoke(&mut tx, id, RevocationReason::Revoked).await? {
            tx.audit(
                &AuditEntry::new("api_key.revoked", Outcome::Success)
                    .by(caller)
                    .meta(meta)
                    .target("api_key", id)
                    .details(json!({ "key_id": id, "prefix": key.prefix })),
            )
            .await?;
        }
        tx.commit().await?;
        self.invalidation.publish(Change::ApiKey(id)).await;
        Ok(())
    }

    /// A new key with the same grants; the old one is revoked in the same
    /// transaction.
    pub async fn rotate(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<IssuedKey> {
        let user_id = key_manager(caller)?;
        // A step-up operation, refused until the email is verified.
        self.accounts.require_verified(caller).await?;
        self.accounts
            .step_up
            .require_step_up(caller, meta, "api_key.rotate")
            .await?;
        let mut tx = self.db.begin().await?;
        let old = store::lock_for_user(&mut tx, user_id, id)
            .await?
            .ok_or(ServiceError::NotFound("api key"))?;
        if old.revoked_at.is_some() {
            return Err(ServiceError::Conflict("the api key is revoked".into()));
        }
        if old.expires_at.is_some_and(|t| t <= Utc::now()) {
            return Err(ServiceError::Conflict("the api key has expired".into()));
        }
        let secret = ApiKeySecret::generate(self.env);
        let hash = self.hasher.hash(&secret);
        let new_id = Uuid::now_v7();
        let row = store::insert(
            &mut tx,
            &NewApiKey {
                id: new_id,
                user_id,
                name: &old.name,
                prefix: secret.prefix(),
                key_hash: &hash,
                scopes: &old.scopes,
                allowed_ips: &old.allowed_ips,
                trading_account_ids: &old.trading_account_ids,
                rate_limit_per_minute: old.rate_limit_per_minute,
                expires_at: old.expires_at,
                rotated_from: Some(old.id),
            },
        )
        .await?;
        store::revoke(&mut tx, old.id, RevocationReason::Rotated).await?;
        tx.audit(
            &AuditEntry::new("api_key.rotated", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target("api_key", new_id)
                .details(json!({
                    "key_id": new_id,
                    "prefix": secret.prefix(),
                    "old_key_id": old.id,
                    "old_prefix": old.prefix,
                })),
        )
        .await?;
        // A rotation hands out a new key, so the owner hears of it.
        crate::service::notify::notify(
            &mut tx,
            crate::domain::recovery::Template::ApiKeyCreated,
            user_id,
            json!({ "name": old.name, "prefix": secret.prefix() }),
        )
        .await?;
        tx.commit().await?;
        self.invalidation.publish(Change::ApiKey(old.id)).await;
        Ok(IssuedKey {
            view: row.into(),
            secret,
        })
    }

    pub async fn usage(
        &self,
        caller: &Caller,
        id: Uuid,
        page: PageQuery,
    ) -> ServiceResult<Page<UsageItem>> {
        let user_id = key_manager(caller)?;
        let page = page.parse()?;
        store::get_for_user(&self.db, user_id, id)
            .await?
            .ok_or(ServiceError::NotFound("api key"))?;
        let rows = store::usage_page(&self.db, id, page.after, page.fetch()).await?;
        Ok(page.page(rows, |r| (r.used_at, r.id)).map(|r| UsageItem {
            used_at: r.used_at,
            ip: r.ip,
            operation: r.operation,
            result: r.result,
            count: r.request_count,
        }))
    }
}

/// Keys are managed by their owner in person: an API key cannot mint, rotate or
/// revoke keys (it would outlive its own revocation), nor can a service client.
fn key_manager(caller: &Caller) -> ServiceResult<Uuid> {
    match caller {
        Caller::User {
            user_id, key: None, ..
        } => Ok(*user_id),
        Caller::User { key: Some(_), .. } => Err(ServiceError::Forbidden(
            "API keys cannot be managed with an API key".into(),
        )),
        Caller::ServiceClient { .. } => {
            Err(ServiceError::Forbidden("API keys belong to users".into()))
        }
    }
}
