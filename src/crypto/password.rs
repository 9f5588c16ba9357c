//! argon2id password hashing (OWASP parameters) on a small pool of its own,
//! behind a semaphore so a login flood queues instead of exhausting memory.
//!
//! The pool's threads run under SCHED_IDLE, below the async workers. A login
//! costs 13-25 ms of CPU in one piece; at equal priority a login flood takes the
//! workers' core away in scheduler slices of milliseconds and every VerifyApiKey
//! behind it waits. Measured with scripts/bench (one core, VerifyApiKey at full
//! load, 4 logins in flight): p99 of VerifyApiKey 3.5x its idle p99 at nice 10,
//! about 2x at nice 19, 1.3x under SCHED_IDLE. Logins then use every idle cycle
//! (the full argon2 rate when the hot path leaves the core free) and crawl only
//! while VerifyApiKey alone saturates the core, when the service needs another
//! replica anyway. Login floods are mostly credential stuffing: they must not
//! slow down every other service's requests.
//!
//! A sandbox that denies `sched_setscheduler` (systemd's `@resources` filter) leaves
//! the threads at normal priority: the service still works, so it starts, but says
//! so once in the log and in the gauge `password_hashing_low_priority` (1 when every
//! hashing thread runs under SCHED_IDLE, 0 otherwise).

use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

/// OWASP: m = 19 MiB, t = 2, p = 1.
const M_COST_KIB: u32 = 19_456;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

fn argon2() -> Argon2<'static> {
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None).expect("valid argon2 params");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Whether a stored hash should be replaced at the next successful check: anything
/// but argon2id (v=19) with the current parameters, such as an imported bcrypt,
/// pbkdf2 or argon2i hash, or an argon2id hash of other parameters.
pub fn needs_rehash(hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return true;
    };
    let current = Params::try_from(&parsed).is_ok_and(|p| {
        (p.m_cost(), p.t_cost(), p.p_cost()) == (M_COST_KIB, T_COST, P_COST)
            && p.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN) == Params::DEFAULT_OUTPUT_LEN
    });
    !(current
        && parsed.algorithm == Algorithm::Argon2id.ident()
        && parsed.version == Some(Version::V0x13.into()))
}

/// A hash of a random value with the same parameters: verifying against it when the
/// user is unknown costs what a real verification costs, so timing tells nothing.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        argon2()
            .hash_password(uuid::Uuid::new_v4().as_bytes(), &salt)
            .expect("argon2 hashes")
            .to_string()
    })
}

type Job = Box<dyn FnOnce() + Send>;

/// `n` threads taking jobs from one queue; they end when the last sender is
/// dropped (the hasher with its app). Also returns whether every thread lowered its
/// priority (false when none started).
fn start_pool(n: usize) -> (mpsc::Sender<Job>, bool) {
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let (lowered_tx, lowered) = mpsc::channel::<std::io::Result<()>>();
    let mut started = 0;
    for i in 0..n {
        let rx = rx.clone();
        let lowered_tx = lowered_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("argon2-{i}"))
            .spawn(move || {
                let _ = lowered_tx.send(lower_this_threads_priority());
                drop(lowered_tx);
                loop {
                    let job = rx
                        .lock()
                        .map_err(|_| ())
                        .and_then(|r| r.recv().map_err(|_| ()));
                    match job {
                        // A panicking hash must not take the thread with it: the
                        // pool would shrink until every login failed.
                        Ok(job) => {
                            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err()
                            {
                                tracing::error!("a password-hashing job panicked");
                            }
                        }
                        Err(()) => break,
                    }
                }
            });
        match spawned {
            Ok(_) => started += 1,
            Err(e) => tracing::error!(error = %e, "cannot start a password-hashing thread"),
        }
    }
    drop(lowered_tx);
    // Each started thread reports first thing; a thread that died before reporting
    // closes its sender, so this never waits on a report that cannot come.
    let mut failure = None;
    for report in lowered.iter() {
        if let Err(e) = report {
            failure = Some(e);
        }
    }
    let low = started > 0 && failure.is_none();
    metrics::gauge!("password_hashing_low_priority").set(if low { 1.0 } else { 0.0 });
    if let Some(e) = failure {
        tracing::warn!(
            error = %e,
            "password-hashing threads run at normal priority (SCHED_IDLE refused): a login \
             flood can slow every other request; allow sched_setscheduler in the sandbox \
             (deploy/systemd)"
        );
    }
    (tx, low)
}

