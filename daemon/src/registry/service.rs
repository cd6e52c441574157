//! The thin service: what every request shares (the cache, its view, the upload
//! sessions, the hooks), one layer around every route (the request guard before, the
//! API-version header after, errors as OCI error JSON), and the routing of an OCI
//! endpoint and method to its resource's handler in [`super::handlers`].

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use http::{HeaderValue, Method, Request, StatusCode};

use super::Hooks;
use super::error::OciError;
use super::handlers::{ReqBody, Resp, blocking, internal, json_response, parse_reference};
use super::host::HostGuard;
use super::route::Route;
use super::uploads::{UploadLimits, Uploads};
use super::view::View;
use crate::cache::Cache;

const API_VERSION_HEADER: &str = "docker-distribution-api-version";
const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

/// Everything a request needs: the cache, the view of it, uploads, hooks.
#[derive(Debug)]
pub struct Service {
    pub(super) cache: Arc<Cache>,
    guard: HostGuard,
    pub(super) uploads: Uploads,
    view: RwLock<Arc<View>>,
    rebuild: tokio::sync::Mutex<()>,
    pub(super) hooks: Hooks,
    allow_delete: bool,
}

impl Service {
    pub fn new(
        cache: Arc<Cache>,
        guard: HostGuard,
        uploads: UploadLimits,
        allow_delete: bool,
        hooks: Hooks,
    ) -> Self {
        Service {
            cache,
            guard,
            uploads: Uploads::new(uploads),
            view: RwLock::new(Arc::new(View::default())),
            rebuild: tokio::sync::Mutex::new(()),
            hooks,
            allow_delete,
        }
    }

    /// Deletes are served only when enabled.
    fn deletes(&self) -> Result<(), OciError> {
        if self.allow_delete {
            Ok(())
        } else {
            Err(OciError::Unsupported(
                "deletes are off: start kilnd with --allow-delete (or set allow-delete = true \
                 under [registry] in kiln.toml) to serve them; `kiln` deletes through its \
                 control socket"
                    .into(),
            ))
        }
    }

    pub fn uploads(&self) -> &Uploads {
        &self.uploads
    }

    /// Answers one request. Never fails: errors become OCI error responses. The one
    /// layer every route goes through: the request guard (Host, Origin) first, the
    /// API-version header on every answer.
    pub async fn handle<B: ReqBody>(&self, req: Request<B>, peer: SocketAddr) -> Resp {
        let answer = match self.guard.check(&req) {
            Ok(()) => self.route(req, peer).await,
            Err(e) => Err(e),
        };
        let mut resp = answer.unwrap_or_else(OciError::into_response);
        resp.headers_mut().insert(API_VERSION_HEADER, API_VERSION);
        resp
    }

    /// Sends the request to the handler of its resource.
    async fn route<B: ReqBody>(&self, req: Request<B>, peer: SocketAddr) -> Result<Resp, OciError> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let q = parts.uri.query();
        let m = &parts.method;
        let h = &parts.headers;
        let route = Route::parse(path).ok_or_else(|| OciError::NotFound(path.to_owned()))?;
        let not_allowed = |what: &'static str| OciError::MethodNotAllowed {
            method: m.to_string(),
            what,
        };
        match route {
            Route::Base => match *m {
                Method::GET | Method::HEAD => Ok(json_response(
                    StatusCode::OK,
                    bytes::Bytes::from_static(b"{}"),
                )),
                _ => Err(not_allowed("/v2/")),
            },
            Route::Catalog => match *m {
                Method::GET => self.catalog(q).await,
                _ => Err(not_allowed("the catalog")),
            },
            Route::Manifest { name, reference } => {
                let repo = super::handlers::repo_name(name)?;
                let reference = match parse_reference(reference) {
                    // What is not a tag names no manifest here (as the distribution
                    // conformance tests expect); a push of it is a bad request.
                    Err(OciError::TagInvalid(why)) if matches!(*m, Method::GET | Method::HEAD) => {
                        return Err(OciError::ManifestUnknown(format!(
                            "{repo}:{reference} is not in the cache: {why}"
                        )));
                    }
                    parsed => parsed?,
                };
                match *m {
                    Method::GET | Method::HEAD => {
                        self.get_manifest(&repo, reference, m == Method::HEAD, h, peer)
                            .await
                    }
                    Method::PUT => self.put_manifest(&repo, reference, h, body).await,
                    Method::DELETE => {
                        self.deletes()?;
                        self.delete_manifest(&repo, reference).await
                    }
                    _ => Err(not_allowed("manifests")),
                }
            }
            Route::Blob { name, digest } => {
                let repo = super::handlers::repo_name(name)?;
                let digest = super::handlers::parse_digest(digest)?;
                match *m {
                    Method::GET | Method::HEAD => {
                        self.get_blob(&digest, m == Method::HEAD, h).await
                    }
                    Method::DELETE => {
                        self.deletes()?;
                        self.delete_blob(&repo, &digest).await
                    }
                    _ => Err(not_allowed("blobs")),
                }
            }
            Route::UploadStart { name } => {
                let repo = super::handlers::repo_name(name)?;
                match *m {
                    Method::POST => self.start_upload(&repo, q, h, body).await,
                    _ => Err(not_allowed("blob uploads")),
                }
            }
            Route::Upload { name, id } => {
                let repo = super::handlers::repo_name(name)?;
                match *m {
                    Method::GET => self.upload_status(&repo, id).await,
                    Method::PATCH => self.patch_upload(&repo, id, h, body).await,
                    Method::PUT => self.finish_upload(&repo, id, q, h, body).await,
                    Method::DELETE => self.cancel_upload(&repo, id).await,
                    _ => Err(not_allowed("blob uploads")),
                }
            }
            Route::Tags { name } => {
                let repo = super::handlers::repo_name(name)?;
                match *m {
                    Method::GET => self.tags(&repo, q).await,
                    _ => Err(not_allowed("tag lists")),
                }
            }
            Route::Referrers { name, digest } => {
                super::handlers::repo_name(name)?;
                let digest = super::handlers::parse_digest(digest)?;
                match *m {
                    Method::GET => self.referrers(&digest, q).await,
                    _ => Err(not_allowed("referrers")),
                }
            }
        }
    }

    /// The view of the cache as it is now: the cache stats its files; the view follows
    /// only when they changed.
    pub(super) async fn view(&self) -> Result<Arc<View>, OciError> {
        let source = self.cache.index().map_err(internal)?;
        let current = self.current_view();
        if current
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &source))
        {
            return Ok(current);
        }
        let _one_rebuild = self.rebuild.lock().await;
        let current = self.current_view();
        let source = self.cache.index().map_err(internal)?;
        if current
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &source))
        {
            return Ok(current);
        }
        let cache = Arc::clone(&self.cache);
        let fresh = blocking(move || Ok(Arc::new(View::next(&cache, source, &current)))).await?;
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
        Ok(fresh)
    }

    fn current_view(&self) -> Arc<View> {
        Arc::clone(&self.view.read().unwrap_or_else(|p| p.into_inner()))
    }
}
