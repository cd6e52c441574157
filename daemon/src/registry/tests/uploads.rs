//! Blobs and uploads: ranges, chunked and monolithic uploads, failures that leave
//! nothing, expiry, mounts.

use super::*;

#[tokio::test]
async fn blobs_are_served_with_ranges() {
    let r = Reg::new();
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 256) as u8).collect();
    let d = r.push_blob("org/img", &data).await;
    let uri = format!("/v2/org/img/blobs/{d}");
    let a = r.get(&uri, &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(&a.body[..], &data[..]);
    assert_eq!(a.header("content-length"), "3000");
    assert_eq!(a.header("docker-content-digest"), d.to_string());
    assert_eq!(a.header("etag"), format!("\"{d}\""));
    // Any repository name serves any blob of the cache.
    assert_eq!(
        r.get(&format!("/v2/other/repo/blobs/{d}"), &[])
            .await
            .status,
        StatusCode::OK
    );

    let head = r.req(Method::HEAD, &uri, &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), "3000");

    let part = r.get(&uri, &[("range", "bytes=100-199")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&part.body[..], &data[100..200]);
    assert_eq!(part.header("content-range"), "bytes 100-199/3000");
    let tail = r.get(&uri, &[("range", "bytes=-10")]).await;
    assert_eq!(&tail.body[..], &data[2990..]);
    let open = r.get(&uri, &[("range", "bytes=2999-")]).await;
    assert_eq!(&open.body[..], &data[2999..]);

    for bad in [
        "bytes=3000-",
        "bytes=10-5",
        "bytes=x-y",
        "lines=1-2",
        "bytes=-0",
    ] {
        let a = r.get(&uri, &[("range", bad)]).await;
        a.is_error(416, "RANGE_INVALID");
        assert_eq!(a.header("content-range"), "bytes */3000", "{bad}");
    }
    let cached = r.get(&uri, &[("if-none-match", &format!("\"{d}\""))]).await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert!(cached.body.is_empty());
}

#[tokio::test]
async fn chunked_upload_session() {
    let r = Reg::new();
    let data = b"hello, chunked world";
    let d = sha(data);
    let start = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(start.status, StatusCode::ACCEPTED);
    let loc = start.header("location").to_owned();
    assert!(loc.starts_with("/v2/org/img/blobs/uploads/"), "{loc}");
    assert_eq!(start.header("range"), "0-0");
    let id = start.header("docker-upload-uuid").to_owned();
    assert!(loc.ends_with(&id));

    let a = r
        .req(
            Method::PATCH,
            &loc,
            &[("content-range", "0-4"), ("content-length", "5")],
            &data[..5],
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    assert_eq!(a.header("range"), "0-4");
    // Out of order: the chunk after a gap, then a repeated chunk.
    r.req(
        Method::PATCH,
        &loc,
        &[("content-range", "10-14")],
        &data[10..15],
    )
    .await
    .is_error(416, "RANGE_INVALID");
    r.req(Method::PATCH, &loc, &[("content-range", "0-4")], &data[..5])
        .await
        .is_error(416, "RANGE_INVALID");
    // Another repository cannot touch the session.
    r.get(&format!("/v2/org/other/blobs/uploads/{id}"), &[])
        .await
        .is_error(404, "BLOB_UPLOAD_UNKNOWN");
    // A chunk without Content-Range is appended (docker's streaming upload).
    let a = r.req(Method::PATCH, &loc, &[], &data[5..12]).await;
    assert_eq!(a.header("range"), "0-11");
    let status = r.get(&loc, &[]).await;
    assert_eq!(status.status, StatusCode::NO_CONTENT);
    assert_eq!(status.header("range"), "0-11");
    assert_eq!(status.header("docker-upload-uuid"), id);
    // Finishing needs the digest.
    r.req(Method::PUT, &loc, &[], Bytes::new())
        .await
        .is_error(400, "DIGEST_INVALID");
    let done = r
        .req(
            Method::PUT,
            &format!("{loc}?digest={}", d.to_string().replace(':', "%3A")),
            &[],
            &data[12..],
        )
        .await;
    assert_eq!(done.status, StatusCode::CREATED, "{:?}", done.body);
    assert_eq!(done.header("location"), format!("/v2/org/img/blobs/{d}"));
    assert_eq!(done.header("docker-content-digest"), d.to_string());
    assert_eq!(
        &r.get(&format!("/v2/org/img/blobs/{d}"), &[]).await.body[..],
        data
    );
    r.get(&loc, &[]).await.is_error(404, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(std::fs::read_dir(r.cache.tmp_dir()).unwrap().count(), 0);
}

#[tokio::test]
async fn failed_uploads_leave_nothing() {
    let r = Reg::new();
    let before = r.snapshot();
    let data = b"some blob bytes";
    let wrong = sha(b"other bytes");

    // Monolithic with the wrong digest.
    r.req(
        Method::POST,
        &format!("/v2/org/img/blobs/uploads/?digest={wrong}"),
        &[],
        &data[..],
    )
    .await
    .is_error(400, "DIGEST_INVALID");
    // Session finished with the wrong digest: the session is gone too.
    let loc = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await
        .header("location")
        .to_owned();
    r.req(Method::PATCH, &loc, &[], &data[..]).await;
    r.req(
        Method::PUT,
        &format!("{loc}?digest={wrong}"),
        &[],
        Bytes::new(),
    )
    .await
    .is_error(400, "DIGEST_INVALID");
    r.get(&loc, &[]).await.is_error(404, "BLOB_UPLOAD_UNKNOWN");

    // A body shorter than its Content-Length (what hyper reports as a body error).
    let d = sha(data);
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(Bytes::from_static(b"some "))),
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        )),
    ];
    let req = Request::post(format!("/v2/org/img/blobs/uploads/?digest={d}"))
        .header("host", "localhost")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    r.send(req).await.is_error(400, "BLOB_UPLOAD_INVALID");
    // A body that does not match its announced length.
    r.req(
        Method::POST,
        &format!("/v2/org/img/blobs/uploads/?digest={d}"),
        &[("content-length", "99")],
        &data[..],
    )
    .await
    .is_error(400, "SIZE_INVALID");
    // A chunk longer than its Content-Range says kills the session.
    let loc = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await
        .header("location")
        .to_owned();
    r.req(Method::PATCH, &loc, &[("content-range", "0-3")], &data[..])
        .await
        .is_error(400, "SIZE_INVALID");
    r.get(&loc, &[]).await.is_error(404, "BLOB_UPLOAD_UNKNOWN");
    r.req(
        Method::PATCH,
        &loc,
        &[("content-range", "0-1x")],
        &data[..2],
    )
    .await
    .is_error(404, "BLOB_UPLOAD_UNKNOWN");
    // A malformed Content-Range.
    let loc = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await
        .header("location")
        .to_owned();
    r.req(
        Method::PATCH,
        &loc,
        &[("content-range", "bytes=a-b")],
        &data[..],
    )
    .await
    .is_error(416, "RANGE_INVALID");
    // Cancelled upload.
    let del = r.req(Method::DELETE, &loc, &[], Bytes::new()).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    r.req(Method::DELETE, &loc, &[], Bytes::new())
        .await
        .is_error(404, "BLOB_UPLOAD_UNKNOWN");

    assert_eq!(r.snapshot(), before, "failed uploads must leave no file");
    assert!(r.svc.uploads().is_empty());
}

