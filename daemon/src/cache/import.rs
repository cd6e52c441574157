//! Importing an image from another OCI image layout (a base image made without a
//! registry, another machine's cache): every blob of its graph is copied and verified,
//! then one reference names it.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::{Cache, CacheError};
use crate::oci::{AnyManifest, Descriptor, ImageIndex, is_document};

impl Cache {
    /// Copies the image that `src_ref` names in the layout at `src` (its
    /// `org.opencontainers.image.ref.name`) into this cache and names it `as_name`.
    /// Blobs the cache holds already are not copied again. Returns its descriptor.
    pub fn import_layout(
        &self,
        src: &Path,
        src_ref: &str,
        as_name: &str,
    ) -> Result<Descriptor, CacheError> {
        let index_path = src.join("index.json");
        let bytes = std::fs::read(&index_path).map_err(CacheError::io(&index_path))?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|source| CacheError::Json {
                path: index_path.clone(),
                source,
            })?;
        let desc = index
            .manifests
            .iter()
            .find(|d| d.ref_name() == Some(src_ref))
            .cloned()
            .ok_or_else(|| CacheError::NoSuchRef {
                layout: src.to_owned(),
                reference: src_ref.to_owned(),
                has: index
                    .manifests
                    .iter()
                    .filter_map(Descriptor::ref_name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        self.import_graph(src, &desc)?;
        let mut named = desc.clone();
        named.annotations.clear();
        self.set_ref(as_name, named)?;
        Ok(desc)
    }

    fn import_graph(&self, src: &Path, desc: &Descriptor) -> Result<(), CacheError> {
        if is_document(&desc.media_type) {
            let path = src.join("blobs/sha256").join(desc.digest.hex());
            let bytes = std::fs::read(&path).map_err(CacheError::io(&path))?;
            let doc: AnyManifest =
                serde_json::from_slice(&bytes).map_err(|source| CacheError::Json {
                    path: path.clone(),
                    source,
                })?;
            for child in doc.children() {
                self.import_graph(src, child)?;
            }
        }
        if self.blob_size(&desc.digest)? == Some(desc.size) {
            return Ok(());
        }
        let path = src.join("blobs/sha256").join(desc.digest.hex());
        let mut file = File::open(&path).map_err(CacheError::io(&path))?;
        let mut w = self.blob_writer()?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(CacheError::io(&path))?;
            if n == 0 {
                break;
            }
            w.write_bytes(&buf[..n])?;
        }
        w.finish(Some(&desc.digest), Some(desc.size))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{OCI_INDEX, OCI_MANIFEST, Platform};
    use kiln_shared::reference::ImageRef;

    #[test]
    fn an_image_moves_between_layouts_whole_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let a = Cache::open(&dir.path().join("a")).unwrap();
        let layer = a.put_blob(b"layer").unwrap();
        let config = a.put_blob(b"{}").unwrap();
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"c","digest":"{config}","size":2}},"layers":[{{"mediaType":"l","digest":"{layer}","size":5}}]}}"#
        );
        let md = a.put_blob(m.as_bytes()).unwrap();
        let image: ImageRef = "kiln/busybox:latest".parse().unwrap();
        let idx = a
            .merge_arch(
                &image,
                "arm64",
                Platform::linux("arm64", None),
                Descriptor::new(OCI_MANIFEST, md, m.len() as u64),
                None,
            )
            .unwrap();
        assert_eq!(idx.media_type, OCI_INDEX);
        // `a` is read as any OCI layout is, through its index.json: folded.
        a.fold_refs().unwrap();

        let b = Cache::open(&dir.path().join("b")).unwrap();
        let got = b
            .import_layout(
                a.root(),
                "docker.io/kiln/busybox:latest",
                "docker.io/base:1",
            )
            .unwrap();
        assert_eq!(got.digest, idx.digest);
        assert_eq!(
            b.index().unwrap().get("docker.io/base:1").unwrap().digest,
            idx.digest
        );
        assert!(crate::cache::fsck(&b, false).unwrap().is_clean());

        // A corrupt source blob is refused and names nothing.
        std::fs::write(a.blob_path(&layer), b"LAYER").unwrap();
        let c = Cache::open(&dir.path().join("c")).unwrap();
        let err = c
            .import_layout(
                a.root(),
                "docker.io/kiln/busybox:latest",
                "docker.io/base:1",
            )
            .unwrap_err();
        assert!(matches!(err, CacheError::DigestMismatch { .. }), "{err}");
        assert!(c.index().unwrap().get("docker.io/base:1").is_none());
        let missing = c
            .import_layout(a.root(), "docker.io/nope:1", "x")
            .unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("docker.io/kiln/busybox:latest"),
            "{missing}"
        );
    }
}
