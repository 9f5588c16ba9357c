-- Subscription tier tracking (the seed's 20251108_0004).
alter table trading_accounts
    add column subscription_tier       text not null default 'free',
    add column subscription_status     text not null default 'active',
    add column subscription_expires_at timestamptz,
    add constraint trading_accounts_subscription_tier_check
        check (subscription_tier in ('free', 'basic', 'pro', 'premium', 'enterprise')),
    add constraint trading_accounts_subscription_status_check
        check (subscription_status in ('active', 'trialing', 'past_due', 'cancelled', 'expired'));