#[tokio::test]
async fn abandoned_uploads_expire() {
    let r = Reg::with(Hooks::default(), Duration::ZERO);
    let before = r.snapshot();
    let loc = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await
        .header("location")
        .to_owned();
    r.req(Method::PATCH, &loc, &[], b"partial".to_vec()).await;
    assert_ne!(
        r.snapshot(),
        before,
        "the partial upload is a temp file in the cache"
    );
    assert_eq!(r.svc.uploads().expire(), 1);
    r.get(&loc, &[]).await.is_error(404, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(r.snapshot(), before);
}

#[tokio::test]
async fn cross_repository_mount() {
    let r = Reg::new();
    let d = r.push_blob("org/a", b"shared layer").await;
    let a = r
        .req(
            Method::POST,
            &format!("/v2/org/b/blobs/uploads/?mount={d}&from=org/a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.header("location"), format!("/v2/org/b/blobs/{d}"));
    let missing = sha(b"not here");
    let a = r
        .req(
            Method::POST,
            &format!("/v2/org/b/blobs/uploads/?mount={missing}&from=org/a"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        a.status,
        StatusCode::ACCEPTED,
        "a failed mount starts an upload"
    );
    assert!(a.header("location").starts_with("/v2/org/b/blobs/uploads/"));
}

#[tokio::test]
async fn a_stalled_upload_body_is_dropped() {
    // The upload ttl is also how long a body may stall.
    let r = Reg::with(Hooks::default(), Duration::from_millis(200));
    let before = r.snapshot();
    let loc = r
        .req(
            Method::POST,
            "/v2/org/img/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await
        .header("location")
        .to_owned();
    // Some bytes, then silence on an open connection.
    let first = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(Frame::data(
        Bytes::from_static(b"partial"),
    ))]);
    let stalled = first.chain(futures_util::stream::pending());
    let req = Request::patch(&loc)
        .header("host", "localhost")
        .body(StreamBody::new(stalled))
        .unwrap();
    r.send(req).await.is_error(400, "BLOB_UPLOAD_INVALID");
    r.get(&loc, &[]).await.is_error(404, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(r.snapshot(), before);
}
