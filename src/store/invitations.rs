//! Invitations to trading accounts. The invitee's side matches by user id, or by
//! the user's current email for invitations made before they signed up.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::accounts::After;
use super::{Db, StoreError, StoreResult, Tx};
use crate::domain::account::MemberRole;
use crate::domain::invitation::{Invitation, InvitationStatus, ReceivedInvitation};

const COLUMNS: &str = "i.id, i.trading_account_id, i.email, i.invitee_user_id, i.role,
    i.invited_by, i.status, i.created_at, i.expires_at";

/// Pending invitations addressed to user `$1`.
const FOR_INVITEE: &str = "i.status = 'pending'
    and (i.invitee_user_id = $1
         or (i.invitee_user_id is null
             and i.email = (select lower(u.email) from users u where u.id = $1)))";

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    trading_account_id: Uuid,
    email: String,
    invitee_user_id: Option<Uuid>,
    role: String,
    invited_by: Option<Uuid>,
    status: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!(
        "trading_account_invitations holds {what} {value:?}"
    ))
}

fn role(s: &str) -> StoreResult<MemberRole> {
    MemberRole::parse(s).map_err(|_| corrupt("role", s))
}

impl TryFrom<Row> for Invitation {
    type Error = StoreError;
    fn try_from(r: Row) -> StoreResult<Self> {
        Ok(Invitation {
            role: role(&r.role)?,
            status: InvitationStatus::parse(&r.status)
                .ok_or_else(|| corrupt("status", &r.status))?,
            id: r.id,
            account_id: r.trading_account_id,
            email: r.email,
            invitee_user_id: r.invitee_user_id,
            invited_by: r.invited_by,
            created_at: r.created_at,
            expires_at: r.expires_at,
        })
    }
}

pub struct NewInvitation<'a> {
    pub id: Uuid,
    pub account_id: Uuid,
    pub email: &'a str,
    pub invitee_user_id: Option<Uuid>,
    pub role: MemberRole,
    pub invited_by: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// Marks pending invitations of this email on this account that have expired, so
/// the one-pending-invitation index lets a new one in.
pub async fn expire_stale(tx: &mut Tx, account_id: Uuid, email: &str) -> StoreResult<()> {
    sqlx::query(
        "update trading_account_invitations set status = 'expired', updated_at = now()
          where trading_account_id = $1 and email = $2 and status = 'pending' and expires_at <= now()",
    )
    .bind(account_id)
    .bind(email)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A new pending invitation; one already pending for the email → Conflict.
pub async fn insert(tx: &mut Tx, n: &NewInvitation<'_>) -> StoreResult<Invitation> {
    let row: Row = sqlx::query_as(&format!(
        "insert into trading_account_invitations as i
                (id, trading_account_id, email, invitee_user_id, role, invited_by, expires_at)
         values ($1, $2, $3, $4, $5, $6, $7) returning {COLUMNS}"
    ))
    .bind(n.id)
    .bind(n.account_id)
    .bind(n.email)
    .bind(n.invitee_user_id)
    .bind(n.role.as_str())
    .bind(n.invited_by)
    .bind(n.expires_at)
    .fetch_one(&mut **tx)
    .await?;
    row.try_into()
}

/// An account's pending, unexpired invitations, oldest first.
pub async fn pending_for_account(
    db: &Db,
    account_id: Uuid,
    after: Option<After>,
    limit: i64,
) -> StoreResult<Vec<Invitation>> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select {COLUMNS} from trading_account_invitations i
          where i.trading_account_id = $1 and i.status = 'pending' and i.expires_at > now()
            and ($2::timestamptz is null or (i.created_at, i.id) > ($2, $3))
          order by i.created_at, i.id
          limit $4"
    ))
    .bind(account_id)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    rows.into_iter().map(Invitation::try_from).collect()
}

/// One pending invitation of an account, locked for the rest of the transaction.
pub async fn lock_pending_of_account(
    tx: &mut Tx,
    account_id: Uuid,
    id: Uuid,
) -> StoreResult<Option<Invitation>> {
    let row: Option<Row> = sqlx::query_as(&format!(
        "select {COLUMNS} from trading_account_invitations i
          where i.id = $1 and i.trading_account_id = $2 and i.status = 'pending'
          for update"
    ))
    .bind(id)
    .bind(account_id)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(Invitation::try_from).transpose()
}

/// One pending invitation addressed to the user (expired ones too: the caller
/// tells them apart); with `lock`, locked for the rest of the transaction.
pub async fn pending_of_invitee(
    tx: &mut Tx,
    user_id: Uuid,
    id: Uuid,
    lock: bool,
) -> StoreResult<Option<Invitation>> {
    let lock = if lock { "for update" } else { "" };
    let row: Option<Row> = sqlx::query_as(&format!(
        "select {COLUMNS} from trading_account_invitations i
          where {FOR_INVITEE} and i.id = $2 {lock}"
    ))
    .bind(user_id)
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(Invitation::try_from).transpose()
}

#[derive(sqlx::FromRow)]
struct ReceivedRow {
    id: Uuid,
    trading_account_id: Uuid,
    broker: String,
    nickname: String,
    role: String,
    invited_by_email: Option<String>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

/// The user's pending, unexpired invitations to live accounts, oldest first.
pub async fn pending_for_invitee(
    db: &Db,
    user_id: Uuid,
    after: Option<After>,
    limit: i64,
) -> StoreResult<Vec<ReceivedInvitation>> {
    let rows: Vec<ReceivedRow> = sqlx::query_as(&format!(
        "select i.id, i.trading_account_id, a.broker, a.nickname, i.role,
                inviter.email as invited_by_email, i.created_at, i.expires_at
           from trading_account_invitations i
           join trading_accounts a on a.id = i.trading_account_id and a.deleted_at is null
           left join users inviter on inviter.id = i.invited_by
          where {FOR_INVITEE} and i.expires_at > now()
            and ($2::timestamptz is null or (i.created_at, i.id) > ($2, $3))
          order by i.created_at, i.id
          limit $4"
    ))
    .bind(user_id)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(ReceivedInvitation {
                role: role(&r.role)?,
                id: r.id,
                account_id: r.trading_account_id,
                broker: r.broker,
                nickname: r.nickname,
                invited_by_email: r.invited_by_email,
                created_at: r.created_at,
                expires_at: r.expires_at,
            })
        })
        .collect()
}

/// Closes a pending invitation; `invitee` records who answered it.
pub async fn close(
    tx: &mut Tx,
    id: Uuid,
    status: InvitationStatus,
    invitee: Option<Uuid>,
) -> StoreResult<()> {
    let done = sqlx::query(
        "update trading_account_invitations
            set status = $2, invitee_user_id = coalesce($3, invitee_user_id),
                responded_at = now(), updated_at = now()
          where id = $1 and status = 'pending'",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(invitee)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound("invitation"));
    }
    Ok(())
}
