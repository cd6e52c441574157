//! Upstreams against Debian's distribution registry (`docker-registry`) on a free
//! loopback port: once plain HTTP, once TLS with a CA made here and htpasswd Basic auth,
//! the credentials in a docker `config.json`. Push a target from one cache, fetch it
//! into another (same digests, only missing blobs, verified), fetch any image whole,
//! and the errors: wrong credentials, an unreachable upstream, a corrupt blob.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_daemon::build::docker::platform_for_arch;
use kiln_daemon::cache::{Cache, fsck};
use kiln_daemon::upstream::{AuthFiles, UpstreamError, UpstreamSpec, Upstreams};
use kiln_shared::reference::ImageRef;

use crate::registry::{Image, run};

/// A distribution registry on 127.0.0.1:<free port>; killed on drop.
struct Upstream {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

/// TLS and htpasswd settings of a [`Upstream`]: the CA that signed its certificate.
struct Secured {
    ca: PathBuf,
}

impl Upstream {
    fn start(secure: bool) -> (Upstream, Option<Secured>) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut extra = String::new();
        let mut secured = None;
        if secure {
            let sh = |script: &str| {
                run(Command::new("sh").arg("-ec").arg(script).current_dir(d));
            };
            sh(
                "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kiln-test-ca \
                -keyout ca.key -out ca.pem 2>/dev/null
                openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 \
                -keyout server.key -out server.csr 2>/dev/null
                printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext
                openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                -days 2 -extfile san.ext -out server.pem 2>/dev/null
                htpasswd -Bbn kiln s3cret-pass > htpasswd",
            );
            extra = format!(
                "  tls:\n    certificate: {0}/server.pem\n    key: {0}/server.key\n\
                 auth:\n  htpasswd:\n    realm: kiln-test\n    path: {0}/htpasswd\n",
                d.display()
            );
            secured = Some(Secured {
                ca: d.join("ca.pem"),
            });
        }
        let config = d.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  formatter: text\n\
                 storage:\n  filesystem:\n    rootdirectory: {}/data\n\
                 http:\n  addr: 127.0.0.1:0\n  secret: kiln-tests\n{extra}",
                d.display()
            ),
        )
        .unwrap();
        let log = d.join("registry.log");
        let out = File::create(&log).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("docker-registry (scripts/setup installs it)");
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let found = text.lines().find_map(|l| {
                let rest = &l[l.find("listening on ")? + 13..];
                let a: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                a.parse::<std::net::SocketAddr>()
                    .ok()
                    .filter(|s| s.port() != 0)
                    .map(|_| a)
            });
            if let Some(a) = found {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start:\n{text}"
            );
            std::thread::yield_now();
        };
        (Upstream { child, addr, dir }, secured)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The URIs of the requests the registry has answered so far, in order.
    fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("response completed"))
            .filter_map(|l| {
                let v = &l[l.find("http.request.uri=")? + 17..];
                let v = v.trim_start_matches('"');
                Some(v[..v.find(['"', ' ']).unwrap_or(v.len())].to_owned())
            })
            .collect()
    }

    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- upstream log ---\n{}", self.log());
        }
    }
}

