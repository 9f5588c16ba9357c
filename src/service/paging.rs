//! Keyset pagination for lists: `?limit=&cursor=`, answering `next_cursor`. A
//! cursor is opaque to clients (base64url of the last item's sort key).

use std::fmt::Display;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Datelike, Utc};

use super::ServiceError;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

/// A client's page request, checked: limit 1..=200 (default 50).
pub fn limit(limit: Option<i64>) -> Result<i64, ServiceError> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(ServiceError::validation(
            "limit",
            "out_of_range",
            format!("must be between 1 and {MAX_LIMIT}"),
        )),
    }
}

/// The instants a filter, cursor or expiry may name: years 1 to 9999, what RFC 3339
/// can write and PostgreSQL can store (chrono reaches further, and PostgreSQL
/// answers an error for what it cannot hold).
fn time_in_range(at: &DateTime<Utc>) -> bool {
    (1..=9999).contains(&at.year())
}

/// A client-given instant (`since`, `until`, `expires_at`, …), checked against
/// that range.
pub fn check_time(
    field: &'static str,
    at: Option<DateTime<Utc>>,
) -> Result<Option<DateTime<Utc>>, ServiceError> {
    match at {
        Some(t) if !time_in_range(&t) => Err(ServiceError::validation(
            field,
            "out_of_range",
            "must be a date between the years 1 and 9999",
        )),
        other => Ok(other),
    }
}

/// Longest text a list filter accepts.
pub const MAX_FILTER_LEN: usize = 320;

/// A free-text list filter (`action`, `email`, …): empty means no filter; NUL and
/// other control characters, which PostgreSQL text cannot hold or no stored value
/// has, are refused naming the field, as is anything longer than any stored value.
pub fn text_filter(
    field: &'static str,
    value: Option<String>,
) -> Result<Option<String>, ServiceError> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if v.chars().any(char::is_control) {
        return Err(ServiceError::validation(
            field,
            "invalid",
            "must not contain NUL bytes or control characters",
        ));
    }
    if v.chars().count() > MAX_FILTER_LEN {
        return Err(ServiceError::validation(
            field,
            "too_long",
            format!("must be at most {MAX_FILTER_LEN} characters"),
        ));
    }
    Ok(Some(v))
}

fn bad_cursor() -> ServiceError {
    ServiceError::validation("cursor", "invalid", "not a cursor from a previous page")
}

pub fn encode(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

pub fn decode(c: &str) -> Result<String, ServiceError> {
    URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad_cursor)
}

/// A (timestamp, id) sort key, the id being a uuid or a serial.
pub fn encode_time_id(at: DateTime<Utc>, id: impl Display) -> String {
    encode(&format!("{}.{id}", at.timestamp_micros()))
}

pub fn decode_time_id<K: FromStr>(c: &str) -> Result<(DateTime<Utc>, K), ServiceError> {
    let s = decode(c)?;
    let (micros, id) = s.split_once('.').ok_or_else(bad_cursor)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .filter(time_in_range)
        .ok_or_else(bad_cursor)?;
    let id = id.parse().map_err(|_| bad_cursor())?;
    Ok((at, id))
}

/// A single-column sort key (e.g. audit row ids or key ids, newest first).
pub fn decode_key<K: FromStr>(c: &str) -> Result<K, ServiceError> {
    decode(c)?.parse().map_err(|_| bad_cursor())
}

/// Fetching `limit + 1` rows tells whether another page follows: trims the extra
/// row and returns the cursor of the last kept one.
pub fn finish<T>(mut rows: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> String) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().map(cursor_of)
    } else {
        None
    };
    Page {
        items: rows,
        next_cursor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = Uuid::new_v4();
        assert_eq!(
            decode_time_id::<Uuid>(&encode_time_id(at, id)).unwrap(),
            (at, id)
        );
        assert!(decode_time_id::<Uuid>("!!").is_err());
        assert!(decode_key::<i64>(&encode("x")).is_err());
        assert_eq!(decode_key::<i64>(&encode("42")).unwrap(), 42);
        let serial = encode_time_id(at, 7_i64);
        assert_eq!(decode_time_id::<i64>(&serial).unwrap(), (at, 7));
        assert!(decode_time_id::<i64>(&encode_time_id(at, id)).is_err());
    }

    #[test]
    fn cursors_and_filters_outside_what_postgresql_holds_are_refused() {
        // Valid for chrono, out of range for PostgreSQL (before 4713 BC).
        let far = encode(&format!("{}.7", -200_000_000_000_000_000_i64));
        assert!(decode_time_id::<i64>(&far).is_err());
        let year_10000 = DateTime::parse_from_rfc3339("9999-12-31T23:59:59Z").unwrap()
            + chrono::Duration::days(1);
        assert!(check_time("until", Some(year_10000.to_utc())).is_err());
        assert!(check_time("until", None).unwrap().is_none());
        assert!(text_filter("action", Some("a\0b".into())).is_err());
        assert!(text_filter("action", Some("x".repeat(321))).is_err());
        assert_eq!(text_filter("action", Some(String::new())).unwrap(), None);
        assert_eq!(
            text_filter("action", Some("auth.login".into())).unwrap(),
            Some("auth.login".into())
        );
    }

    #[test]
    fn finish_trims_the_probe_row() {
        let p = finish(vec![1, 2, 3], 2, |n| n.to_string());
        assert_eq!(p.items, vec![1, 2]);
        assert_eq!(p.next_cursor.as_deref(), Some("2"));
        assert!(finish(vec![1, 2], 2, |n| n.to_string())
            .next_cursor
            .is_none());
        assert!(limit(Some(201)).is_err());
        assert!(limit(Some(0)).is_err());
    }
}
