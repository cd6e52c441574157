//! The `oci-client` crate: push (monolithic and chunked), pull, tag listing with paging,
//! ranged blob reads, cross-repository mounts and the referrers API.

use futures_util::TryStreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::{Server, sha};

fn client(monolithic: bool) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: monolithic,
        ..ClientConfig::default()
    })
}

fn reference(s: &Server, name: &str) -> Reference {
    s.name(name).parse().unwrap()
}

#[tokio::test]
async fn push_pull_tags_ranges_mounts_referrers() {
    let s = Server::start();
    let layer: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    for (tag, monolithic) in [("mono", true), ("chunked", false), ("c", true), ("a", true)] {
        let r = reference(&s, &format!("org/client:{tag}"));
        client(monolithic)
            .push(
                &r,
                &[ImageLayer::oci_v1(layer.clone(), None)],
                Config::oci_v1(config.to_vec(), None),
                &RegistryAuth::Anonymous,
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("push {tag}: {e}"));
    }
    let c = client(false);
    let r = reference(&s, "org/client:chunked");
    let image = c
        .pull(
            &r,
            &RegistryAuth::Anonymous,
            vec![oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE],
        )
        .await
        .unwrap();
    assert_eq!(image.layers[0].data, layer);
    let digest = image.digest.unwrap();
    assert_eq!(
        Some(digest.parse().unwrap()),
        s.cache_ref("org/client:chunked")
    );

    let tags = c
        .list_tags(&r, &RegistryAuth::Anonymous, Some(2), None)
        .await
        .unwrap();
    assert_eq!(tags.tags, ["a", "c"]);
    let tags = c
        .list_tags(&r, &RegistryAuth::Anonymous, Some(2), Some("c"))
        .await
        .unwrap();
    assert_eq!(tags.tags, ["chunked", "mono"]);

    // A ranged read from an offset.
    let layer_desc = &image.manifest.as_ref().unwrap().layers[0];
    let part = c
        .pull_blob_stream_partial(&r, layer_desc, 1000, Some(500))
        .await
        .unwrap();
    let BlobResponse::Partial(part) = part else {
        panic!("expected a 206 partial response");
    };
    let got: Vec<u8> = part
        .stream
        .map_ok(|b| b.to_vec())
        .try_concat()
        .await
        .unwrap();
    assert_eq!(got, layer[1000..1500]);

    // Mount into another repository.
    let other = reference(&s, "org/other:x");
    c.mount_blob(&other, &r, &layer_desc.digest).await.unwrap();

    // An artifact about the image, pushed by digest with a subject.
    c.push_blob(&r, b"{}", &sha(b"{}").to_string())
        .await
        .unwrap();
    let manifest_bytes = c
        .pull_manifest_raw(&r, &RegistryAuth::Anonymous, &[OCI_IMAGE_MEDIA_TYPE])
        .await
        .unwrap()
        .0;
    let artifact = OciImageManifest {
        artifact_type: Some("application/vnd.example.signature".into()),
        config: OciDescriptor {
            media_type: "application/vnd.oci.empty.v1+json".into(),
            digest: sha(b"{}").to_string(),
            size: 2,
            ..OciDescriptor::default()
        },
        layers: vec![],
        subject: Some(OciDescriptor {
            media_type: OCI_IMAGE_MEDIA_TYPE.into(),
            digest: digest.clone(),
            size: manifest_bytes.len() as i64,
            ..OciDescriptor::default()
        }),
        ..OciImageManifest::default()
    };
    let body = serde_json::to_vec(&artifact).unwrap();
    let art_ref = reference(&s, &format!("org/client@{}", sha(&body)));
    c.push_manifest_raw(
        &art_ref,
        body.clone(),
        OCI_IMAGE_MEDIA_TYPE.parse().unwrap(),
    )
    .await
    .unwrap();
    let subject = reference(&s, &format!("org/client@{digest}"));
    let referrers = c
        .pull_referrers(&subject, Some("application/vnd.example.signature"))
        .await
        .unwrap();
    assert_eq!(referrers.manifests.len(), 1);
    assert_eq!(referrers.manifests[0].digest, sha(&body).to_string());
    let none = c
        .pull_referrers(&subject, Some("application/vnd.example.sbom"))
        .await
        .unwrap();
    assert!(none.manifests.is_empty());
}