/// A docker config dir whose config.json holds `user:pass` for `registry`.
fn docker_config(dir: &Path, registry: &str, user: &str, pass: &str) -> AuthFiles {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    fs::create_dir_all(dir).unwrap();
    fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    AuthFiles(vec![dir.join("config.json")])
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn two_arch(cache: &Cache, image: &str, note: &str) {
    for arch in ["amd64", "arm64"] {
        Image::new(arch, note).merge_into(cache, image);
    }
}

/// Pushes `kiln/hello:t1` from cache A, fetches it arch by arch into cache B, and checks
/// digests, references (skopeo reads them), only-missing transfers, the requests the
/// fetch made (`probes`: at most that many `GET /v2/`; each blob once) and fsck.
fn push_then_fetch(
    up: &Upstream,
    spec: UpstreamSpec,
    auth: AuthFiles,
    skopeo_args: &[String],
    probes: usize,
) {
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(Cache::open(&dir.path().join("a")).unwrap());
    let b = Arc::new(Cache::open(&dir.path().join("b")).unwrap());
    two_arch(&a, "kiln/hello:t1", "hello");
    let image: ImageRef = "kiln/hello:t1".parse().unwrap();
    let registry = spec.registry.clone();
    let upstreams = Upstreams::new(&[UpstreamSpec { push: true, ..spec }], &auth).unwrap();
    let rt = rt();

    let pushed = rt.block_on(upstreams.push_target(&a, &image, &[]));
    assert_eq!(pushed.len(), 1);
    let pushed = pushed.into_iter().next().unwrap().1.unwrap();
    assert_eq!(
        pushed.references,
        [
            format!("{registry}/kiln/hello:t1-amd64"),
            format!("{registry}/kiln/hello:t1-arm64"),
            format!("{registry}/kiln/hello:t1"),
        ]
    );
    assert!(pushed.bytes > 0);
    // Again: everything is there, nothing is sent.
    let again = rt.block_on(upstreams.push_target(&a, &image, &[]));
    assert_eq!(again.into_iter().next().unwrap().1.unwrap().bytes, 0);

    // A real client sees the index and the per-arch manifests under LinuxKit's names.
    let a_index = a
        .index()
        .unwrap()
        .get("docker.io/kiln/hello:t1")
        .unwrap()
        .clone();
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .args(skopeo_args)
        .arg(format!("docker://{registry}/kiln/hello:t1")));
    assert_eq!(crate::registry::sha(raw.as_bytes()), a_index.digest);
    let arm = run(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .args(skopeo_args)
        .arg(format!("docker://{registry}/kiln/hello:t1-arm64")));
    assert_eq!(
        crate::registry::sha(arm.as_bytes()),
        a.index()
            .unwrap()
            .get("docker.io/kiln/hello:t1-arm64")
            .unwrap()
            .digest
    );

    // Cache B fetches the tag whole, both arches in one fetch: the upstream's index
    // bit for bit, and each arch's entry verbatim.
    let both: Vec<_> = ["amd64", "arm64"]
        .into_iter()
        .map(|a| (a.to_owned(), platform_for_arch(a)))
        .collect();
    let before = up.requests().len();
    let got = rt
        .block_on(upstreams.fetch_package(&b, &image, &both))
        .unwrap()
        .expect("the upstream has it");
    assert!(got.bytes > 0);
    let made = up.requests().split_off(before);
    let probed = made.iter().filter(|u| *u == "/v2/").count();
    assert!(probed <= probes, "{probed} probes: {made:#?}");
    let mut blobs: Vec<_> = made.iter().filter(|u| u.contains("/blobs/")).collect();
    let all = blobs.len();
    assert!(
        all > 0,
        "cache B was empty, yet no blob was read: {made:#?}"
    );
    blobs.sort();
    blobs.dedup();
    assert_eq!(all, blobs.len(), "a blob was read twice: {made:#?}");
    assert_eq!(got.index.as_ref().unwrap().digest, a_index.digest);
    assert_eq!(got.archs.len(), 2);
    for (arch, desc) in got.archs {
        assert_eq!(
            Some(&desc.digest),
            a.index()
                .unwrap()
                .get(&format!("docker.io/kiln/hello:t1-{arch}"))
                .map(|d| &d.digest)
        );
    }
    b.set_ref("docker.io/kiln/hello:t1", got.index.unwrap())
        .unwrap();
    assert!(fsck(&b, false).unwrap().is_clean());
    // A second fetch copies nothing.
    let got = rt
        .block_on(upstreams.fetch_package(&b, &image, &both[..1]))
        .unwrap()
        .unwrap();
    assert_eq!(got.bytes, 0);

    // A tag the upstream does not have is no error.
    let absent: ImageRef = "kiln/hello:nope".parse().unwrap();
    assert!(
        rt.block_on(upstreams.fetch_package(&b, &absent, &both))
            .unwrap()
            .is_none()
    );

    // Any image, by its full name: the whole index lands under that name.
    let c = Arc::new(Cache::open(&dir.path().join("c")).unwrap());
    let name = format!("{registry}/kiln/hello:t1");
    let got = rt.block_on(upstreams.fetch_image(&c, &name)).unwrap();
    assert_eq!(got.desc.digest, a_index.digest);
    assert_eq!(
        c.index().unwrap().get(&name).unwrap().digest,
        a_index.digest
    );
    assert!(fsck(&c, false).unwrap().is_clean());
    let info = upstreams.info();
    assert_eq!(
        info.iter().find(|s| s.name == registry).unwrap().state,
        "up"
    );
}

#[test]
fn plain_http_upstream_push_and_fetch() {
    let (up, _) = Upstream::start(false);
    let spec: UpstreamSpec = up.addr.parse().unwrap();
    assert!(spec.insecure, "loopback is plain HTTP by default");
    // Nothing asks for credentials: no request is preceded by a `GET /v2/` probe.
    push_then_fetch(
        &up,
        spec,
        AuthFiles::default(),
        &["--tls-verify=false".into()],
        0,
    );
}

