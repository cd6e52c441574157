//! Base images for the docker builder: the engine pulls every base from kilnd's
//! registry, pinned by digest (DESIGN decision 2), through a rewritten Dockerfile.

use std::collections::BTreeMap;

use kiln_shared::digest::Digest;
use kiln_shared::reference::Tag;

use super::{Inner, PinError};
use crate::build::dockerfile::Dockerfile;
use crate::build::native::{self, cache_names, pick_platform};
use crate::oci::{Descriptor, Platform};
use crate::workspace::Planned;

impl Inner {
    /// The engine must pull every base image from kilnd's registry, pinned by digest to
    /// the right content (DESIGN decision 2): a `FROM` naming a workspace package follows
    /// its current tag; any other name the cache holds is served from the cache. Writes a
    /// rewritten Dockerfile when something was pinned.
    pub(super) fn pin_bases(
        &self,
        p: &Planned,
        platform: &Platform,
        args: &BTreeMap<String, String>,
        registry: &str,
        pins: &BTreeMap<String, Digest>,
    ) -> Result<Option<tempfile::NamedTempFile>, PinError> {
        let df = Dockerfile::read(&p.pkg.dockerfile)?;
        let text = std::fs::read_to_string(&p.pkg.dockerfile).map_err(|source| PinError::Read {
            path: p.pkg.dockerfile.clone(),
            source,
        })?;
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let index = self.cache.index()?;
        let deps: BTreeMap<&str, &Tag> = p.deps.iter().map(|(r, t)| (r.as_str(), t)).collect();
        let mut changed = false;
        for r in df.image_references(args, platform)? {
            let name = r.value.strip_prefix("docker.io/").unwrap_or(&r.value);
            let (repo, desc) = if let Some(digest) = pins.get(&r.value) {
                // The digest the package's kiln.lock pins.
                let full = crate::upstream::parse_image(&r.value)
                    .map(|i| crate::upstream::cache_name(&i))?;
                let repo = native::repository_of(&full)
                    .trim_start_matches("docker.io/")
                    .to_owned();
                let manifest = self.cache.read_manifest(digest)?;
                let size = self.cache.blob_size(digest)?.unwrap_or_default();
                let media_type = manifest
                    .media_type
                    .unwrap_or_else(|| crate::oci::OCI_MANIFEST.to_owned());
                (repo, Descriptor::new(media_type, digest.clone(), size))
            } else if let Some(tag) = deps.get(name) {
                let full = format!("docker.io/{name}:{tag}");
                let d = index
                    .get(&full)
                    .cloned()
                    .ok_or_else(|| PinError::NotBuilt {
                        image: format!("{name}:{tag}"),
                    })?;
                (name.to_owned(), d)
            } else if let Some((full, d)) = cache_names(name)
                .into_iter()
                .find_map(|n| index.get(&n).cloned().map(|d| (n, d)))
            {
                let repo = native::repository_of(&full)
                    .trim_start_matches("docker.io/")
                    .to_owned();
                (repo, d)
            } else {
                continue; // not ours: the engine resolves it as usual
            };
            // Check the platform is there before the engine finds out.
            pick_platform(&self.cache, name, desc.clone(), platform)?;
            let pinned = format!("{registry}/{repo}@{}", desc.digest);
            let Some(line) = lines.get_mut(r.line.saturating_sub(1)) else {
                continue;
            };
            if !line.contains(&r.value) {
                return Err(PinError::NotLiteral {
                    path: p.pkg.dockerfile.clone(),
                    line: r.line,
                    name: r.value,
                });
            }
            *line = line.replacen(&r.value, &pinned, 1);
            changed = true;
        }
        if !changed {
            return Ok(None);
        }
        let mut tmp = tempfile::Builder::new()
            .prefix("Dockerfile-")
            .tempfile_in(self.cache.tmp_dir())
            .map_err(PinError::Write)?;
        use std::io::Write;
        tmp.write_all((lines.join("\n") + "\n").as_bytes())
            .map_err(PinError::Write)?;
        Ok(Some(tmp))
    }
}
