//! The login lockout policy, as a pure rule: what a password check may do given
//! the failures counted for the account (every client address) and for the pair
//! (account, this client address).
//!
//! In Keycloak's terms: temporary lockout (never permanent), failure factor
//! `LOGIN_MAX_ATTEMPTS`, wait `LOGIN_LOCKOUT_SECONDS`, failure reset time the same
//! window; but counted twice, per user and per (user, client IP), so that an
//! attacker locks out only themselves: see README.md "Login lockout".

/// Failures counted in the current window for one scope (account or pair).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub failures: i32,
    pub locked: bool,
}

/// What a password check may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Check the password.
    Open,
    /// The account is locked, but this client address has not failed for it: check
    /// the password after the second check (a delay), so its owner still gets in.
    Delayed,
    /// Refused without looking at the password.
    Locked,
}

pub fn gate(account: Standing, pair: Standing) -> Gate {
    if pair.locked || (account.locked && pair.failures > 0) {
        Gate::Locked
    } else if account.locked {
        Gate::Delayed
    } else {
        Gate::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: Standing = Standing {
        failures: 0,
        locked: false,
    };

    #[test]
    fn the_pair_lock_is_hard_and_the_account_lock_spares_clean_addresses() {
        let locked = Standing {
            failures: 5,
            locked: true,
        };
        let failed_once = Standing {
            failures: 1,
            locked: false,
        };
        assert_eq!(gate(CLEAN, CLEAN), Gate::Open);
        assert_eq!(gate(failed_once, failed_once), Gate::Open);
        assert_eq!(gate(CLEAN, locked), Gate::Locked);
        assert_eq!(gate(locked, locked), Gate::Locked);
        assert_eq!(gate(locked, failed_once), Gate::Locked);
        assert_eq!(gate(locked, CLEAN), Gate::Delayed);
    }
}
