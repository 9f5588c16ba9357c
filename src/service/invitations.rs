//! Membership with consent: a manager invites, the invitee accepts or declines.
//! Inviting answers the same whether or not the email is registered, and nobody
//! becomes a member of someone else's account without saying yes.

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use super::accounts::{AccountsService, Denial, RowLock};
use super::audit::{AuditEntry, Outcome};
use super::paging::{Page, PageQuery};
use super::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::domain::account::{Access, AccountAccess, MemberRole, MemberTarget, Permission};
use crate::domain::invitation::{Invitation, InvitationStatus, ReceivedInvitation, INVITATION_TTL};
use crate::store::accounts as accounts_store;
use crate::store::invitations::{self as store, NewInvitation};
use crate::store::{Db, Tx};

const TARGET: &str = "trading_account";

#[derive(Clone)]
pub struct InvitationsService {
    db: Db,
    accounts: AccountsService,
}

impl InvitationsService {
    pub fn new(db: Db, accounts: AccountsService) -> Self {
        Self { db, accounts }
    }

    // ---- the account's side: owner or manager --------------------------------

    /// Invites a user (by id) or an email to the account with `role`, never above
    /// the inviter's own. Registered or not, an email gets the same answer.
    pub async fn invite(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        account_id: Uuid,
        target: MemberTarget,
        role: MemberRole,
    ) -> ServiceResult<Invitation> {
        // Member add is a step-up operation: refused until the email is verified.
        self.accounts.require_verified(caller).await?;
        self.accounts
            .step_up
            .require_step_up(caller, meta, "membership.add")
            .await?;
        let mut op = self
            .accounts
            .open(caller, meta, account_id, Permission::Manage, RowLock::Hold)
            .await?;
        let inviter = op.granted.user_id;
        if !op.granted.access.may_grant(role) {
            return op
                .refuse(Denial::forbidden(
                    "grant_above_own_role",
                    "cannot grant a role above your own",
                ))
                .await;
        }
        let (invitee, email) = match &target {
            // An id is not guessable and was shown to the caller somewhere: an
            // unknown one is a plain 404.
            MemberTarget::UserId(u) => {
                let (id, email) = accounts_store::find_active_user(&mut op.tx, Some(*u), None)
                    .await?
                    .ok_or(ServiceError::NotFound("user"))?;
                (Some(id), email.to_lowercase())
            }
            MemberTarget::Email(e) => {
                let found = accounts_store::find_active_user(&mut op.tx, None, Some(e.as_str()))
                    .await?
                    .map(|(id, _)| id);
                (found, e.as_str().to_string())
            }
        };
        if let Some(user) = invitee {
            // Neither says more than the caller knows: they are themselves, and
            // a manager sees every member in the members list.
            if user == inviter {
                return Err(ServiceError::Conflict(
                    "you already have access to this account".into(),
                ));
            }
            if accounts_store::member_role_for_update(&mut op.tx, account_id, user)
                .await?
                .is_some()
            {
                return Err(ServiceError::Conflict("user is already a member".into()));
            }
        }
        store::expire_stale(&mut op.tx, account_id, &email).await?;
        let invitation = store::insert(
            &mut op.tx,
            &NewInvitation {
                id: Uuid::now_v7(),
                account_id,
                email: &email,
                invitee_user_id: invitee,
                role,
                invited_by: inviter,
                expires_at: Utc::now() + INVITATION_TTL,
            },
        )
        .await?;
        op.audit(
            "membership.invited",
            json!({
                "invitation_id": invitation.id,
                "role": role.as_str(),
                "invitee_user_id": invitee,
            }),
        )
        .await?;
        queue_invitation_notice(&mut op.tx, &invitation).await?;
        op.commit().await?;
        Ok(invitation)
    }

    /// The account's pending invitations: owner or manager (they name emails).
    pub async fn pending(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        account_id: Uuid,
        page: PageQuery,
    ) -> ServiceResult<Page<Invitation>> {
        let page = page.parse()?;
        self.accounts
            .open(caller, meta, account_id, Permission::Manage, RowLock::Skip)
            .await?
            .commit()
            .await?;
        let rows =
            store::pending_for_account(&self.db, account_id, page.after, page.fetch()).await?;
        Ok(page.page(rows, |i| (i.created_at, i.id)))
    }

    /// Withdraws a pending invitation (owner, or a manager for roles up to their own).
    pub async fn revoke(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        account_id: Uuid,
        id: Uuid,
    ) -> ServiceResult<()> {
        let mut op = self
            .accounts
            .open(caller, meta, account_id, Permission::Manage, RowLock::Hold)
            .await?;
        let inv = store::lock_pending_of_account(&mut op.tx, account_id, id)
            .await?
            .ok_or(ServiceError::NotFound("invitation"))?;
        if !op.granted.access.may_grant(inv.role) {
            return op
                .refuse(Denial::forbidden(
                    "grant_above_own_role",
                    "cannot withdraw an invitation to a role above your own",
                ))
                .await;
        }
        store::close(&mut op.tx, id, InvitationStatus::Revoked, None).await?;
        op.audit(
            "membership.invitation_revoked",
            json!({ "invitation_id": id, "role": inv.role.as_str() }),
        )
        .await?;
        op.commit().await?;
        Ok(())
    }

