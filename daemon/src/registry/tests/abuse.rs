//! No web page or idle client can write to or lock up the registry (issue 12): Origin
//! and Host checks, deletes off by default, bounded uploads.

use super::*;

fn request(
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::copy_from_slice(body))).unwrap()
}

#[tokio::test]
async fn a_web_page_cannot_write() {
    let r = Reg::new();
    let before = r.snapshot();
    let data = b"cross-site";
    let uri = format!("/v2/x/blobs/uploads/?digest={}", sha(data));
    // What any page can make a browser send without a preflight.
    for origin in [
        "http://evil.example",
        "https://evil.example:5000",
        "null",
        "http://localhost.evil.example",
    ] {
        let a = r
            .send(request(
                Method::POST,
                &uri,
                &[
                    ("host", "127.0.0.1:5000"),
                    ("origin", origin),
                    ("content-type", "text/plain"),
                ],
                data,
            ))
            .await;
        a.is_error(403, "DENIED");
    }
    assert_eq!(r.snapshot(), before, "a cross-site request wrote");
    // Pages of the registry's own hosts may.
    for origin in [
        "http://localhost:5000",
        "http://127.0.0.1:5000",
        "http://registry.lan",
    ] {
        let a = r
            .send(request(
                Method::GET,
                "/v2/",
                &[("host", "localhost:5000"), ("origin", origin)],
                b"",
            ))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{origin}");
    }
}

#[tokio::test]
async fn two_hosts_or_a_foreign_absolute_authority_are_refused() {
    let r = Reg::new();
    let mut req = request(Method::GET, "/v2/", &[("host", "localhost:5000")], b"");
    req.headers_mut()
        .append("host", http::HeaderValue::from_static("evil.example"));
    let a = r.send(req).await;
    a.is_error(400, "DENIED");
    // Absolute form: the authority is the host (RFC 9112 3.2.2), whatever Host says.
    let a = r
        .send(request(
            Method::GET,
            "http://evil.example/v2/",
            &[("host", "localhost:5000")],
            b"",
        ))
        .await;
    a.is_error(403, "DENIED");
    let a = r
        .send(request(
            Method::GET,
            "http://localhost:5000/v2/",
            &[("host", "evil.example")],
            b"",
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn deletes_are_off_by_default() {
    let r = Reg::new();
    let body = r.image("org/img", "amd64").await;
    assert_eq!(
        r.push_manifest("org/img", "v1", OCI_MANIFEST, &body)
            .await
            .status,
        StatusCode::CREATED
    );
    let before = r.snapshot();
    let v: Value = serde_json::from_str(&body).unwrap();
    let layer = v["layers"][0]["digest"].as_str().unwrap();
    for uri in [
        "/v2/org/img/manifests/v1".to_owned(),
        format!("/v2/org/img/manifests/{}", sha(body.as_bytes())),
        format!("/v2/org/img/blobs/{layer}"),
    ] {
        let a = r.req(Method::DELETE, &uri, &[], Bytes::new()).await;
        a.is_error(405, "UNSUPPORTED");
        assert!(
            a.json()["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("--allow-delete")
        );
    }
    assert_eq!(r.snapshot(), before);
}

#[tokio::test]
async fn uploads_past_the_bound_get_429_with_retry_after() {
    let r = Reg::build(
        Hooks::default(),
        UploadLimits {
            max_sessions: 2,
            ..UploadLimits::default()
        },
        false,
    );
    let start = || {
        r.req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
    };
    let first = start().await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(start().await.status, StatusCode::ACCEPTED);
    let a = start().await;
    a.is_error(429, "TOOMANYREQUESTS");
    assert!(a.header("retry-after").parse::<u64>().is_ok());
    // A monolithic upload is refused too, and writes nothing.
    let data = b"monolithic";
    let a = r
        .req(
            Method::POST,
            &format!("/v2/org/img/blobs/uploads/?digest={}", sha(data)),
            &[],
            &data[..],
        )
        .await;
    a.is_error(429, "TOOMANYREQUESTS");
    // Reads go on.
    assert_eq!(r.get("/v2/", &[]).await.status, StatusCode::OK);
    // A session that ends makes room.
    let loc = first.header("location").to_owned();
    assert_eq!(
        r.req(Method::DELETE, &loc, &[], Bytes::new()).await.status,
        StatusCode::NO_CONTENT
    );
    r.push_blob("org/img", data).await;
}
