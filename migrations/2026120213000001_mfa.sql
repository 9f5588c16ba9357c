-- Second factors (issue 14): TOTP, recovery codes, the pending second step of a
-- login, and how each session was authenticated.

-- One TOTP authenticator per user. The secret is sealed with the credentials key
-- ring (AES-256-GCM, bound to the user; `secret_key_id` names the key, so
-- `admin reencrypt-credentials` can move it). `confirmed_at` null: an enrolment
-- waiting for its first code. `last_used_step`: the highest RFC 6238 time step
-- accepted, so no code is accepted twice.
create table user_totp (
    user_id           uuid primary key,
    secret_ciphertext bytea not null,
    secret_key_id     text not null,
    confirmed_at      timestamptz,
    last_used_step    bigint,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    constraint user_totp_user_id_fkey foreign key (user_id) references users (id) on delete cascade
);

-- Recovery codes: only a SHA-256 of each (the codes carry 60 random bits, so a
-- slow hash buys nothing), each usable once.
create table user_recovery_codes (
    id         uuid primary key,
    user_id    uuid not null,
    code_hash  bytea not null,
    created_at timestamptz not null default now(),
    used_at    timestamptz,
    constraint user_recovery_codes_code_hash_key unique (code_hash),
    constraint user_recovery_codes_user_id_fkey foreign key (user_id) references users (id) on delete cascade
);
create index user_recovery_codes_user_id_idx on user_recovery_codes (user_id) where used_at is null;

-- A login whose password was right and which waits for its second factor: the
-- `mfa_token` (only its SHA-256) lives 300 s and completes one login.
create table mfa_challenges (
    id         uuid primary key,
    token_hash bytea not null,
    user_id    uuid not null,
    amr        text[] not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    used_at    timestamptz,
    ip         text,
    user_agent text,
    constraint mfa_challenges_token_hash_key unique (token_hash),
    constraint mfa_challenges_user_id_fkey foreign key (user_id) references users (id) on delete cascade
);
create index mfa_challenges_expires_at_idx on mfa_challenges (expires_at);

-- How the session was authenticated (RFC 8176 `amr` values) and when the user
-- last proved it (`auth_time`): access tokens carry both, step-up reads them.
alter table sessions add column amr text[] not null default '{pwd}';
alter table sessions add column auth_time timestamptz;
update sessions set auth_time = created_at;
alter table sessions alter column auth_time set default now();
alter table sessions alter column auth_time set not null;
