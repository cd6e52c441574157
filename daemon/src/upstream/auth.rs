//! Credentials for an upstream, from where users already keep them: docker's
//! `config.json` (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`: `credHelpers`,
//! `auths`, `credsStore`, the helpers being `docker-credential-<name>` programs) and the
//! containers' auth file (`REGISTRY_AUTH_FILE`, else `$XDG_RUNTIME_DIR/containers/auth.json`,
//! else `~/.config/containers/auth.json`, podman's and skopeo's). Never from kiln.toml.
//!
//! Written here rather than taken from the `docker_credential` crate: that crate reads only
//! docker's file (not `REGISTRY_AUTH_FILE` or podman's), and both files share the `auths`
//! format, so one small reader serves both. Nothing here logs a secret: errors name the
//! file or helper, never what it returned.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("credential helper docker-credential-{helper} for {registry}: {message}")]
    Helper {
        helper: String,
        registry: String,
        message: String,
    },
}

/// The parts of a `config.json` / `auth.json` that hold credentials (no Debug: it holds
/// secrets).
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// The files credentials are read from, in order.
#[derive(Debug, Clone, Default)]
pub struct AuthFiles(pub Vec<PathBuf>);

impl AuthFiles {
    /// Where docker, podman and skopeo keep them, as this process's environment says.
    pub fn from_env() -> AuthFiles {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let home = env("HOME");
        let mut files = Vec::new();
        match env("DOCKER_CONFIG") {
            Some(dir) => files.push(dir.join("config.json")),
            None => files.extend(home.as_ref().map(|h| h.join(".docker/config.json"))),
        }
        match env("REGISTRY_AUTH_FILE") {
            Some(f) => files.push(f),
            None => {
                files.extend(env("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")));
                files.extend(home.map(|h| h.join(".config/containers/auth.json")));
            }
        }
        AuthFiles(files)
    }

    /// The credentials for `registry` (`host[:port]` as users write it; `docker.io` for
    /// Docker Hub), or anonymous access if none is configured.
    pub fn credentials_for(&self, registry: &str) -> Result<RegistryAuth, AuthError> {
        for path in &self.0 {
            let Some(file) = read_auth_file(path)? else {
                continue;
            };
            if let Some(auth) = from_file(&file, path, registry)? {
                return Ok(auth);
            }
        }
        Ok(RegistryAuth::Anonymous)
    }
}

fn read_auth_file(path: &Path) -> Result<Option<AuthFile>, AuthError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(AuthError::File {
                path: path.to_owned(),
                message: e.to_string(),
            });
        }
    };
    // serde_json's message names a line and column, never the value.
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| AuthError::File {
            path: path.to_owned(),
            message: format!("invalid JSON: {e}"),
        })
}

/// The keys a registry may have in `auths`/`credHelpers`: docker writes Docker Hub as
/// `https://index.docker.io/v1/`, others as `host[:port]`, sometimes with a scheme.
fn matches(key: &str, registry: &str) -> bool {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    host == registry || (hub(host) && hub(registry))
}

fn from_file(
    file: &AuthFile,
    path: &Path,
    registry: &str,
) -> Result<Option<RegistryAuth>, AuthError> {
    if let Some((key, helper)) = file.cred_helpers.iter().find(|(k, _)| matches(k, registry)) {
        return run_helper(helper, key, registry);
    }
    if let Some(entry) = file
        .auths
        .iter()
        .find(|(k, _)| matches(k, registry))
        .map(|(_, e)| e)
    {
        if let Some(auth) = decode_entry(entry, path, registry)? {
            return Ok(Some(auth));
        }
    }
    if let Some(store) = &file.creds_store {
        let key = if matches("docker.io", registry) {
            "https://index.docker.io/v1/"
        } else {
            registry
        };
        return run_helper(store, key, registry);
    }
    Ok(None)
}

