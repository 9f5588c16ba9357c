//! Keyset pagination for lists: `?limit=&cursor=`, answering `next_cursor`. A
//! cursor is opaque to clients (base64url of the last item's sort key).

use std::fmt::Display;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};

use super::ServiceError;
use crate::domain::instant;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

/// One page of any list: the only page type of the crate; the gateway answers
/// it as `{"items": [...], "next_cursor": null | "…"}` (`http::list`).
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A list short enough to answer whole: one page, no cursor.
    pub fn all(items: Vec<T>) -> Self {
        Self {
            items,
            next_cursor: None,
        }
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

/// The page size asked for, checked: 1..=200 (default 50).
fn limit(limit: Option<i64>) -> Result<i64, ServiceError> {
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

fn time_in_range(at: &DateTime<Utc>) -> bool {
    instant::storable(at)
}

/// A client-given instant (`since`, `until`, `expires_at`, …), checked against
/// the range PostgreSQL and RFC 3339 share (`domain::instant`).
pub fn check_time(
    field: &'static str,
    at: Option<DateTime<Utc>>,
) -> Result<Option<DateTime<Utc>>, ServiceError> {
    at.map(|t| instant::check(field, t))
        .transpose()
        .map_err(|e| ServiceError::Validation(vec![e]))
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

/// `?limit=&cursor=` as a client sent it: the one page query every list takes.
#[derive(Debug, Clone, Default)]
pub struct PageQuery {
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageQuery {
    /// Checks the query for a list sorted by `K`: the limit's range, and that the
    /// cursor is one of this list's.
    pub fn parse<K: SortKey>(&self) -> Result<PageRequest<K>, ServiceError> {
        Ok(PageRequest {
            limit: limit(self.limit)?,
            after: self.cursor.as_deref().map(K::decode).transpose()?,
        })
    }
}

/// A page query checked for one list: its size, and the sort key of the previous
/// page's last item (`None` on the first page).
#[derive(Debug, Clone, Copy)]
pub struct PageRequest<K> {
    pub limit: i64,
    pub after: Option<K>,
}

impl<K: SortKey> PageRequest<K> {
    /// How many rows to fetch: one more than the page tells whether another follows.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }

    /// The page of `rows` (fetched with `fetch()`), its cursor the key of the
    /// last item kept.
    pub fn page<T>(&self, rows: Vec<T>, key_of: impl Fn(&T) -> K) -> Page<T> {
        finish(rows, self.limit, |r| key_of(r).encode())
    }
}

/// A list's sort key, and its cursor: opaque to clients, base64url of the key.
pub trait SortKey: Sized {
    fn encode(&self) -> String;
    /// A cursor this list handed out; anything else is a validation error.
    fn decode(cursor: &str) -> Result<Self, ServiceError>;
}

/// A single-column key: audit row ids (newest first).
impl SortKey for i64 {
    fn encode(&self) -> String {
        encode(&self.to_string())
    }
    fn decode(cursor: &str) -> Result<Self, ServiceError> {
        decode(cursor)?.parse().map_err(|_| bad_cursor())
    }
}

/// A single-column key: UUIDv7 ids, in creation order (API keys).
impl SortKey for uuid::Uuid {
    fn encode(&self) -> String {
        encode(&self.to_string())
    }
    fn decode(cursor: &str) -> Result<Self, ServiceError> {
        decode(cursor)?.parse().map_err(|_| bad_cursor())
    }
}

/// (timestamp, id), the id a uuid: `<micros>.<id>`. Cursors of the users' list
/// written before issue 12 (`<rfc3339>|<id>`) are still accepted.
impl SortKey for (DateTime<Utc>, uuid::Uuid) {
    fn encode(&self) -> String {
        encode_time_id(self.0, self.1)
    }
    fn decode(cursor: &str) -> Result<Self, ServiceError> {
        let raw = decode(cursor)?;
        match raw.split_once('|') {
            Some((t, id)) => {
                let at = DateTime::parse_from_rfc3339(t)
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
                    .filter(time_in_range)
                    .ok_or_else(bad_cursor)?;
                Ok((at, id.parse().map_err(|_| bad_cursor())?))
            }
            None => split_time_id(&raw),
        }
    }
}

/// (timestamp, id), the id a serial (usage rows): `<micros>.<id>`.
impl SortKey for (DateTime<Utc>, i64) {
    fn encode(&self) -> String {
        encode_time_id(self.0, self.1)
    }
    fn decode(cursor: &str) -> Result<Self, ServiceError> {
        split_time_id(&decode(cursor)?)
    }
}

fn encode(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

fn decode(c: &str) -> Result<String, ServiceError> {
    URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad_cursor)
}

fn encode_time_id(at: DateTime<Utc>, id: impl Display) -> String {
    encode(&format!("{}.{id}", at.timestamp_micros()))
}

fn split_time_id<K: FromStr>(s: &str) -> Result<(DateTime<Utc>, K), ServiceError> {
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

/// Fetching `limit + 1` rows tells whether another page follows: trims the extra
/// row and returns the cursor of the last kept one.
fn finish<T>(mut rows: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> String) -> Page<T> {
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

    fn query(cursor: &str) -> PageQuery {
        PageQuery {
            limit: None,
            cursor: Some(cursor.into()),
        }
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = Uuid::new_v4();
        let key = (at, id);
        assert_eq!(
            query(&key.encode())
                .parse::<(DateTime<Utc>, Uuid)>()
                .unwrap()
                .after,
            Some(key)
        );
        assert!(<(DateTime<Utc>, Uuid)>::decode("!!").is_err());
        assert!(i64::decode(&encode("x")).is_err());
        assert_eq!(i64::decode(&42_i64.encode()).unwrap(), 42);
        assert_eq!(Uuid::decode(&id.encode()).unwrap(), id);
        let serial = (at, 7_i64).encode();
        assert_eq!(<(DateTime<Utc>, i64)>::decode(&serial).unwrap(), (at, 7));
        assert!(<(DateTime<Utc>, i64)>::decode(&key.encode()).is_err());
        // The users' list's cursors from before the one page query still hold.
        let legacy = encode(&format!("{}|{id}", at.to_rfc3339()));
        assert_eq!(<(DateTime<Utc>, Uuid)>::decode(&legacy).unwrap(), key);
    }

    #[test]
    fn cursors_and_filters_outside_what_postgresql_holds_are_refused() {
        // Valid for chrono, out of range for PostgreSQL (before 4713 BC).
        let far = encode(&format!("{}.7", -200_000_000_000_000_000_i64));
        assert!(<(DateTime<Utc>, i64)>::decode(&far).is_err());
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
    fn a_page_trims_the_probe_row() {
        let req = PageQuery {
            limit: Some(2),
            cursor: None,
        }
        .parse::<i64>()
        .unwrap();
        assert_eq!(req.fetch(), 3);
        let p = req.page(vec![1_i64, 2, 3], |n| *n);
        assert_eq!(p.items, vec![1, 2]);
        assert_eq!(p.next_cursor, Some(2_i64.encode()));
        assert!(req.page(vec![1_i64, 2], |n| *n).next_cursor.is_none());
        for bad in [201, 0] {
            let q = PageQuery {
                limit: Some(bad),
                cursor: None,
            };
            assert!(q.parse::<i64>().is_err());
        }
    }
}
