-- Cache invalidation that does not depend on Redis: every change that revokes or
-- alters what a cached key, token, session or user snapshot grants sends a
-- NOTIFY on `user_service_invalidate`, from inside the writing transaction, so
-- it is delivered exactly when (and only if) the change commits. Each replica
-- LISTENs and drops what it derived. Payloads: `k:<api key id>`, `u:<user id>`
-- (status, roles, memberships), `p:<user id>` (name or email only),
-- `s:<session id>`, `a:<trading account id>`. Writes that change nothing a cache
-- holds (last_used_at, last_seen_at, password hash) send nothing, so a user's
-- cached keys survive them.

create function invalidate_notify(payload text) returns void
language sql as $$
    select pg_notify('user_service_invalidate', payload);
$$;

create function sessions_invalidate() returns trigger language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        perform invalidate_notify('s:' || old.id);
    elsif new.revoked_at is distinct from old.revoked_at
          or new.expires_at is distinct from old.expires_at
          or new.user_id is distinct from old.user_id then
        perform invalidate_notify('s:' || new.id);
    end if;
    return null;
end $$;
create trigger sessions_invalidate after update or delete on sessions
    for each row execute function sessions_invalidate();

create function users_invalidate() returns trigger language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        perform invalidate_notify('u:' || old.id);
    elsif new.status is distinct from old.status then
        perform invalidate_notify('u:' || new.id);
    elsif new.email is distinct from old.email or new.full_name is distinct from old.full_name then
        perform invalidate_notify('p:' || new.id);
    end if;
    return null;
end $$;
create trigger users_invalidate after update or delete on users
    for each row execute function users_invalidate();

create function user_roles_invalidate() returns trigger language plpgsql as $$
begin
    if tg_op in ('UPDATE', 'DELETE') then
        perform invalidate_notify('u:' || old.user_id);
    end if;
    if tg_op in ('INSERT', 'UPDATE') then
        perform invalidate_notify('u:' || new.user_id);
    end if;
    return null;
end $$;
create trigger user_roles_invalidate after insert or update or delete on user_roles
    for each row execute function user_roles_invalidate();

create function memberships_invalidate() returns trigger language plpgsql as $$
begin
    if tg_op = 'UPDATE' and new.role is not distinct from old.role
       and new.revoked_at is not distinct from old.revoked_at
       and new.user_id is not distinct from old.user_id
       and new.trading_account_id is not distinct from old.trading_account_id then
        return null;
    end if;
    if tg_op in ('UPDATE', 'DELETE') then
        perform invalidate_notify('u:' || old.user_id);
        perform invalidate_notify('a:' || old.trading_account_id);
    end if;
    if tg_op in ('INSERT', 'UPDATE') then
        perform invalidate_notify('u:' || new.user_id);
        perform invalidate_notify('a:' || new.trading_account_id);
    end if;
    return null;
end $$;
create trigger memberships_invalidate after insert or update or delete on trading_account_memberships
    for each row execute function memberships_invalidate();

create function trading_accounts_invalidate() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        perform invalidate_notify('u:' || new.owner_user_id);
    elsif tg_op = 'DELETE' then
        perform invalidate_notify('a:' || old.id);
        perform invalidate_notify('u:' || old.owner_user_id);
    elsif new.status is distinct from old.status
          or new.deleted_at is distinct from old.deleted_at
          or new.owner_user_id is distinct from old.owner_user_id then
        perform invalidate_notify('a:' || new.id);
        perform invalidate_notify('u:' || old.owner_user_id);
        perform invalidate_notify('u:' || new.owner_user_id);
    end if;
    return null;
end $$;
create trigger trading_accounts_invalidate after insert or update or delete on trading_accounts
    for each row execute function trading_accounts_invalidate();

create function api_keys_invalidate() returns trigger language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        perform invalidate_notify('k:' || old.id);
    elsif new.revoked_at is distinct from old.revoked_at
          or new.scopes is distinct from old.scopes
          or new.allowed_ips is distinct from old.allowed_ips
          or new.trading_account_ids is distinct from old.trading_account_ids
          or new.rate_limit_per_minute is distinct from old.rate_limit_per_minute
          or new.expires_at is distinct from old.expires_at
          or new.name is distinct from old.name
          or new.user_id is distinct from old.user_id then
        perform invalidate_notify('k:' || new.id);
    end if;
    return null;
end $$;
create trigger api_keys_invalidate after update or delete on api_keys
    for each row execute function api_keys_invalidate();

-- A refresh token used (rotated) no longer authenticates as the session cookie.
create function refresh_tokens_invalidate() returns trigger language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        perform invalidate_notify('s:' || old.session_id);
    elsif new.used_at is distinct from old.used_at then
        perform invalidate_notify('s:' || new.session_id);
    end if;
    return null;
end $$;
create trigger refresh_tokens_invalidate after update or delete on refresh_tokens
    for each row execute function refresh_tokens_invalidate();
