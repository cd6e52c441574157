//! Listing: the tags of a repository and the catalog, paged with `n` and `last`.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use kiln_shared::reference::RepoName;

use super::*;
use crate::registry::error::OciError;
use crate::registry::service::Service;
use serde_json::json;

impl Service {
    pub(in crate::registry) async fn tags(
        &self,
        repo: &RepoName,
        q: Option<&str>,
    ) -> Result<Resp, OciError> {
        let view = self.view().await?;
        let entry = view
            .repos
            .get(repo.as_str())
            .ok_or_else(|| OciError::NameUnknown(repo.to_string()))?;
        let names: Vec<&str> = entry.tags.keys().map(String::as_str).collect();
        let (page, next) = paginate(&names, q)?;
        paged(
            json!({ "name": repo.as_str(), "tags": page }),
            &format!("/v2/{repo}/tags/list"),
            next,
        )
    }

    pub(in crate::registry) async fn catalog(&self, q: Option<&str>) -> Result<Resp, OciError> {
        let view = self.view().await?;
        let names = view.repo_names();
        let (page, next) = paginate(&names, q)?;
        paged(json!({ "repositories": page }), "/v2/_catalog", next)
    }
}

/// One page of names, and the `last` and `n` of the next page if more follow.
type Page<'a> = (Vec<&'a str>, Option<(&'a str, usize)>);

/// A JSON list page, with the `Link` header to the next page when there is one.
fn paged(
    body: serde_json::Value,
    path: &str,
    next: Option<(&str, usize)>,
) -> Result<Resp, OciError> {
    let mut r = json_response(StatusCode::OK, Bytes::from(body.to_string()));
    if let Some((last, n)) = next {
        let link = format!("<{path}?last={}&n={n}>; rel=\"next\"", query::encode(last));
        r.headers_mut().insert(
            header::LINK,
            HeaderValue::from_str(&link).map_err(internal)?,
        );
    }
    Ok(r)
}

/// Parses `n` and `last` and cuts one page of sorted `names`; returns the page and, if
/// more follow, the `last` and `n` of the next page.
fn paginate<'a>(names: &[&'a str], q: Option<&str>) -> Result<Page<'a>, OciError> {
    let n = match query::param(q, "n") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            OciError::PaginationInvalid(format!("n={n:?} is not a number of entries"))
        })?),
        None => None,
    };
    let start = match query::param(q, "last") {
        Some(last) => names.partition_point(|x| *x <= last.as_str()),
        None => 0,
    };
    let rest = &names[start..];
    let take = n.unwrap_or(rest.len()).min(rest.len());
    let page = rest[..take].to_vec();
    let next = match (n, page.last()) {
        (Some(n), Some(last)) if take < rest.len() => Some((*last, n)),
        _ => None,
    };
    Ok((page, next))
}
