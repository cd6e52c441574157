//! Builders: what turns a target (package, tag, arch) into an image in the cache.
//! `dockerfile` is the parser both builders share; `native` builds Dockerfiles without
//! `RUN` in-process, deterministically.

pub mod docker;
pub mod dockerfile;
pub mod dockerignore;
pub mod native;
