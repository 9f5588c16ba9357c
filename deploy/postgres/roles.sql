-- The two PostgreSQL roles of user-service in staging and production:
--
--   owner  owns the database, its schema and every table; runs `user-service migrate`
--          (DATABASE_MIGRATION_URL). The only role that may alter audit_logs, e.g.
--          switch its append-only triggers off.
--   app    what the service connects as (DATABASE_URL): SELECT, INSERT, UPDATE,
--          DELETE on the tables, USAGE on the sequences, and on audit_logs only
--          SELECT and INSERT. Not a member of the owner role.
--
-- Run as a superuser (or the managed service's admin role), connected to the
-- service's database, once before the first migration and again after it (the
-- second run grants on the tables the first migration made). It is idempotent:
--
--   psql -v owner=stocksblitz -v app=user_service_app \
--        -d stocksblitz_unified_production -f deploy/postgres/roles.sql
--   psql -d stocksblitz_unified_production -c '\password user_service_app'
--
-- Later migrations need nothing from here: default privileges give the app role
-- DML on each table the owner creates, and migration 20261201000601 takes
-- UPDATE/DELETE/TRUNCATE on audit_logs back from every role but the owner.
\set ON_ERROR_STOP on
set user_service.owner to :'owner';
set user_service.app to :'app';

do $$
declare
    owner_role text := current_setting('user_service.owner');
    app_role   text := current_setting('user_service.app');
begin
    if owner_role = app_role then
        raise exception 'the owner and the app role must be two roles (both are %)', owner_role;
    end if;
    if not exists (select 1 from pg_roles where rolname = owner_role) then
        execute format('create role %I login', owner_role);
    end if;
    if not exists (select 1 from pg_roles where rolname = app_role) then
        execute format('create role %I login', app_role);
    end if;
    if exists (select 1 from pg_roles where rolname = app_role and rolsuper) then
        raise exception 'role % is a superuser: it could alter audit_logs', app_role;
    end if;
    -- A member of the owner role holds the owner's rights.
    if pg_has_role(app_role, owner_role, 'MEMBER') then
        execute format('revoke %I from %I', owner_role, app_role);
    end if;

    if exists (select 1 from pg_tables where schemaname = 'public' and tablename = 'audit_logs'
                  and tableowner <> owner_role) then
        raise exception 'audit_logs is owned by %, not %: run REASSIGN OWNED BY % TO % first',
            (select tableowner from pg_tables where schemaname = 'public' and tablename = 'audit_logs'),
            owner_role,
            (select tableowner from pg_tables where schemaname = 'public' and tablename = 'audit_logs'),
            owner_role;
    end if;

    execute format('alter database %I owner to %I', current_database(), owner_role);
    execute format('alter schema public owner to %I', owner_role);
    revoke create on schema public from public;
    execute format('grant connect on database %I to %I', current_database(), app_role);
    execute format('grant usage on schema public to %I', app_role);

    -- Tables and sequences that exist now, and those the owner's migrations add.
    execute format('grant select, insert, update, delete on all tables in schema public to %I', app_role);
    execute format('grant usage, select on all sequences in schema public to %I', app_role);
    execute format('alter default privileges for role %I in schema public
                        grant select, insert, update, delete on tables to %I', owner_role, app_role);
    execute format('alter default privileges for role %I in schema public
                        grant usage, select on sequences to %I', owner_role, app_role);

    -- Append-only for the service; the migrations' ledger is the owner's.
    if to_regclass('audit_logs') is not null then
        execute format('revoke update, delete, truncate on audit_logs from %I', app_role);
    end if;
    if to_regclass('_sqlx_migrations') is not null then
        execute format('revoke all on _sqlx_migrations from %I', app_role);
    end if;
end
$$;
