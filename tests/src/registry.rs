//! A real OCI registry for tests that need one besides kilnd: Debian's distribution
//! registry (`/usr/bin/docker-registry`, 2.8) on 127.0.0.1, a free port, filesystem
//! storage in a temp dir. Stands in for Docker Hub (which is out of reach) and for an
//! upstream team cache.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::dir::Dir;
use crate::process::{self, stop_child};
use crate::wait::try_wait_for;

/// The registry program (override with `KILN_DOCKER_REGISTRY`).
pub fn registry_program() -> PathBuf {
    std::env::var_os("KILN_DOCKER_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"))
}

/// A running distribution registry; stopped (and its storage removed) on drop.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    addr: String,
    log: PathBuf,
    dir: Dir,
}

impl Registry {
    /// Starts a registry listening on 127.0.0.1 on a port the kernel picks, and waits until
    /// it says where it listens.
    pub fn start() -> Registry {
        let dir = Dir::new("registry");
        let config = dir.write(
            "config.yml",
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:0\n  secret: kiln-tests\n",
                dir.join("data").display()
            ),
        );
        let log = dir.join("registry.log");
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("dup {}: {e}", log.display()));
        let program = registry_program();
        let mut child = Command::new(&program)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); install it with scripts/setup (Debian package docker-registry)",
                    program.display()
                )
            });
        let found = try_wait_for(Duration::from_secs(30), "the registry to listen", || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(format!("it exited with {status}")));
            }
            listening_addr(&fs::read_to_string(&log).unwrap_or_default()).map(Ok)
        })
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let addr = match found {
            Ok(addr) => addr,
            Err(why) => {
                stop_child(&mut child, Duration::from_secs(5));
                panic!(
                    "{} did not start: {why}\n{}",
                    program.display(),
                    process::log_tail(&log, 64 * 1024)
                );
            }
        };
        Registry {
            child: Some(child),
            addr,
            log,
            dir,
        }
    }

    /// `127.0.0.1:PORT`, for references like `127.0.0.1:PORT/kiln/busybox:latest`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Where its blobs and repositories are stored.
    pub fn storage(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!(
                "--- docker-registry log ({}) ---\n{}",
                self.log.display(),
                process::log_tail(&self.log, 16 * 1024)
            );
        }
    }
}

/// The address in the registry's `listening on 127.0.0.1:PORT` log line.
fn listening_addr(log: &str) -> Option<String> {
    log.lines().find_map(|line| {
        let rest = &line[line.find("listening on ")? + "listening on ".len()..];
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        // The port is known only once the kernel picked it: never ":0".
        addr.parse::<std::net::SocketAddr>()
            .ok()
            .filter(|a| a.port() != 0)
            .map(|_| addr)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_listening_address_in_the_log() {
        let log = "time=\"2026-11-22T10:16:26Z\" level=warning msg=\"No HTTP secret provided\"\n\
                   time=\"2026-11-22T10:16:26Z\" level=info msg=\"listening on 127.0.0.1:45541\" go.version=go1.19.8\n";
        assert_eq!(listening_addr(log).as_deref(), Some("127.0.0.1:45541"));
    }

    #[test]
    fn no_address_before_the_line_or_for_port_zero() {
        assert_eq!(
            listening_addr("level=info msg=\"redis not configured\"\n"),
            None
        );
        assert_eq!(listening_addr("msg=\"listening on 127.0.0.1:0\"\n"), None);
        assert_eq!(listening_addr("msg=\"listening on 127.0.0.1:"), None);
    }
}
