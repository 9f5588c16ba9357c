//! `Services`: every use case, wired once from the settings over one set of
//! stores. The server (`App`), the operator CLI and the tests all build this one
//! graph; the transports receive the services they call.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::accounts::AccountsService;
use super::api_keys::ApiKeyService;
use super::audit_log::AuditLog;
use super::invalidation::Invalidation;
use super::invitations::InvitationsService;
use super::lockout::Lockout;
use super::login::Login;
use super::mfa::MfaService;
use super::notify::Dispatcher;
use super::passkeys::PasskeyService;
use super::policy::PolicyEngine;
use super::service_clients::ServiceClients;
use super::sessions::Sessions;
use super::throttle::Throttle;
use super::users::Users;
use crate::config::Settings;
use crate::crypto::jwt::JwtKeys;
use crate::crypto::password::PasswordHasher;
use crate::shutdown::Shutdown;
use crate::store::{Cache, Db, HealthProbe};

/// Cheap to clone: every service is shared.
#[derive(Clone)]
pub struct Services {
    /// Access tokens, session cookies and VerifyToken; refresh, logout and a
    /// user's own sessions.
    pub sessions: Arc<Sessions>,
    /// Password login (throttle, lockout), which opens a session.
    pub login: Arc<Login>,
    /// Sign-up, profiles, password change and user administration.
    pub users: Arc<Users>,
    /// Client credentials, service-token verification, operator commands.
    pub service_clients: Arc<ServiceClients>,
    /// Roles and policies: CheckPermission and the scopes a user holds.
    pub policy: PolicyEngine,
    /// Trading accounts, memberships and broker credentials.
    pub accounts: AccountsService,
    /// The audit trail, read by administrators.
    pub audit_log: AuditLog,
    /// API keys and VerifyApiKey (cached, with the usage buffer).
    pub api_keys: Arc<ApiKeyService>,
    /// Invitations to trading accounts: membership only with the invitee's consent.
    pub invitations: InvitationsService,
    /// Second factors, the login's second step and step-up (issue 14).
    pub mfa: MfaService,
    /// Passkeys (WebAuthn): registration, passwordless login, second factor.
    pub passkeys: Arc<PasskeyService>,
    /// Cross-replica cache invalidation: publish "key / user / account changed".
    pub invalidation: Invalidation,
    /// Whether the stores answer, and the pool's occupancy (health, metrics).
    pub probe: HealthProbe,
    db: Db,
    cache: Cache,
    usage_flush_interval: Duration,
    /// The notification outbox's dispatcher (issue 15), spawned by `start`.
    dispatcher: Arc<std::sync::Mutex<Option<Dispatcher>>>,
}

impl Services {
    /// Connects the stores lazily (the service starts while they are down) and
    /// wires every service. Background work starts with `start`.
    pub fn build(settings: &Settings) -> anyhow::Result<Self> {
        let db = Db::connect_lazy(settings)?;
        let cache = Cache::connect(settings)?;
        let key_ring = match &settings.credentials_encryption_keys {
            Some(spec) => Some(Arc::new(crate::crypto::aead::KeyRing::parse(spec)?)),
            None => None,
        };
        let jwt = Arc::new(JwtKeys::from_settings(settings)?);
        let hasher = PasswordHasher::new(settings.argon2_max_concurrency);

        let invalidation = Invalidation::new(cache.clone());
        let sessions = Arc::new(Sessions::new(
            settings,
            db.clone(),
            cache.clone(),
            invalidation.clone(),
            jwt.clone(),
        ));
        let throttle = Arc::new(Throttle::new(cache.clone()));
        let lockout = Arc::new(Lockout::new(settings, db.clone(), hasher.clone()));
        let mfa = MfaService::new(
            db.clone(),
            key_ring.clone(),
            settings,
            sessions.clone(),
            lockout.clone(),
            throttle.clone(),
        );
        let login = Arc::new(Login::new(
            settings,
            db.clone(),
            hasher.clone(),
            throttle.clone(),
            lockout.clone(),
            sessions.clone(),
            mfa.clone(),
        ));
        let users = Arc::new(Users::new(
            settings,
            db.clone(),
            hasher.clone(),
            sessions.clone(),
            lockout,
            throttle.clone(),
            invalidation.clone(),
        ));
        let service_clients = Arc::new(ServiceClients::new(settings, db.clone(), hasher, jwt));
        let policy = PolicyEngine::new(db.clone(), &invalidation);
        let accounts = AccountsService::new(
            db.clone(),
            key_ring,
            policy.clone(),
            invalidation.clone(),
            mfa.step_up.clone(),
        )
        // REQUIRE_VERIFIED_EMAIL, for accounts, invitations and keys.
        .with_email_gate(super::recovery::EmailGate::new(db.clone(), settings));
        let audit_log = AuditLog::new(db.clone(), policy.clone());
        let invitations = InvitationsService::new(db.clone(), accounts.clone());
        let api_keys = Arc::new(ApiKeyService::new(
            settings,
            db.clone(),
            cache.clone(),
            invalidation.clone(),
            policy.clone(),
            accounts.clone(),
            sessions.user_copies(),
        ));
        let passkeys = Arc::new(
            PasskeyService::new(settings, db.clone(), sessions.clone(), throttle.clone())?
                .with_step_up(mfa.step_up.clone()),
        );
        Ok(Self {
            passkeys,
            sessions,
            login,
            users,
            service_clients,
            policy,
            accounts,
            audit_log,
            api_keys,
            invitations,
            mfa,
            invalidation,
            dispatcher: Arc::new(std::sync::Mutex::new(Some(Dispatcher::new(
                settings,
                db.clone(),
            )?))),
            probe: HealthProbe::new(db.clone(), cache.clone()),
            db,
            cache,
            usage_flush_interval: Duration::from_millis(settings.usage_log_flush_interval_ms),
        })
    }

    /// Starts the background work on `tasks`, until `shutdown`: the invalidation
    /// listeners (Redis and PostgreSQL), the notification dispatcher (the
    /// outbox, issue 15), the API-key cache's refresher and usage flusher.
    pub async fn start(&self, shutdown: &Shutdown, tasks: &TaskTracker) {
        let dispatcher = self
            .dispatcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(d) = dispatcher {
            d.spawn(shutdown.clone(), tasks);
        }
        self.invalidation.start(shutdown.clone(), tasks).await;
        self.invalidation
            .start_pg(&self.db, shutdown.clone(), tasks)
            .await;
        self.mfa.lockout.spawn_sweeper(shutdown.clone(), tasks);
        self.api_keys.spawn_refresher(shutdown.clone(), tasks);
        self.api_keys.usage_buffer().spawn_flusher(
            self.db.clone(),
            self.usage_flush_interval,
            shutdown.clone(),
            tasks,
        );
    }

    /// Deletes the lockout's expired rows now (the background sweeper does it
    /// every `lockout::SWEEP_EVERY`); answers how many went.
    pub async fn sweep_login_failures(&self) -> super::ServiceResult<u64> {
        self.mfa.lockout.sweep().await
    }

    /// Closes the stores, giving each at most `timeout`.
    pub async fn close(&self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.cache.quit())
            .await
            .is_err()
        {
            tracing::warn!("redis did not close in time");
        }
        if tokio::time::timeout(timeout, self.db.close())
            .await
            .is_err()
        {
            tracing::warn!("database pool did not close in time");
        }
    }
}