    // ---- the invitee's side: in person ---------------------------------------

    /// The caller's pending invitations, oldest first.
    pub async fn received(
        &self,
        caller: &Caller,
        page: PageQuery,
    ) -> ServiceResult<Page<ReceivedInvitation>> {
        let user_id = in_person(caller)?;
        let page = page.parse()?;
        let rows = store::pending_for_invitee(&self.db, user_id, page.after, page.fetch()).await?;
        Ok(page.page(rows, |i| (i.created_at, i.id)))
    }

    /// Accepting makes the caller a member with the invited role, if the
    /// invitation still stands: unexpired, the account live, and its inviter still
    /// allowed to grant that role (judged after the account lock, like every
    /// other membership change).
    pub async fn accept(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<AccountAccess> {
        let user_id = in_person(caller)?;
        let mut tx = self.db.begin().await?;
        // Account lock first, then the invitation, the order revoke takes them in.
        let account_id = store::pending_of_invitee(&mut tx, user_id, id, false)
            .await?
            .ok_or(ServiceError::NotFound("invitation"))?
            .account_id;
        let live = accounts_store::lock_live(&mut tx, account_id).await?;
        let inv = store::pending_of_invitee(&mut tx, user_id, id, true)
            .await?
            .ok_or(ServiceError::NotFound("invitation"))?;
        if inv.expired(Utc::now()) {
            return self
                .void(
                    tx,
                    id,
                    InvitationStatus::Expired,
                    "the invitation has expired",
                )
                .await;
        }
        let mut granted_by = None;
        if let (true, Some(by)) = (live, inv.invited_by) {
            let inviter = accounts_store::get_with_access(&mut tx, by, account_id, false)
                .await?
                .and_then(|(_, access)| access);
            if inviter.is_some_and(|a| a.may_grant(inv.role)) {
                granted_by = Some(by);
            }
        }
        let Some(granted_by) = granted_by else {
            return self
                .void(
                    tx,
                    id,
                    InvitationStatus::Revoked,
                    "the invitation is no longer valid",
                )
                .await;
        };
        let (account, access) =
            accounts_store::get_with_access(&mut tx, user_id, account_id, false)
                .await?
                .ok_or(ServiceError::NotFound("invitation"))?;
        if access.is_some() {
            return Err(ServiceError::Conflict(
                "you already have access to this account".into(),
            ));
        }
        accounts_store::add_member(&mut tx, account_id, user_id, inv.role, granted_by).await?;
        store::close(&mut tx, id, InvitationStatus::Accepted, Some(user_id)).await?;
        tx.audit(
            &AuditEntry::new("membership.added", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target(TARGET, account_id)
                .details(json!({
                    "user_id": user_id,
                    "role": inv.role.as_str(),
                    "invitation_id": id,
                    "invited_by": inv.invited_by,
                })),
        )
        .await?;
        tx.commit().await?;
        self.accounts.membership_changed(account_id, user_id).await;
        Ok(AccountAccess {
            account,
            access: Access::Member(inv.role),
        })
    }

    pub async fn decline(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<()> {
        let user_id = in_person(caller)?;
        let mut tx = self.db.begin().await?;
        let inv = store::pending_of_invitee(&mut tx, user_id, id, true)
            .await?
            .ok_or(ServiceError::NotFound("invitation"))?;
        store::close(&mut tx, id, InvitationStatus::Declined, Some(user_id)).await?;
        tx.audit(
            &AuditEntry::new("membership.invitation_declined", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target(TARGET, inv.account_id)
                .details(json!({
                    "invitation_id": id,
                    "role": inv.role.as_str(),
                    "invited_by": inv.invited_by,
                })),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Closes an invitation that no longer stands and answers 409 with why.
    async fn void<T>(
        &self,
        mut tx: Tx,
        id: Uuid,
        status: InvitationStatus,
        why: &str,
    ) -> ServiceResult<T> {
        store::close(&mut tx, id, status, None).await?;
        tx.commit().await?;
        Err(ServiceError::Conflict(why.into()))
    }
}

/// Consent is given in person: with a session, not an API key or a service.
fn in_person(caller: &Caller) -> ServiceResult<Uuid> {
    match caller {
        Caller::User {
            user_id, key: None, ..
        } => Ok(*user_id),
        Caller::User { key: Some(_), .. } => Err(ServiceError::Forbidden(
            "invitations are answered with a session, not an API key".into(),
        )),
        Caller::ServiceClient { .. } => Err(ServiceError::Forbidden(
            "invitations are answered by users".into(),
        )),
    }
}

/// The seam for delivery: when the notification outbox lands (DESIGN §8), the
/// `account_invitation` message to `invitation.email` is written here, in the
/// transaction that creates the invitation. Until then the invitee finds it in
/// `GET /v1/users/me/invitations`.
async fn queue_invitation_notice(_tx: &mut Tx, _invitation: &Invitation) -> ServiceResult<()> {
    Ok(())
}
