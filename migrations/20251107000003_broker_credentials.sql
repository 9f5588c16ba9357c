-- Broker credential columns (the seed's 20251107_0003). Only AEAD ciphertext
-- (nonce || ciphertext || tag, the account id bound as associated data) and the id
-- of the key that sealed it are stored; there is no plaintext column.
alter table trading_accounts
    add column api_key_ciphertext      bytea,
    add column api_secret_ciphertext   bytea,
    add column access_token_ciphertext bytea,
    add column credentials_key_id      text,
    add column credentials_hint        text,
    add column credentials_updated_at  timestamptz,
    add constraint trading_accounts_credentials_key_check check (
        (api_key_ciphertext is null and api_secret_ciphertext is null and access_token_ciphertext is null)
        or credentials_key_id is not null);
create index trading_accounts_credentials_key_id_idx on trading_accounts (credentials_key_id)
    where credentials_key_id is not null;
