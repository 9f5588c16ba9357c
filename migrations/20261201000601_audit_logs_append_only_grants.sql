-- audit_logs stays append-only for every role but its owner: whatever was granted
-- on it (by hand, or by default privileges that give the service's role DML on each
-- new table, see deploy/postgres/roles.sql) is cut down to SELECT and INSERT. Only
-- the owner may switch the triggers off, and in staging and production the service
-- does not connect as the owner (checked when `serve` starts). The migrations
-- table is the owner's business alone.
do $$
declare
    g record;
begin
    for g in
        select distinct a.grantee::regrole::text as grantee, c.relname::text as relname
          from pg_class c, aclexplode(c.relacl) a
         where c.relnamespace = current_schema()::regnamespace
           and c.relname in ('audit_logs', '_sqlx_migrations')
           and a.grantee <> 0
           and a.grantee <> c.relowner
    loop
        if g.relname = 'audit_logs' then
            execute format('revoke update, delete, truncate, references, trigger on audit_logs from %s', g.grantee);
        else
            execute format('revoke all on _sqlx_migrations from %s', g.grantee);
        end if;
    end loop;
end
$$;
