//! A real OCI registry for tests that need one besides kilnd: Debian's distribution
//! registry (`/usr/bin/docker-registry`, 2.8) on 127.0.0.1, a free port, filesystem
//! storage in a temp dir. Stands in for Docker Hub (which is out of reach) and for an
//! upstream team cache.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;

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
    secure: bool,
}

/// The user and password of a registry started with [`Registry::start_secure`].
pub const REGISTRY_USER: &str = "kiln";
pub const REGISTRY_PASSWORD: &str = "s3cret-pass";

impl Registry {
    /// Starts a plain-HTTP registry listening on 127.0.0.1 on a port the kernel picks,
    /// and waits until it says where it listens.
    pub fn start() -> Registry {
        Registry::launch(false, "127.0.0.1:0")
    }

    /// As [`Registry::start`], on a given address (a registry that comes up later than
    /// its clients, at the address they were told).
    pub fn start_at(addr: &str) -> Registry {
        Registry::launch(false, addr)
    }

    /// As [`Registry::start`], with TLS (a certificate for 127.0.0.1 signed by a CA made
    /// here with openssl: [`Registry::ca`]) and htpasswd Basic auth
    /// ([`REGISTRY_USER`], [`REGISTRY_PASSWORD`]).
    pub fn start_secure() -> Registry {
        Registry::launch(true, "127.0.0.1:0")
    }

    fn launch(secure: bool, addr: &str) -> Registry {
        let dir = Dir::new("registry");
        let mut extra = String::new();
        if secure {
            crate::cmd::cmd("sh")
                .arg("-ec")
                .arg(format!(
                    "cd {}
                     openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kiln-test-ca \
                       -keyout ca.key -out ca.pem 2>/dev/null
                     openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 \
                       -keyout server.key -out server.csr 2>/dev/null
                     printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext
                     openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                       -days 2 -extfile san.ext -out server.pem 2>/dev/null
                     htpasswd -Bbn {REGISTRY_USER} {REGISTRY_PASSWORD} > htpasswd",
                    dir.path().display()
                ))
                .run();
            extra = format!(
                "  tls:\n    certificate: {0}/server.pem\n    key: {0}/server.key\n\
                 auth:\n  htpasswd:\n    realm: kiln-test\n    path: {0}/htpasswd\n",
                dir.path().display()
            );
        }
        let config = dir.write(
            "config.yml",
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  secret: kiln-tests\n{extra}",
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
            secure,
        }
    }

    /// The CA certificate (PEM) of a registry started with [`Registry::start_secure`].
    pub fn ca(&self) -> Option<PathBuf> {
        self.secure.then(|| self.dir.join("ca.pem"))
    }

    /// A docker config directory (for `DOCKER_CONFIG`) whose config.json holds
    /// `user:password` for this registry, as `docker login` writes it.
    pub fn docker_config(&self, dir: &Path, user: &str, password: &str) -> PathBuf {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let file = dir.join("config.json");
        fs::write(
            &file,
            format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, self.addr),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        dir.to_owned()
    }

    /// Requests the registry answered so far whose method and path match (e.g. `GET`,
    /// `/blobs/`), counted from its access log.
    pub fn requests(&self, method: &str, path_part: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("response completed"))
            .filter(|l| l.contains(&format!("http.request.method={method} ")))
            .filter(|l| {
                l.split("http.request.uri=").nth(1).is_some_and(|u| {
                    u.split_whitespace()
                        .next()
                        .unwrap_or("")
                        .contains(path_part)
                })
            })
            .count()
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
