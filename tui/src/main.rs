//! kiln: the dashboard and command line for kilnd.

fn main() -> anyhow::Result<()> {
    Ok(())
}
