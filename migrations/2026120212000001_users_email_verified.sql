-- Whether a user's email is proven theirs; `import-users` carries it over from the
-- FastAPI user_service. Users from before start unverified. The recovery work
-- (issue 15) adds the same column the same way: whichever runs first adds it.
alter table users add column if not exists email_verified boolean not null default false;
