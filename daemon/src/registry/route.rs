//! Which OCI endpoint a request path names. Repository names hold slashes, so paths are
//! matched from the right (`…/manifests/<ref>`, `…/blobs/<digest>`,
//! `…/blobs/uploads/<id>`, `…/tags/list`, `…/referrers/<digest>`): one parser for every
//! depth, not a route per depth. Names and references come out raw; the handlers
//! validate them with the shared grammar, so a bad one gets `NAME_INVALID` and friends.

/// An OCI endpoint and the raw path parts it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: &'a str, reference: &'a str },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: &'a str, digest: &'a str },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart { name: &'a str },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: &'a str, id: &'a str },
    /// `/v2/<name>/tags/list`
    Tags { name: &'a str },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: &'a str, digest: &'a str },
}

impl<'a> Route<'a> {
    /// Parses the path of a request (without the query). `None`: no OCI endpoint.
    pub fn parse(path: &'a str) -> Option<Route<'a>> {
        let rest = path.strip_prefix("/v2")?;
        if rest.is_empty() || rest == "/" {
            return Some(Route::Base);
        }
        let rest = rest.strip_prefix('/')?;
        if rest == "_catalog" {
            return Some(Route::Catalog);
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Some(Route::Tags { name });
        }
        if let Some(name) = rest
            .strip_suffix("/blobs/uploads/")
            .or_else(|| rest.strip_suffix("/blobs/uploads"))
        {
            return Some(Route::UploadStart { name });
        }
        let (head, last) = rest.rsplit_once('/')?;
        let (name, kind) = head.rsplit_once('/')?;
        match kind {
            "manifests" => Some(Route::Manifest {
                name,
                reference: last,
            }),
            "blobs" => Some(Route::Blob { name, digest: last }),
            "referrers" => Some(Route::Referrers { name, digest: last }),
            "uploads" => {
                let name = name.strip_suffix("/blobs")?;
                Some(Route::Upload { name, id: last })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_from_the_right() {
        assert_eq!(Route::parse("/v2/"), Some(Route::Base));
        assert_eq!(Route::parse("/v2"), Some(Route::Base));
        assert_eq!(Route::parse("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(
            Route::parse("/v2/a/b/c/manifests/latest"),
            Some(Route::Manifest {
                name: "a/b/c",
                reference: "latest"
            })
        );
        // A repository whose name ends in an endpoint word.
        assert_eq!(
            Route::parse("/v2/x/manifests/manifests/v1"),
            Some(Route::Manifest {
                name: "x/manifests",
                reference: "v1"
            })
        );
        assert_eq!(
            Route::parse("/v2/org/blobs/blobs/sha256:ab"),
            Some(Route::Blob {
                name: "org/blobs",
                digest: "sha256:ab"
            })
        );
        assert_eq!(
            Route::parse("/v2/o/i/blobs/uploads/"),
            Some(Route::UploadStart { name: "o/i" })
        );
        assert_eq!(
            Route::parse("/v2/o/i/blobs/uploads"),
            Some(Route::UploadStart { name: "o/i" })
        );
        assert_eq!(
            Route::parse("/v2/o/i/blobs/uploads/abc"),
            Some(Route::Upload {
                name: "o/i",
                id: "abc"
            })
        );
        assert_eq!(
            Route::parse("/v2/o/i/tags/list"),
            Some(Route::Tags { name: "o/i" })
        );
        assert_eq!(
            Route::parse("/v2/o/referrers/sha256:ab"),
            Some(Route::Referrers {
                name: "o",
                digest: "sha256:ab"
            })
        );
    }

    #[test]
    fn leaves_odd_names_to_validation() {
        // The router does not judge names; `..` reaches the name validator.
        assert_eq!(
            Route::parse("/v2/../../etc/manifests/x"),
            Some(Route::Manifest {
                name: "../../etc",
                reference: "x"
            })
        );
        assert_eq!(
            Route::parse("/v2//manifests/x"),
            Some(Route::Manifest {
                name: "",
                reference: "x"
            })
        );
    }

    #[test]
    fn rejects_other_paths() {
        for p in [
            "/",
            "/v1/x",
            "/v2x",
            "/v2/x",
            "/v2/x/y",
            "/v2/x/uploads/y",
            "/v2/x/other/y",
            "/v2/manifests/x",
        ] {
            assert_eq!(Route::parse(p), None, "{p}");
        }
    }
}
