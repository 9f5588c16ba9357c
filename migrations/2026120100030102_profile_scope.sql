-- An API key edits its owner's profile (PATCH /v1/users/me) only with this scope;
-- a login session needs none. Every role may hold it: it reaches only the
-- caller's own profile.
insert into scopes (name, description, api_key_grantable) values
    ('profile:write', 'Change your own profile (full name)', true);

insert into policies (id, name, effect, actions, resources, description) values
    ('00000000-0000-7000-8001-000000030102', 'profile_scopes', 'allow',
        '{profile:write}', '{*}',
        'Change one''s own profile');

insert into role_policies (role_id, policy_id) values
    ('00000000-0000-7000-8000-000000000001', '00000000-0000-7000-8001-000000030102'),
    ('00000000-0000-7000-8000-000000000002', '00000000-0000-7000-8001-000000030102'),
    ('00000000-0000-7000-8000-000000000003', '00000000-0000-7000-8001-000000030102');
