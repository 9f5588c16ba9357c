-- Failed logins, counted per user ('' in client_ip) and per (user, client IP), with
-- the lock each count sets. In PostgreSQL, not Redis: a lock must outlive a Redis
-- outage or restart (Redis keeps only what may be lost). Only wrong passwords (or
-- second factors) are counted; an unknown email has no row.
create table login_failures (
    user_id           uuid not null,
    client_ip         text not null,
    failures          integer not null,
    window_started_at timestamptz not null default now(),
    locked_until      timestamptz,
    updated_at        timestamptz not null default now(),
    constraint login_failures_pkey primary key (user_id, client_ip),
    constraint login_failures_user_id_fkey foreign key (user_id) references users (id) on delete cascade,
    constraint login_failures_failures_check check (failures > 0)
);
