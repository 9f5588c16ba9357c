//! The instants a client may name (a filter, a cursor, an expiry): years 1 to
//! 9999, what RFC 3339 can write and PostgreSQL can store. chrono reaches
//! further, and PostgreSQL answers an error for what it cannot hold.

use chrono::{DateTime, Datelike, Utc};

use super::FieldError;

pub fn storable(at: &DateTime<Utc>) -> bool {
    (1..=9999).contains(&at.year())
}

/// `at`, or the field error naming `field` when it is out of that range.
pub fn check(field: &str, at: DateTime<Utc>) -> Result<DateTime<Utc>, FieldError> {
    if storable(&at) {
        Ok(at)
    } else {
        Err(FieldError::new(
            field,
            "out_of_range",
            "must be a date between the years 1 and 9999",
        ))
    }
}
