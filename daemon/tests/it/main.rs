//! kiln-daemon's integration tests: one binary, a module per area.

mod registry;
