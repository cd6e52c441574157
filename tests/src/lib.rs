//! kiln-tests: the harness for the end-to-end tests in `tests/e2e/`, which run the real
//! `kilnd` and `kiln` binaries against the real Docker engine, skopeo and Debian's
//! distribution registry. A test gets a temp workspace ([`Dir`]), a running daemon
//! ([`Kilnd`]), a plain registry ([`Registry`]), the local base images
//! ([`seed_base_images`]), commands with full failure reports ([`cmd()`], [`docker`],
//! [`skopeo`], [`git`]) and deadline-bounded waiting ([`wait_until`], [`wait_for`]).
//!
//! The environment (engine, qemu, base images) comes from `scripts/setup`.

pub mod api;
pub mod base;
pub mod cmd;
pub mod dir;
pub mod docker;
pub mod kilnd;
pub mod machine;
pub mod process;
pub mod registry;
pub mod wait;
pub mod workspace;

pub use api::{Api, Events};
pub use base::{BUSYBOX, BUSYBOX_REPO, busybox_layout, busybox_refs, seed_base_images};
pub use cmd::{Cmd, Output, cmd, docker, git, skopeo};
pub use dir::Dir;
pub use docker::PulledImage;
pub use kilnd::{Kilnd, KilndOptions, Ready, target_bin};
pub use registry::Registry;
pub use wait::{wait_for, wait_until};
