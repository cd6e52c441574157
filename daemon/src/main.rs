//! kilnd: the kiln daemon.

fn main() -> anyhow::Result<()> {
    Ok(())
}
