-- Seed data (the seed's alembic 002): roles, policies, the API-key scope catalog and
-- the internal service clients. No secrets: service clients get theirs from
-- `user-service admin rotate-service-client-secret`.

-- The catalog of scopes an API key may carry (and a policy may name).
create table scopes (
    name          text primary key,
    description   text not null,
    -- false for scopes only an operator or service client may hold.
    api_key_grantable boolean not null default true,
    constraint scopes_name_check check (name ~ '^[a-z_]+:[a-z_]+$')
);

insert into scopes (name, description, api_key_grantable) values
    ('accounts:read',    'Read trading accounts and their status', true),
    ('accounts:write',   'Create and change trading accounts', true),
    ('orders:read',      'Read orders and positions', true),
    ('orders:write',     'Place, modify and cancel orders', true),
    ('market_data:read', 'Read market data', true),
    ('alerts:read',      'Read alerts', true),
    ('alerts:write',     'Create and change alerts', true),
    ('admin:users',      'Administer users', false),
    ('admin:audit',      'Read the audit trail', false);

insert into roles (id, name, description) values
    ('00000000-0000-7000-8000-000000000001', 'admin',  'Operators: everything a user may do, plus user and audit administration'),
    ('00000000-0000-7000-8000-000000000002', 'user',   'A trader: own accounts, orders and market data'),
    ('00000000-0000-7000-8000-000000000003', 'viewer', 'Read-only access');

insert into policies (id, name, effect, actions, resources, description) values
    ('00000000-0000-7000-8001-000000000001', 'trader_scopes', 'allow',
        '{accounts:read,accounts:write,orders:read,orders:write,market_data:read,alerts:read,alerts:write}', '{*}',
        'What a trading user may do'),
    ('00000000-0000-7000-8001-000000000002', 'read_only_scopes', 'allow',
        '{accounts:read,orders:read,market_data:read,alerts:read}', '{*}',
        'Reading only'),
    ('00000000-0000-7000-8001-000000000003', 'admin_scopes', 'allow',
        '{admin:users,admin:audit}', '{*}',
        'User and audit administration'),
    ('00000000-0000-7000-8001-000000000004', 'viewer_no_writes', 'deny',
        '{accounts:write,orders:write,alerts:write}', '{*}',
        'A viewer never writes, whatever else it holds');

insert into role_policies (role_id, policy_id) values
    ('00000000-0000-7000-8000-000000000001', '00000000-0000-7000-8001-000000000001'),
    ('00000000-0000-7000-8000-000000000001', '00000000-0000-7000-8001-000000000003'),
    ('00000000-0000-7000-8000-000000000002', '00000000-0000-7000-8001-000000000001'),
    ('00000000-0000-7000-8000-000000000003', '00000000-0000-7000-8001-000000000002'),
    ('00000000-0000-7000-8000-000000000003', '00000000-0000-7000-8001-000000000004');

insert into service_clients (id, client_id, name, scopes) values
    ('00000000-0000-7000-8002-000000000001', 'backend',  'Backend service',
        '{auth:verify,users:read,permissions:check,accounts:read,credentials:read}'),
    ('00000000-0000-7000-8002-000000000002', 'alert',    'Alert service',
        '{auth:verify,users:read,permissions:check,accounts:read}'),
    ('00000000-0000-7000-8002-000000000003', 'calendar', 'Calendar service',
        '{auth:verify,users:read}'),
    ('00000000-0000-7000-8002-000000000004', 'ticker',   'Ticker service',
        '{auth:verify,accounts:read,credentials:read}');