/// SCHED_IDLE for the calling thread (Linux applies it per thread): the kernel
/// runs it when the core would otherwise idle, and gives it only a sliver (weight
/// 3 against a normal thread's 1024) while the async workers have work.
#[cfg(target_os = "linux")]
fn lower_this_threads_priority() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param`, which outlives the call, and
    // changes only this thread's policy. On failure (reported by the return
    // value) the thread keeps the normal policy: safe, only slower for the hot
    // path under a login flood.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One argon2id hash on the calling thread, blocking it for the whole computation
/// (the pool's job; also what the benchmark times as the cost of a login).
pub fn hash_on_this_thread(password: &SecretString) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(password.expose_secret().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("argon2 hash failed: {e}"))
}

/// Elsewhere the hashing threads keep the normal priority.
#[cfg(not(target_os = "linux"))]
fn lower_this_threads_priority() -> std::io::Result<()> {
    Err(std::io::Error::other("SCHED_IDLE is Linux-only"))
}

/// How long a hash may wait for the pool before the caller is told to come back
/// later (503) instead of waiting on: under a login flood the queue would
/// otherwise grow as fast as clients retry.
const QUEUE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The pool stayed full for QUEUE_DEADLINE.
#[derive(Debug, thiserror::Error)]
#[error("password hashing is busy")]
pub struct Busy;

#[derive(Clone)]
pub struct PasswordHasher {
    permits: Arc<Semaphore>,
    jobs: mpsc::Sender<Job>,
    queue_deadline: std::time::Duration,
    low_priority: bool,
}

impl PasswordHasher {
    /// `max_concurrency` argon2 computations at once (None: the number of cores).
    pub fn new(max_concurrency: Option<usize>) -> Self {
        let n = max_concurrency
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        // Computed now (on the building thread) rather than inside the first login.
        let _ = dummy_hash();
        let (jobs, low_priority) = start_pool(n);
        Self {
            permits: Arc::new(Semaphore::new(n)),
            jobs,
            queue_deadline: QUEUE_DEADLINE,
            low_priority,
        }
    }

    /// Whether every hashing thread runs under SCHED_IDLE (see the module docs).
    pub fn runs_at_low_priority(&self) -> bool {
        self.low_priority
    }

    /// The same with another queue deadline (tests).
    pub fn with_queue_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.queue_deadline = deadline;
        self
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        // The permit travels with the job: a caller that gives up (the client hung
        // up) frees its place only when the job is done or skipped, so the queue
        // never holds more than `max_concurrency` jobs.
        let permit =
            tokio::time::timeout(self.queue_deadline, self.permits.clone().acquire_owned())
                .await
                .map_err(|_| Busy)??;
        let (done, result) = tokio::sync::oneshot::channel::<T>();
        self.jobs
            .send(Box::new(move || {
                if !done.is_closed() {
                    let _ = done.send(f());
                }
                drop(permit);
            }))
            .map_err(|_| anyhow::anyhow!("the password-hashing pool has stopped"))?;
        result
            .await
            .map_err(|_| anyhow::anyhow!("a password-hashing job was lost"))
    }

    /// PHC string of a fresh argon2id hash.
    #[tracing::instrument(skip_all)]
    pub async fn hash(&self, password: SecretString) -> anyhow::Result<String> {
        self.run(move || hash_on_this_thread(&password)).await?
    }

    /// Whether `password` matches `hash`; with no hash (unknown user, no password
    /// set) it verifies against the dummy hash and answers false.
    #[tracing::instrument(skip_all)]
    pub async fn verify(
        &self,
        password: SecretString,
        hash: Option<String>,
    ) -> anyhow::Result<bool> {
        self.run(move || {
            let known = hash.is_some();
            let phc = hash.unwrap_or_else(|| dummy_hash().to_string());
            // An imported user's bcrypt or pbkdf2 hash, on this same bounded pool.
            if let Some(ok) = super::legacy::verify(password.expose_secret().as_bytes(), &phc) {
                return ok && known;
            }
            let parsed = match PasswordHash::new(&phc) {
                Ok(p) => p,
                Err(_) => PasswordHash::new(dummy_hash()).expect("dummy hash parses"),
            };
            let ok = argon2()
                .verify_password(password.expose_secret().as_bytes(), &parsed)
                .is_ok();
            ok && known
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduling policy of thread `tid`, from /proc (field 41 of its stat).
    #[cfg(target_os = "linux")]
    fn policy(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        rest.split_whitespace()
            .nth(41 - 3)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_runs_below_the_workers_priority() {
        let h = PasswordHasher::new(Some(1));
        // SAFETY: gettid takes no arguments and cannot fail.
        let (hashing, worker) = h
            .run(|| unsafe { libc::gettid() })
            .await
            .map(|t| (t, unsafe { libc::gettid() }))
            .unwrap();
        assert_ne!(hashing, worker);
        assert_eq!(policy(hashing), libc::SCHED_IDLE);
        assert_eq!(policy(worker), libc::SCHED_OTHER);
        assert!(h.runs_at_low_priority());
    }

    #[tokio::test]
    async fn a_full_pool_answers_busy_after_the_deadline() {
        let h =
            PasswordHasher::new(Some(1)).with_queue_deadline(std::time::Duration::from_millis(100));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let h = h.clone();
            async move { h.run(move || hold.recv().is_ok()).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let refused = h.run(|| ()).await.unwrap_err();
        assert!(refused.is::<Busy>(), "{refused}");
        release.send(()).unwrap();
        assert!(busy.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_panicking_job_leaves_the_pool_working() {
        let h = PasswordHasher::new(Some(1));
        let lost = h.run(|| -> u32 { panic!("boom") }).await;
        assert!(lost.is_err());
        // The one thread survived and still takes jobs.
        assert_eq!(h.run(|| 7).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn an_abandoned_job_keeps_its_place_until_it_is_done() {
        let h = PasswordHasher::new(Some(1));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        // A job that runs until released, whose caller gives up meanwhile (a
        // client hanging up during its login).
        let abandoned = tokio::spawn({
            let h = h.clone();
            async move {
                h.run(move || {
                    let _ = started.send(());
                    hold.recv().is_ok()
                })
                .await
            }
        });
        running.await.unwrap();
        abandoned.abort();
        let _ = abandoned.await;
        // Its permit went with the job: nothing more is queued while it runs.
        let next = tokio::time::timeout(std::time::Duration::from_millis(200), h.run(|| 1)).await;
        assert!(
            next.is_err(),
            "a second job was admitted while the first still ran"
        );
        release.send(()).unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), h.run(|| 2)).await;
        assert_eq!(next.unwrap().unwrap(), 2);
    }

    #[tokio::test]
    async fn legacy_hashes_verify_on_the_pool_and_ask_for_a_rehash() {
        let h = PasswordHasher::new(Some(1));
        let pbkdf2 = "$pbkdf2-sha256$29000$.wIHBwcHBwcHBwcHBwcHBw$nvAdo9.kXrXJ.Q87xAajjNNoqHLhEEhWuGmjTQAvKn4";
        assert!(h
            .verify(SecretString::from("password"), Some(pbkdf2.into()))
            .await
            .unwrap());
        assert!(!h
            .verify(SecretString::from("passwort"), Some(pbkdf2.into()))
            .await
            .unwrap());
        assert!(needs_rehash(pbkdf2));
        let current = h.hash(SecretString::from("password")).await.unwrap();
        assert!(!needs_rehash(&current));
        let weaker = current.replace("m=19456,t=2,p=1", "m=19456,t=1,p=1");
        assert!(needs_rehash(&weaker));
        assert!(needs_rehash(&current.replace("$argon2id$", "$argon2i$")));
        assert!(needs_rehash(
            "$2b$04$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234"
        ));
    }

    #[tokio::test]
    async fn hashes_with_owasp_parameters_and_verifies() {
        let h = PasswordHasher::new(Some(1));
        let hash = h
            .hash(SecretString::from("correct horse battery"))
            .await
            .unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(h
            .verify(
                SecretString::from("correct horse battery"),
                Some(hash.clone())
            )
            .await
            .unwrap());
        assert!(!h
            .verify(SecretString::from("wrong"), Some(hash))
            .await
            .unwrap());
        assert!(!h
            .verify(SecretString::from("anything"), None)
            .await
            .unwrap());
    }
}
