-- Login sessions and their rotating refresh tokens. A session is durable here and
-- cached in Redis; ending it (revoked_at) kills its access tokens at once.
create table sessions (
    id           uuid primary key,
    user_id      uuid not null,
    created_at   timestamptz not null default now(),
    last_seen_at timestamptz not null default now(),
    expires_at   timestamptz not null,
    ip           text,
    user_agent   text,
    revoked_at   timestamptz,
    revoked_reason text,
    constraint sessions_user_id_fkey foreign key (user_id) references users (id) on delete cascade
);
create index sessions_user_id_idx on sessions (user_id, created_at desc) where revoked_at is null;

-- Only the SHA-256 of each refresh token is kept. A token is used once: `used_at`
-- set means a second presentation is reuse, which ends the whole session.
create table refresh_tokens (
    id         uuid primary key,
    session_id uuid not null,
    token_hash bytea not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    used_at    timestamptz,
    constraint refresh_tokens_token_hash_key unique (token_hash),
    constraint refresh_tokens_session_id_fkey foreign key (session_id) references sessions (id) on delete cascade
);
create index refresh_tokens_session_id_idx on refresh_tokens (session_id);
