-- Passkeys (WebAuthn, DESIGN §8): each user's registered credentials, and the
-- challenges of ceremonies in flight. Challenges live in PostgreSQL, not in one
-- process, so a ceremony started on one replica finishes on any other, and a
-- challenge is consumed by one DELETE … RETURNING: used once, on whichever
-- replica gets there first.

create table webauthn_credentials (
    id            uuid primary key,
    user_id       uuid not null,
    -- The authenticator's credential id (raw bytes): how an assertion names it.
    credential_id bytea not null,
    name          text not null,
    -- webauthn-rs's Passkey: the public key, algorithm, flags and the last
    -- signature counter seen. Public material only: nothing here signs anything.
    passkey       jsonb not null,
    -- The last signature counter accepted (also inside `passkey`), kept as a
    -- column so a login can advance it only forwards, atomically: a counter that
    -- does not grow means a cloned authenticator.
    sign_count    bigint not null default 0,
    created_at    timestamptz not null default now(),
    last_used_at  timestamptz,
    constraint webauthn_credentials_user_fkey foreign key (user_id) references users (id) on delete cascade,
    -- One credential belongs to one account: registering it twice is a conflict.
    constraint webauthn_credentials_credential_id_key unique (credential_id),
    constraint webauthn_credentials_name_check check (char_length(name) between 1 and 64),
    constraint webauthn_credentials_sign_count_check check (sign_count >= 0)
);
create index webauthn_credentials_user_idx on webauthn_credentials (user_id, created_at);

create table webauthn_challenges (
    id         uuid primary key,
    -- Which ceremony: a challenge started for one can never finish another.
    ceremony   text not null,
    -- The user the ceremony is for; null for a passwordless login (the
    -- authenticator names the user).
    user_id    uuid,
    -- webauthn-rs's ceremony state (challenge, allowed credentials, policy).
    state      jsonb not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    constraint webauthn_challenges_user_fkey foreign key (user_id) references users (id) on delete cascade,
    constraint webauthn_challenges_ceremony_check check (ceremony in ('register', 'login', 'second_factor'))
);
-- Expired challenges are swept by expiry.
create index webauthn_challenges_expires_idx on webauthn_challenges (expires_at);
