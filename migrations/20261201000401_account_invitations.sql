-- Membership with consent: a manager invites an email (or a known user) to a
-- trading account; the membership exists only once the invitee accepts. The same
-- answer is given whether or not the email is registered, so an invitation may
-- name an email nobody has registered yet (invitee_user_id null until accepted).

create table trading_account_invitations (
    id                 uuid primary key,
    trading_account_id uuid not null,
    -- Lowercased; the registered user's email when invited by user id.
    email              text not null,
    -- Set when the invitee was a registered user at invitation time, or on accept.
    invitee_user_id    uuid,
    role               text not null,
    invited_by         uuid,
    status             text not null default 'pending',
    created_at         timestamptz not null default now(),
    updated_at         timestamptz not null default now(),
    expires_at         timestamptz not null,
    responded_at       timestamptz,
    constraint trading_account_invitations_account_fkey foreign key (trading_account_id) references trading_accounts (id) on delete cascade,
    constraint trading_account_invitations_invitee_fkey foreign key (invitee_user_id) references users (id) on delete cascade,
    constraint trading_account_invitations_invited_by_fkey foreign key (invited_by) references users (id) on delete set null,
    constraint trading_account_invitations_role_check check (role in ('viewer', 'trader', 'manager')),
    constraint trading_account_invitations_status_check check (status in ('pending', 'accepted', 'declined', 'revoked', 'expired')),
    constraint trading_account_invitations_email_check check (email = lower(email) and char_length(email) between 3 and 320)
);
-- One pending invitation per (account, email): concurrent invitations race on this.
create unique index trading_account_invitations_pending_key
    on trading_account_invitations (trading_account_id, email) where status = 'pending';
-- The invitee's list: by user id, or by email for invitations made before sign-up.
create index trading_account_invitations_invitee_idx
    on trading_account_invitations (invitee_user_id) where status = 'pending';
create index trading_account_invitations_email_idx
    on trading_account_invitations (email) where status = 'pending';
