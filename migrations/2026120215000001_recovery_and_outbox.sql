-- Account recovery and verification (issue 15): verified emails, single-use links,
-- the addresses users signed in from, and the notification outbox the alert service
-- is fed from.

-- Users from before verification existed start unverified: nothing proves they own
-- their address. (`if not exists`: `import-users` may add it too.)
alter table users add column if not exists email_verified boolean not null default false;

-- Profile caches drop on every replica when the verification changes, as they do
-- for the email and the name (migration 2026120100070101).
create or replace function users_invalidate() returns trigger language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        perform invalidate_notify('u:' || old.id);
    elsif new.status is distinct from old.status then
        perform invalidate_notify('u:' || new.id);
    elsif new.email is distinct from old.email or new.full_name is distinct from old.full_name
          or new.email_verified is distinct from old.email_verified then
        perform invalidate_notify('p:' || new.id);
    end if;
    return null;
end $$;

-- Links sent by email (verify an address, confirm a new one, reset a password):
-- only the SHA-256 of each 256-bit token is kept, and a token works once.
create table user_tokens (
    id         uuid primary key,
    user_id    uuid not null references users (id) on delete cascade,
    purpose    text not null,
    token_hash bytea not null,
    -- Where the link was sent: the address it proves (for an email change, the new one).
    email      text not null,
    expires_at timestamptz not null,
    used_at    timestamptz,
    created_at timestamptz not null default now(),
    constraint user_tokens_purpose_check
        check (purpose in ('verify_email', 'change_email', 'reset_password')),
    constraint user_tokens_token_hash_key unique (token_hash)
);
create index user_tokens_live_idx on user_tokens (user_id, purpose) where used_at is null;

-- Where each user signed in from, for the `new_sign_in` notice (an address not seen
-- for this user in 30 days).
create table user_sign_in_ips (
    user_id      uuid not null references users (id) on delete cascade,
    ip           text not null,
    last_seen_at timestamptz not null,
    primary key (user_id, ip)
);

-- The transactional outbox: a row is written in the transaction of the change that
-- causes it, and each replica's dispatcher delivers due rows it can lock (FOR
-- UPDATE SKIP LOCKED), so a message in flight is never sent twice at once.
create table notification_outbox (
    id              uuid primary key,
    template        text not null,
    recipient       text not null,
    user_id         uuid,
    data            jsonb not null default '{}',
    status          text not null default 'pending',
    attempts        integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error      text,
    created_at      timestamptz not null default now(),
    delivered_at    timestamptz,
    constraint notification_outbox_status_check check (status in ('pending', 'delivered', 'dead'))
);
create index notification_outbox_due_idx on notification_outbox (next_attempt_at)
    where status = 'pending';
