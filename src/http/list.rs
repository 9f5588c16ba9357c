//! Every paginated route takes one query, `?limit=&cursor=` (`PageParams`), and
//! answers one body, `{"items": [...], "next_cursor": null | "…"}` (`PageBody`),
//! shared so the lists cannot drift apart on the wire or in the OpenAPI document.
//! Two names for one shape: the document published the user and session lists as
//! `Page_<Item>` and the others as `PageBody_<Item>`, and generated clients keep
//! those names.

use serde::{Deserialize, Serialize};

use crate::service::paging;
use crate::service::paging::PageQuery;

/// The page query of a list route. Routes that filter too repeat these two
/// fields in their own query (serde cannot flatten into a struct that refuses
/// unknown fields) and build the same `PageQuery`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

impl From<PageParams> for PageQuery {
    fn from(p: PageParams) -> Self {
        Self {
            limit: p.limit,
            cursor: p.cursor,
        }
    }
}

// Named `PageBody` on purpose: utoipa names each instance `PageBody_<Item>` in the
// document's components, which clients may already generate code from. A plain
// comment, not a doc comment: utoipa would publish it as the schema's description.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PageBody<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

impl<S, T: From<S>> From<paging::Page<S>> for PageBody<T> {
    fn from(p: paging::Page<S>) -> Self {
        Self {
            items: p.items.into_iter().map(T::from).collect(),
            next_cursor: p.next_cursor,
        }
    }
}

/// A page of a list: `{"items": [...], "next_cursor": null | "…"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

impl<T> Page<T> {
    pub fn new<S>(items: Vec<S>, next_cursor: Option<String>) -> Self
    where
        T: From<S>,
    {
        Self {
            items: items.into_iter().map(T::from).collect(),
            next_cursor,
        }
    }
}
