//! Shared access to an account: its members, their roles, their removal.
//! Nobody raises their own role, grants above their own, or acts on someone
//! above them; joining is by invitation (`service::invitations`).

use serde_json::json;
use uuid::Uuid;

use super::authz::{Denial, RowLock};
use super::AccountsService;
use crate::domain::account::{Access, Member, MemberRole, Permission};
use crate::service::paging::{Page, PageQuery};
use crate::service::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::store::accounts as store;

impl AccountsService {
    pub async fn list_members(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        page: PageQuery,
    ) -> ServiceResult<Page<Member>> {
        let page = page.parse()?;
        self.open(caller, meta, id, Permission::Read, RowLock::Skip)
            .await?
            .commit()
            .await?;
        let rows = store::list_members(&self.db, id, page.after, page.fetch()).await?;
        Ok(page.page(rows, |m| (m.added_at, m.user_id)))
    }

    /// Owner or manager. Nobody raises their own role, grants above their own,
    /// or changes the role of someone above them.
    pub async fn change_member_role(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        member: Uuid,
        role: MemberRole,
    ) -> ServiceResult<Member> {
        self.require_verified(caller).await?;
        self.step_up
            .require_step_up(caller, meta, "membership.role_change")
            .await?;
        let mut op = self
            .open(caller, meta, id, Permission::Manage, RowLock::Hold)
            .await?;
        let current = store::member_role_for_update(&mut op.tx, id, member)
            .await?
            .ok_or(ServiceError::NotFound("member"))?;
        let access = op.granted.access;
        let refusal = if member == op.granted.user_id && role > current {
            Some(("raise_own_role", "cannot raise your own role"))
        } else if !access.may_grant(role) {
            Some(("grant_above_own_role", "cannot grant a role above your own"))
        } else if matches!(access, Access::Member(own) if current > own) {
            Some((
                "member_above_own_role",
                "cannot change the role of a member above you",
            ))
        } else {
            None
        };
        if let Some((reason, detail)) = refusal {
            return op.refuse(Denial::forbidden(reason, detail)).await;
        }
        let updated = store::set_member_role(&mut op.tx, id, member, role).await?;
        if current != role {
            op.audit(
                "membership.role_changed",
                json!({
                    "user_id": member,
                    "from": current.as_str(),
                    "to": role.as_str(),
                }),
            )
            .await?;
        }
        op.commit().await?;
        self.membership_changed(id, member).await;
        Ok(updated)
    }

    /// A member may always leave; otherwise owner or manager, and not someone
    /// above the remover. Takes effect at once on every replica.
    pub async fn remove_member(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        member: Uuid,
    ) -> ServiceResult<()> {
        let leaving = caller.user_id() == Some(member);
        // Leaving gives nothing away: only removing someone else is a step-up operation.
        if !leaving {
            self.require_verified(caller).await?;
            self.step_up
                .require_step_up(caller, meta, "membership.remove")
                .await?;
        }
        let need = if leaving {
            Permission::Read
        } else {
            Permission::Manage
        };
        let mut op = self.open(caller, meta, id, need, RowLock::Hold).await?;
        let current = store::member_role_for_update(&mut op.tx, id, member)
            .await?
            .ok_or(ServiceError::NotFound("member"))?;
        if !leaving && matches!(op.granted.access, Access::Member(own) if current > own) {
            return op
                .refuse(Denial::forbidden(
                    "member_above_own_role",
                    "cannot remove a member above you",
                ))
                .await;
        }
        store::remove_member(&mut op.tx, id, member).await?;
        op.audit(
            "membership.removed",
            json!({
                "user_id": member,
                "role": current.as_str(),
                "left": leaving,
            }),
        )
        .await?;
        op.commit().await?;
        self.membership_changed(id, member).await;
        Ok(())
    }
}
