//! Roles → role_policies → policies, and service clients' scopes, as the policy
//! engine needs them.

use uuid::Uuid;

use super::{Db, StoreError, StoreResult};
use crate::domain::policy::{Effect, Policy};

#[derive(sqlx::FromRow)]
struct PolicyRow {
    name: String,
    effect: String,
    actions: Vec<String>,
    resources: Vec<String>,
}

impl TryFrom<PolicyRow> for Policy {
    type Error = StoreError;
    fn try_from(r: PolicyRow) -> Result<Self, StoreError> {
        let effect = Effect::parse(&r.effect).ok_or_else(|| {
            StoreError::Other(anyhow::anyhow!(
                "policy {} has effect {:?}",
                r.name,
                r.effect
            ))
        })?;
        Ok(Policy {
            name: r.name,
            effect,
            actions: r.actions,
            resources: r.resources,
        })
    }
}

/// The policies of an active user's roles; `None` when the user is unknown or
/// disabled (who then holds nothing).
pub async fn for_user(db: &Db, user_id: Uuid) -> StoreResult<Option<Vec<Policy>>> {
    let active: Option<bool> =
        sqlx::query_scalar("select status = 'active' from users where id = $1")
            .bind(user_id)
            .fetch_optional(&db.pool)
            .await?;
    if active != Some(true) {
        return Ok(None);
    }
    let rows: Vec<PolicyRow> = sqlx::query_as(
        "select distinct p.name, p.effect, p.actions, p.resources
           from user_roles ur
           join role_policies rp on rp.role_id = ur.role_id
           join policies p on p.id = rp.policy_id
          where ur.user_id = $1
          order by p.name",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await?;
    rows.into_iter()
        .map(Policy::try_from)
        .collect::<StoreResult<Vec<_>>>()
        .map(Some)
}

/// The policies of the roles named `roles`: what `for_user` finds for an active
/// user holding exactly them.
pub async fn for_roles(db: &Db, roles: &[String]) -> StoreResult<Vec<Policy>> {
    let rows: Vec<PolicyRow> = sqlx::query_as(
        "select distinct p.name, p.effect, p.actions, p.resources
           from roles r
           join role_policies rp on rp.role_id = r.id
           join policies p on p.id = rp.policy_id
          where r.name = any($1)
          order by p.name",
    )
    .bind(roles)
    .fetch_all(&db.pool)
    .await?;
    rows.into_iter().map(Policy::try_from).collect()
}

/// An active service client's scopes; `None` when unknown or disabled.
pub async fn client_scopes(db: &Db, client_id: &str) -> StoreResult<Option<Vec<String>>> {
    Ok(sqlx::query_scalar(
        "select scopes from service_clients where client_id = $1 and status = 'active'",
    )
    .bind(client_id)
    .fetch_optional(&db.pool)
    .await?)
}
