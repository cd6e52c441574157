//! kiln's end-to-end tests: the real binaries against the real Docker engine, skopeo and
//! registries, in one test binary (a module per area). The environment comes from
//! `scripts/setup`; the harness is the `kiln_tests` library.

mod base_images;
mod build;
mod cli;
mod commands;
mod crash;
mod docker_errors;
mod kilnd;
mod native_run;
mod package_errors;
mod shutdown;
mod upstream;
mod watch;
mod watch_writers;
