//! The moving tag (`dev` by default): each repository's `dev` follows its newest landed
//! build. Moving it is a read-modify-write of the index, so it happens under one hold of
//! the writer lock.

use kiln_shared::reference::{ImageRef, Tag};

use super::{Cache, CacheError};

/// Points the moving tag (`dev`) of `image`'s repository at `image`'s index, when the
/// cache has it. Blocking (it waits for the commit of `index.json`).
pub fn point_dev(cache: &Cache, image: &ImageRef, dev: &Tag) {
    let name = image.cache_name();
    let dev_name = ImageRef::new(image.repo.clone(), dev.clone()).cache_name();
    // Most calls change nothing: look at the current view first.
    if let Ok(view) = cache.index() {
        match (view.get(&name), view.get(&dev_name)) {
            (None, _) => return,
            (Some(d), Some(cur)) if d.digest == cur.digest => return,
            _ => {}
        }
    }
    // Read and write in one change: two arches landing at once must not leave `dev` at
    // the index the first one read.
    let target = dev_name.clone();
    let moved = cache.update_refs(move |edit| {
        let Some(mut desc) = edit.get(&name).cloned() else {
            return Ok::<_, CacheError>(());
        };
        if edit
            .get(&target)
            .is_some_and(|cur| cur.digest == desc.digest)
        {
            return Ok(());
        }
        desc.annotations.clear();
        edit.set(&target, desc)
    });
    if let Err(e) = moved {
        tracing::warn!("cannot move {dev_name}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn dev_ends_at_the_full_index_when_arches_land_at_once() {
        use crate::oci::{Descriptor, OCI_MANIFEST, Platform};
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());
        let dev: Tag = "dev".parse().unwrap();
        for round in 0..50 {
            let image: ImageRef = format!("kiln/race:t{round}").parse().unwrap();
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let threads: Vec<_> = ["amd64", "arm64"]
                .into_iter()
                .map(|arch| {
                    let (cache, image, dev, barrier) =
                        (cache.clone(), image.clone(), dev.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        let body = format!("{{\"round\":{round},\"arch\":\"{arch}\"}}");
                        let d = cache.put_blob(body.as_bytes()).unwrap();
                        let m = Descriptor::new(OCI_MANIFEST, d, body.len() as u64);
                        barrier.wait();
                        cache
                            .merge_arch(&image, arch, Platform::linux(arch, None), m, None)
                            .unwrap();
                        point_dev(&cache, &image, &dev);
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let index = cache.index().unwrap();
            let full = index.get(&image.cache_name()).unwrap().digest.clone();
            let at = index.get("docker.io/kiln/race:dev").unwrap().digest.clone();
            assert_eq!(at, full, "round {round}: dev points at a one-arch index");
        }
    }
}