#[test]
fn tls_upstream_with_htpasswd_and_a_docker_config() {
    let (up, secured) = Upstream::start(true);
    let ca = secured.unwrap().ca;
    let dir = tempfile::tempdir().unwrap();
    let auth = docker_config(&dir.path().join("docker"), &up.addr, "kiln", "s3cret-pass");
    let spec = UpstreamSpec {
        insecure: false,
        ca_file: Some(ca.clone()),
        ..up.addr.parse().unwrap()
    };
    // skopeo reads the CA from a directory and the credentials from the same file.
    let certs = dir.path().join("certs");
    fs::create_dir_all(&certs).unwrap();
    fs::copy(&ca, certs.join("ca.crt")).unwrap();
    // Basic auth: one probe for the repository, then the credentials are sent at once.
    push_then_fetch(
        &up,
        spec.clone(),
        auth,
        &[
            format!("--cert-dir={}", certs.display()),
            format!(
                "--authfile={}",
                dir.path().join("docker/config.json").display()
            ),
        ],
        1,
    );

    // Wrong credentials: a clear error naming the upstream, never the password.
    let wrong = docker_config(&dir.path().join("wrong"), &up.addr, "kiln", "not-it");
    let upstreams = Upstreams::new(std::slice::from_ref(&spec), &wrong).unwrap();
    let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());
    let image: ImageRef = "kiln/hello:t1".parse().unwrap();
    let err = rt()
        .block_on(upstreams.fetch_package(
            &cache,
            &image,
            &[("amd64".into(), platform_for_arch("amd64"))],
        ))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, UpstreamError::Unauthorized { .. }), "{msg}");
    assert!(msg.contains(&up.addr) && !msg.contains("not-it"), "{msg}");
    // No credentials at all: said so.
    let upstreams = Upstreams::new(std::slice::from_ref(&spec), &AuthFiles::default()).unwrap();
    let err = rt()
        .block_on(upstreams.fetch_package(
            &cache,
            &image,
            &[("amd64".into(), platform_for_arch("amd64"))],
        ))
        .unwrap_err();
    assert!(err.to_string().contains("no credentials"), "{err}");
    // Without the CA the certificate is refused.
    let upstreams = Upstreams::new(
        &[UpstreamSpec {
            ca_file: None,
            ..spec
        }],
        &AuthFiles::default(),
    )
    .unwrap();
    let err = rt()
        .block_on(upstreams.fetch_package(
            &cache,
            &image,
            &[("amd64".into(), platform_for_arch("amd64"))],
        ))
        .unwrap_err();
    assert!(err.to_string().contains(&up.addr), "{err}");
}

#[test]
fn an_unreachable_upstream_costs_one_try_then_is_down() {
    // A port nothing listens on: refused at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let upstreams = Upstreams::new(&[addr.parse().unwrap()], &AuthFiles::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let image: ImageRef = "kiln/hello:t1".parse().unwrap();
    let amd64 = [("amd64".to_owned(), platform_for_arch("amd64"))];
    let rt = rt();
    let err = rt
        .block_on(upstreams.fetch_package(&cache, &image, &amd64))
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
    // Marked down: the next target does not try again, and is simply not found.
    assert!(
        rt.block_on(upstreams.fetch_package(&cache, &image, &amd64))
            .unwrap()
            .is_none()
    );
    let info = upstreams.info();
    assert_eq!(info[0].state, "down", "{info:?}");
    assert!(
        info[0].error.as_ref().unwrap().contains("refused"),
        "{info:?}"
    );
}

#[test]
fn a_corrupt_upstream_blob_is_refused_and_nothing_lands() {
    let (up, _) = Upstream::start(false);
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(Cache::open(&dir.path().join("a")).unwrap());
    two_arch(&a, "kiln/bad:t1", "bad");
    let image: ImageRef = "kiln/bad:t1".parse().unwrap();
    let upstreams = Upstreams::new(
        &[UpstreamSpec {
            push: true,
            ..up.addr.parse().unwrap()
        }],
        &AuthFiles::default(),
    )
    .unwrap();
    let rt = rt();
    rt.block_on(upstreams.push_target(&a, &image, &[]))
        .into_iter()
        .next()
        .unwrap()
        .1
        .unwrap();
    let layer = crate::registry::sha(&Image::new("amd64", "bad").layer).to_string();
    let file = up.blob_file(&layer);
    let mut bytes = fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&file, bytes).unwrap();
    let b = Arc::new(Cache::open(&dir.path().join("b")).unwrap());
    let err = rt
        .block_on(upstreams.fetch_package(
            &b,
            &image,
            &[("amd64".into(), platform_for_arch("amd64"))],
        ))
        .unwrap_err();
    assert!(err.to_string().contains(&layer), "{err}");
    assert!(b.blob_size(&layer.parse().unwrap()).unwrap().is_none());
    assert!(fsck(&b, false).unwrap().is_clean());
}
