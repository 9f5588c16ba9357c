-- Usage rows aggregate identical uses (same key, operation, result and client IP)
-- within one flush window: a hot key costs one row per window instead of one per
-- request, so the bounded buffer no longer drops records under load.
alter table api_key_usage_logs
    add column request_count integer not null default 1,
    add constraint api_key_usage_logs_request_count_check check (request_count > 0);