fn decode_entry(
    entry: &AuthEntry,
    path: &Path,
    registry: &str,
) -> Result<Option<RegistryAuth>, AuthError> {
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(RegistryAuth::Basic(u.clone(), p.clone())));
    }
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let bad = |what: &str| AuthError::File {
            path: path.to_owned(),
            message: format!(
                "auths entry for {registry}: \"auth\" is not base64 of user:password ({what})"
            ),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad("not base64"))?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
        let (u, p) = text.split_once(':').ok_or_else(|| bad("no ':'"))?;
        return Ok(Some(RegistryAuth::Basic(u.to_owned(), p.to_owned())));
    }
    if entry.identity_token.is_some() {
        tracing::warn!(
            registry,
            file = %path.display(),
            "an identity token (OAuth refresh token) is not supported; log in with a password or access token"
        );
    }
    Ok(None)
}

/// The docker credential-helper protocol: `docker-credential-<name> get`, the server URL
/// on stdin, `{"Username": ..., "Secret": ...}` on stdout; "not found" is no credentials.
fn run_helper(helper: &str, key: &str, registry: &str) -> Result<Option<RegistryAuth>, AuthError> {
    run_program(
        Path::new(&format!("docker-credential-{helper}")),
        helper,
        key,
        registry,
    )
}

fn run_program(
    program: &Path,
    helper: &str,
    key: &str,
    registry: &str,
) -> Result<Option<RegistryAuth>, AuthError> {
    let fail = |message: String| AuthError::Helper {
        helper: helper.to_owned(),
        registry: registry.to_owned(),
        message,
    };
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run {}: {e}; install it or remove it from config.json",
                program.display()
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(key.as_bytes())
            .map_err(|e| fail(format!("writing to it: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for it: {e}")))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout);
        if said.contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!("it exited with {}", out.status)));
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Reply {
        username: String,
        secret: String,
    }
    let reply: Reply = serde_json::from_slice(&out.stdout)
        .map_err(|_| fail("its output is not {\"Username\",\"Secret\"} JSON".into()))?;
    if reply.username == "<token>" {
        tracing::warn!(
            registry,
            helper,
            "an identity token from a credential helper is not supported"
        );
        return Ok(None);
    }
    Ok(Some(RegistryAuth::Basic(reply.username, reply.secret)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str) -> AuthFile {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn auths_by_host_and_docker_hub_key() {
        let f = file(
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"reg:5000":{"username":"a","password":"b"}}}"#,
        );
        let p = Path::new("config.json");
        assert_eq!(
            from_file(&f, p, "docker.io").unwrap(),
            Some(RegistryAuth::Basic("u".into(), "p".into()))
        );
        assert_eq!(
            from_file(&f, p, "registry-1.docker.io").unwrap(),
            Some(RegistryAuth::Basic("u".into(), "p".into()))
        );
        assert_eq!(
            from_file(&f, p, "reg:5000").unwrap(),
            Some(RegistryAuth::Basic("a".into(), "b".into()))
        );
        assert_eq!(from_file(&f, p, "other:5000").unwrap(), None);
    }

    #[test]
    fn a_bad_auth_names_the_file_not_the_secret() {
        let f = file(r#"{"auths":{"reg":{"auth":"!!secret!!"}}}"#);
        let err = from_file(&f, Path::new("/x/config.json"), "reg").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/x/config.json") && !msg.contains("secret"),
            "{msg}"
        );
    }

    #[test]
    fn helpers_are_run_with_the_server_on_stdin() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-kilntest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread server\n[ \"$1\" = get ] || exit 3\n\
             case \"$server\" in reg:5000) echo '{\"ServerURL\":\"reg:5000\",\"Username\":\"h\",\"Secret\":\"s\"}';;\n\
             *) echo 'credentials not found in native keychain'; exit 1;; esac\n",
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            run_program(&helper, "kilntest", "reg:5000", "reg:5000").unwrap(),
            Some(RegistryAuth::Basic("h".into(), "s".into()))
        );
        assert_eq!(
            run_program(&helper, "kilntest", "other", "other").unwrap(),
            None
        );
        let f = file(r#"{"credsStore":"kiln-absent-helper"}"#);
        let err = from_file(&f, Path::new("c.json"), "reg:5000").unwrap_err();
        assert!(
            err.to_string()
                .contains("docker-credential-kiln-absent-helper"),
            "{err}"
        );
    }
}
