-- Initial schema (the seed's alembic 001): users, roles, policies, service clients,
-- trading accounts, memberships and the append-only, hash-chained audit log.

create table users (
    id            uuid primary key,
    email         text not null,
    full_name     text not null,
    password_hash text,
    status        text not null default 'active',
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    constraint users_status_check check (status in ('active', 'disabled')),
    constraint users_email_check check (char_length(email) between 3 and 320),
    constraint users_full_name_check check (char_length(full_name) between 1 and 200)
);
-- Emails are unique whatever their case.
create unique index users_email_lower_key on users (lower(email));

create table roles (
    id          uuid primary key,
    name        text not null,
    description text not null default '',
    created_at  timestamptz not null default now(),
    constraint roles_name_key unique (name)
);

create table user_roles (
    user_id    uuid not null,
    role_id    uuid not null,
    granted_at timestamptz not null default now(),
    constraint user_roles_pkey primary key (user_id, role_id),
    constraint user_roles_user_id_fkey foreign key (user_id) references users (id) on delete cascade,
    constraint user_roles_role_id_fkey foreign key (role_id) references roles (id) on delete cascade
);
create index user_roles_role_id_idx on user_roles (role_id);

-- A policy allows or denies actions (scope names, '*' for all) on resources
-- ('<type>:<id>', '<type>:*' or '*'). Deny wins over allow.
create table policies (
    id          uuid primary key,
    name        text not null,
    effect      text not null,
    actions     text[] not null,
    resources   text[] not null default '{*}',
    description text not null default '',
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    constraint policies_name_key unique (name),
    constraint policies_effect_check check (effect in ('allow', 'deny'))
);

create table role_policies (
    role_id   uuid not null,
    policy_id uuid not null,
    constraint role_policies_pkey primary key (role_id, policy_id),
    constraint role_policies_role_id_fkey foreign key (role_id) references roles (id) on delete cascade,
    constraint role_policies_policy_id_fkey foreign key (policy_id) references policies (id) on delete cascade
);

-- Internal callers (backend, alert, calendar, ticker). The secret is stored only as
-- an argon2id hash; a client without one cannot authenticate until an operator
-- issues a secret with `admin rotate-service-client-secret`.
create table service_clients (
    id                uuid primary key,
    client_id         text not null,
    name              text not null,
    scopes            text[] not null default '{}',
    secret_hash       text,
    status            text not null default 'active',
    secret_rotated_at timestamptz,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    constraint service_clients_client_id_key unique (client_id),
    constraint service_clients_client_id_check check (client_id ~ '^[a-z][a-z0-9_-]{1,63}$'),
    constraint service_clients_status_check check (status in ('active', 'disabled'))
);

create table trading_accounts (
    id             uuid primary key,
    owner_user_id  uuid not null,
    broker         text not null,
    broker_user_id text not null,
    nickname       text not null default '',
    status         text not null default 'active',
    created_at     timestamptz not null default now(),
    updated_at     timestamptz not null default now(),
    deleted_at     timestamptz,
    constraint trading_accounts_owner_user_id_fkey foreign key (owner_user_id) references users (id) on delete restrict,
    constraint trading_accounts_broker_check check (broker ~ '^[a-z][a-z0-9_]{1,31}$'),
    constraint trading_accounts_broker_user_id_check check (char_length(broker_user_id) between 1 and 128),
    constraint trading_accounts_nickname_check check (char_length(nickname) <= 100),
    constraint trading_accounts_status_check check (status in ('active', 'inactive', 'deleted'))
);
create index trading_accounts_owner_user_id_idx on trading_accounts (owner_user_id) where deleted_at is null;
-- One live account per broker login per owner.
create unique index trading_accounts_owner_broker_key
    on trading_accounts (owner_user_id, broker, broker_user_id) where deleted_at is null;

create table trading_account_memberships (
    id                 uuid primary key,
    trading_account_id uuid not null,
    user_id            uuid not null,
    role               text not null,
    granted_by         uuid,
    created_at         timestamptz not null default now(),
    updated_at         timestamptz not null default now(),
    revoked_at         timestamptz,
    constraint trading_account_memberships_account_fkey foreign key (trading_account_id) references trading_accounts (id) on delete cascade,
    constraint trading_account_memberships_user_fkey foreign key (user_id) references users (id) on delete cascade,
    constraint trading_account_memberships_granted_by_fkey foreign key (granted_by) references users (id) on delete set null,
    constraint trading_account_memberships_role_check check (role in ('viewer', 'trader', 'manager'))
);
-- At most one live membership per (account, user): concurrent adds race on this.
create unique index trading_account_memberships_active_key
    on trading_account_memberships (trading_account_id, user_id) where revoked_at is null;
create index trading_account_memberships_user_idx
    on trading_account_memberships (user_id) where revoked_at is null;

create table audit_logs (
    id          bigint generated always as identity primary key,
    chain_seq   bigint not null,
    occurred_at timestamptz not null default now(),
    actor_type  text not null,
    actor_id    text,
    action      text not null,
    target_type text,
    target_id   text,
    outcome     text not null,
    ip          text,
    user_agent  text,
    details     jsonb not null default '{}',
    prev_hash   bytea,
    row_hash    bytea not null,
    constraint audit_logs_chain_seq_key unique (chain_seq),
    constraint audit_logs_actor_type_check check (actor_type in ('user', 'service_client', 'api_key', 'system', 'anonymous')),
    constraint audit_logs_outcome_check check (outcome in ('success', 'failure', 'denied')),
    constraint audit_logs_action_check check (action ~ '^[a-z_]+(\.[a-z_]+)+$')
);
create index audit_logs_occurred_at_idx on audit_logs (occurred_at desc, id desc);
create index audit_logs_actor_id_idx on audit_logs (actor_id, occurred_at desc);
create index audit_logs_target_id_idx on audit_logs (target_id, occurred_at desc);
create index audit_logs_action_idx on audit_logs (action, occurred_at desc);

-- Chains each row to the previous one. The advisory lock serialises writers for the
-- rest of their transaction, so chain_seq follows commit order and no two rows share
-- a predecessor; row_hash covers every column a reader relies on.
create function audit_logs_chain() returns trigger
language plpgsql as $$
declare
    last_seq  bigint;
    last_hash bytea;
begin
    perform pg_advisory_xact_lock(7243516601);
    select chain_seq, row_hash into last_seq, last_hash
      from audit_logs order by chain_seq desc limit 1;
    new.chain_seq := coalesce(last_seq, 0) + 1;
    new.prev_hash := last_hash;
    new.row_hash := sha256(
        coalesce(last_hash, '\x'::bytea) || convert_to(concat_ws(E'\x1f',
            new.chain_seq::text, to_char(new.occurred_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
            new.actor_type, coalesce(new.actor_id, ''), new.action,
            coalesce(new.target_type, ''), coalesce(new.target_id, ''), new.outcome,
            coalesce(new.ip, ''), coalesce(new.user_agent, ''), new.details::text), 'UTF8'));
    return new;
end;
$$;

create trigger audit_logs_chain_trg
    before insert on audit_logs
    for each row execute function audit_logs_chain();

create function audit_logs_reject_change() returns trigger
language plpgsql as $$
begin
    raise exception 'audit_logs is append-only: % refused', tg_op
        using errcode = 'insufficient_privilege';
end;
$$;

create trigger audit_logs_no_update_delete
    before update or delete on audit_logs
    for each row execute function audit_logs_reject_change();

create trigger audit_logs_no_truncate
    before truncate on audit_logs
    for each statement execute function audit_logs_reject_change();
