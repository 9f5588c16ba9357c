-- API keys (the seed's 005). Only a keyed hash of the key is stored; `prefix` is
-- the displayable start of the key so users can tell keys apart.
create table api_keys (
    id                    uuid primary key,
    user_id               uuid not null,
    name                  text not null,
    prefix                text not null,
    key_hash              bytea not null,
    scopes                text[] not null default '{}',
    allowed_ips           text[] not null default '{}',
    trading_account_ids   uuid[] not null default '{}',
    rate_limit_per_minute integer,
    expires_at            timestamptz,
    last_used_at          timestamptz,
    revoked_at            timestamptz,
    revoked_reason        text,
    rotated_from          uuid,
    created_at            timestamptz not null default now(),
    constraint api_keys_key_hash_key unique (key_hash),
    constraint api_keys_user_id_fkey foreign key (user_id) references users (id) on delete cascade,
    constraint api_keys_rotated_from_fkey foreign key (rotated_from) references api_keys (id) on delete set null,
    constraint api_keys_name_check check (char_length(name) between 1 and 100),
    constraint api_keys_rate_limit_check check (rate_limit_per_minute is null or rate_limit_per_minute > 0)
);
create index api_keys_user_id_idx on api_keys (user_id, created_at desc);

create table api_key_usage_logs (
    id         bigint generated always as identity primary key,
    api_key_id uuid not null,
    used_at    timestamptz not null,
    ip         text,
    operation  text not null,
    result     text not null,
    constraint api_key_usage_logs_api_key_id_fkey foreign key (api_key_id) references api_keys (id) on delete cascade
);
create index api_key_usage_logs_key_used_at_idx on api_key_usage_logs (api_key_id, used_at desc, id desc);
