//! Who may act on an account, decided once per use case: `open` is the prologue
//! every use case on one account starts with (transaction, scope, policies, the
//! key's accounts, the caller's standing), and a refusal is an `authz.denied` row
//! committed before the error leaves.

use serde_json::{json, Value};
use uuid::Uuid;

use super::{account_resource, key_accounts, AccountsService, TARGET};
use crate::domain::account::{Access, Permission, TradingAccount};
use crate::domain::policy::Resource;
use crate::domain::scope;
use crate::service::audit::{AuditEntry, Outcome};
use crate::service::policy::ScopeRefusal;
use crate::service::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::store::accounts as store;
use crate::store::Tx;

/// Whether the account row stays locked for the rest of the transaction: every
/// change takes the lock, so changes to one account are serialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::service) enum RowLock {
    Hold,
    Skip,
}

/// What a successful authorisation established.
pub(in crate::service) struct Granted {
    pub(in crate::service) user_id: Uuid,
    pub(in crate::service) account: TradingAccount,
    pub(in crate::service) access: Access,
}

/// Why access was refused: the error the client sees and the reason the audit
/// row records.
pub(in crate::service) struct Denial {
    error: ServiceError,
    reason: &'static str,
    decided_by: Option<String>,
}

impl Denial {
    pub(in crate::service) fn hidden(reason: &'static str) -> Self {
        Self {
            error: ServiceError::NotFound("trading account"),
            reason,
            decided_by: None,
        }
    }

    pub(in crate::service) fn forbidden(reason: &'static str, detail: &str) -> Self {
        Self {
            error: ServiceError::Forbidden(detail.into()),
            reason,
            decided_by: None,
        }
    }
}

/// A use case on one account whose caller passed `open`: its transaction, what
/// the caller holds, and the caller's words for the audit rows. Dropped without
/// `commit`, everything in it rolls back.
pub(in crate::service) struct Authorised<'a> {
    accounts: &'a AccountsService,
    caller: &'a Caller,
    meta: &'a RequestMeta,
    id: Uuid,
    need: Permission,
    pub(in crate::service) tx: Tx,
    pub(in crate::service) granted: Granted,
}

impl Authorised<'_> {
    /// A refusal found after authorisation (a rule of the use case): its audit
    /// row commits, and the refusal is returned.
    pub(in crate::service) async fn refuse<T>(mut self, d: Denial) -> ServiceResult<T> {
        let err = self
            .accounts
            .record_denial(
                &mut self.tx,
                self.caller,
                self.meta,
                Some(self.id),
                self.need.as_str(),
                d,
            )
            .await;
        self.tx.commit().await?;
        Err(err)
    }

    /// Writes the success row of the change, about this account, in the
    /// transaction.
    pub(in crate::service) async fn audit(
        &mut self,
        action: &str,
        details: Value,
    ) -> ServiceResult<()> {
        let entry = AuditEntry::new(action, Outcome::Success)
            .by(self.caller)
            .meta(self.meta)
            .target(TARGET, self.id)
            .details(details);
        Ok(self.tx.audit(&entry).await?)
    }

    pub(in crate::service) async fn commit(self) -> ServiceResult<Granted> {
        self.tx.commit().await?;
        Ok(self.granted)
    }
}

