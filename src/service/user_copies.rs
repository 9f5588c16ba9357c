//! One copy in memory of each user record the caches hold, however many cached
//! API keys, sessions and tokens refer to it: with 100,000 cached keys and
//! tokens of as many users, a copy per key and per token was ~20 MB.

use std::sync::{Arc, Weak};

use uuid::Uuid;

use super::swr::{lean, Lean};
use crate::domain::user::User;

pub struct UserCopies {
    /// Weak: a record no cache entry holds any more is freed with its last
    /// holder; this map only finds the live one. Bounded like the caches.
    copies: Lean<Uuid, Weak<User>>,
}

impl UserCopies {
    pub fn new(capacity: u64) -> Self {
        Self {
            copies: lean(capacity),
        }
    }

    /// `user` as an `Arc` shared with every holder of an identical record. Only
    /// an equal record is shared, so a copy read before a change is never handed
    /// out for one read after it (and needs no invalidation).
    pub fn share(&self, user: User) -> Arc<User> {
        if let Some(live) = self.copies.get(&user.id).and_then(|w| w.upgrade()) {
            if *live == user {
                return live;
            }
        }
        let user = Arc::new(user);
        self.copies.insert(user.id, Arc::downgrade(&user));
        user
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::user::{Role, UserStatus};

    fn user(id: Uuid, name: &str) -> User {
        User {
            id,
            email: "a@example.com".into(),
            full_name: name.into(),
            roles: vec![Role::User],
            status: UserStatus::Active,
            email_verified: true,
            created_at: chrono::DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn equal_records_share_one_copy_and_changed_ones_do_not() {
        let copies = UserCopies::new(16);
        let id = Uuid::new_v4();
        let a = copies.share(user(id, "Ann"));
        let b = copies.share(user(id, "Ann"));
        assert!(Arc::ptr_eq(&a, &b));
        // A changed record is its own copy, and becomes the one shared.
        let c = copies.share(user(id, "Anne"));
        assert_eq!(c.full_name, "Anne");
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(Arc::ptr_eq(&c, &copies.share(user(id, "Anne"))));
        // Once nobody holds it, the record is gone, not kept alive by the map.
        drop((a, b, c));
        let d = copies.share(user(id, "Anne"));
        assert_eq!(Arc::strong_count(&d), 1);
    }
}
