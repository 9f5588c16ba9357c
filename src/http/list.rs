//! The body every paginated route answers, `{"items": [...], "next_cursor": null | "…"}`,
//! shared so the lists cannot drift apart on the wire or in the OpenAPI document.

use serde::Serialize;

use crate::service::paging::Page;

// Named `PageBody` on purpose: utoipa names each instance `PageBody_<Item>` in the
// document's components, which clients may already generate code from. A plain
// comment, not a doc comment: utoipa would publish it as the schema's description.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PageBody<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

impl<S, T: From<S>> From<Page<S>> for PageBody<T> {
    fn from(p: Page<S>) -> Self {
        Self {
            items: p.items.into_iter().map(T::from).collect(),
            next_cursor: p.next_cursor,
        }
    }
}
