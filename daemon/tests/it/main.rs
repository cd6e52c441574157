//! kiln-daemon's integration tests: real git repositories, real file systems.

mod workspace;