impl AccountsService {
    /// The prologue of every use case on one account: opens the transaction and
    /// authorises the caller for `need` (see `authorize`); a refusal commits its
    /// audit row and comes back as the error. With `RowLock::Hold` the account
    /// row stays locked until the use case commits.
    pub(in crate::service) async fn open<'a>(
        &'a self,
        caller: &'a Caller,
        meta: &'a RequestMeta,
        id: Uuid,
        need: Permission,
        lock: RowLock,
    ) -> ServiceResult<Authorised<'a>> {
        let mut tx = self.db.begin().await?;
        match self
            .authorize(&mut tx, caller, meta, id, need, lock)
            .await?
        {
            Ok(granted) => Ok(Authorised {
                accounts: self,
                caller,
                meta,
                id,
                need,
                tx,
                granted,
            }),
            Err(err) => {
                tx.commit().await?;
                Err(err)
            }
        }
    }

    /// Scope and role checks that do not depend on an account: the caller is a
    /// user, their key (if any) carries `scope`, and their roles' policies allow
    /// it. Records a denial.
    pub(super) async fn authorize_scope(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        scope: &'static str,
        account: Option<Uuid>,
    ) -> ServiceResult<Uuid> {
        match self.scope_check(caller, scope, account).await? {
            Ok(user_id) => Ok(user_id),
            Err(d) => Err(self.deny_now(caller, meta, account, scope, d).await),
        }
    }

    async fn scope_check(
        &self,
        caller: &Caller,
        scope: &'static str,
        account: Option<Uuid>,
    ) -> ServiceResult<Result<Uuid, Denial>> {
        let resource = account.map(account_resource).unwrap_or(Resource::Any);
        Ok(
            match self.policy.user_scope(caller, scope, &resource).await? {
                Ok(user_id) => Ok(user_id),
                Err(r @ ScopeRefusal::NotAUser) => Err(Denial::forbidden(
                    r.reason(),
                    "trading accounts are managed by users",
                )),
                Err(r @ ScopeRefusal::KeyScope) => Err(Denial::forbidden(
                    r.reason(),
                    &format!("this API key lacks the {scope} scope"),
                )),
                Err(ScopeRefusal::Policy { decided_by }) => Err(Denial {
                    decided_by: Some(decided_by),
                    ..Denial::forbidden("policy", &format!("your roles do not allow {scope}"))
                }),
            },
        )
    }

    /// Everything a request on one account needs: scope (read → accounts:read,
    /// trade/manage → accounts:write), roles' policies, the key's account list,
    /// then the caller's standing on the account. A caller without standing gets
    /// the same NotFound as for a missing id. `Err` inside `Ok` is a denial,
    /// already recorded in `tx`.
    async fn authorize(
        &self,
        tx: &mut Tx,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        need: Permission,
        lock: RowLock,
    ) -> ServiceResult<Result<Granted, ServiceError>> {
        let scope = match need {
            Permission::Read => "accounts:read",
            Permission::Trade | Permission::Manage => "accounts:write",
        };
        // An API key acts on the account only as far as its owner's access
        // covers the scope the request uses (the table VerifyApiKey uses too).
        let need = need.max(scope::account_permission(scope));
        let denial = match self.scope_check(caller, scope, Some(id)).await? {
            Err(d) => d,
            Ok(user_id) => {
                let loaded = store::get_with_access(tx, user_id, id, lock == RowLock::Hold).await?;
                match loaded {
                    _ if key_accounts(caller).is_some_and(|ids| !ids.contains(&id)) => {
                        Denial::hidden("key_account_restriction")
                    }
                    None => Denial::hidden("unknown_or_deleted"),
                    Some((_, None)) => Denial::hidden("not_member"),
                    Some((_, Some(access))) if !access.allows(need) => Denial {
                        decided_by: Some(access.rule()),
                        ..Denial::forbidden(
                            "insufficient_role",
                            &format!("your access ({}) does not include {need}", access.as_str()),
                        )
                    },
                    Some((account, Some(access))) => {
                        return Ok(Ok(Granted {
                            user_id,
                            account,
                            access,
                        }))
                    }
                }
            }
        };
        Ok(Err(self
            .record_denial(tx, caller, meta, Some(id), need.as_str(), denial)
            .await))
    }

    /// Records a refusal found before any transaction was needed, in one of its
    /// own, and returns the refusal.
    pub(super) async fn deny_now(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        account: Option<Uuid>,
        need: &str,
        d: Denial,
    ) -> ServiceError {
        let mut tx = match self.db.begin().await {
            Ok(tx) => tx,
            Err(e) => return e.into(),
        };
        let err = self
            .record_denial(&mut tx, caller, meta, account, need, d)
            .await;
        match tx.commit().await {
            Ok(()) => err,
            Err(e) => e.into(),
        }
    }

    /// Writes the `authz.denied` row (the first ones of a stream: see
    /// `DenialAudit`) and returns the error the client gets. If the row cannot
    /// be written the request fails anyway, so nothing is lost silently.
    async fn record_denial(
        &self,
        tx: &mut Tx,
        caller: &Caller,
        meta: &RequestMeta,
        account: Option<Uuid>,
        need: &str,
        d: Denial,
    ) -> ServiceError {
        let mut entry = AuditEntry::new("authz.denied", Outcome::Denied)
            .by(caller)
            .meta(meta)
            .details(json!({
                "reason": d.reason,
                "need": need,
                "decided_by": d.decided_by,
                "user_id": caller.user_id(),
            }));
        if let Some(id) = account {
            entry = entry.target(TARGET, id);
        }
        match self.policy.denials.write(tx, entry).await {
            Ok(()) => d.error,
            Err(e) => ServiceError::from(e),
        }
    }
}
