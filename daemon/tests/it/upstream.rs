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

/// How an [`Upstream`] is set up.
enum Mode<'a> {
    /// Plain HTTP, no auth.
    Plain,
    /// TLS with a CA made here, htpasswd Basic auth.
    Secure,
    /// Plain HTTP, token auth as Docker Hub does it: every request without a token is
    /// answered 401 `Bearer realm=...`, tokens come from this server.
    Token(&'a TokenServer),
}

impl Upstream {
    fn start(mode: Mode) -> (Upstream, Option<Secured>) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut extra = String::new();
        let mut secured = None;
        if let Mode::Token(server) = &mode {
            fs::copy(&server.cert, d.join("token-root.pem")).unwrap();
            extra = format!(
                "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n\
                 \x20   issuer: {ISSUER}\n    rootcertbundle: {}/token-root.pem\n",
                server.addr,
                d.display()
            );
        }
        if let Mode::Secure = mode {
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

const SERVICE: &str = "kiln-test";
const ISSUER: &str = "kiln-test-issuer";

/// A token server for [`Mode::Token`]: one JWT (RS256, its certificate in `x5c`, the
/// registry trusting that certificate) granting pull and push on `kiln/hello`, handed to
/// anyone who asks, as Docker Hub hands anonymous pull tokens. Counts the requests.
struct TokenServer {
    addr: String,
    cert: PathBuf,
    asked: Arc<std::sync::atomic::AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    fn start() -> TokenServer {
        use base64::Engine;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        use std::io::{BufRead, BufReader, Write};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        run(Command::new("sh").arg("-ec").current_dir(d).arg(
            "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kiln-token \
             -keyout token.key -out token.pem 2>/dev/null
             openssl x509 -in token.pem -outform DER -out token.der",
        ));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [STANDARD.encode(fs::read(d.join("token.der")).unwrap())],
        });
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": "",
            "aud": SERVICE,
            "exp": now + 3600,
            "nbf": now - 60,
            "iat": now - 60,
            "jti": "kiln-test-token",
            "access": [{"type": "repository", "name": "kiln/hello", "actions": ["pull", "push"]}],
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        fs::write(d.join("signed"), &signed).unwrap();
        run(Command::new("openssl")
            .args([
                "dgst",
                "-sha256",
                "-sign",
                "token.key",
                "-out",
                "sig",
                "signed",
            ])
            .current_dir(d));
        let token = format!(
            "{signed}.{}",
            URL_SAFE_NO_PAD.encode(fs::read(d.join("sig")).unwrap())
        );
        let body = serde_json::json!({ "token": token, "expires_in": 3600 }).to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&asked);
        // Serves until the test process ends (the listener dies with it).
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut head = String::new();
                let mut reader = BufReader::new(&conn);
                while reader.read_line(&mut head).is_ok_and(|n| n > 2) {}
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TokenServer {
            addr,
            cert: d.join("token.pem"),
            asked,
            _dir: dir,
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
        .block_on(upstreams.fetch_package(&b, &image, &both, false))
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
        .block_on(upstreams.fetch_package(&b, &image, &both[..1], false))
        .unwrap()
        .unwrap();
    assert_eq!(got.bytes, 0);

    // Lazily, into cache D: the index only, one request; its per-arch manifests are
    // recorded on demand (as documents), then named; fsck says where they are.
    let d = Arc::new(Cache::open(&dir.path().join("d")).unwrap());
    let upstreams = Arc::new(upstreams);
    d.set_blob_source(Arc::clone(&upstreams) as Arc<dyn kiln_daemon::cache::BlobSource>);
    let before = up.requests().len();
    let lazy = rt
        .block_on(upstreams.fetch_package(&d, &image, &both, true))
        .unwrap()
        .expect("the upstream has it");
    let made = up.requests().split_off(before);
    assert_eq!(
        made.len(),
        1,
        "a lazy fetch asks for the index only: {made:#?}"
    );
    assert_eq!(lazy.on_demand.len(), 2, "{:?}", lazy.on_demand);
    assert!(lazy.on_demand.iter().all(|(_, f)| f.is_document()));
    d.record_on_demand(&lazy.on_demand).unwrap();
    d.set_ref("docker.io/kiln/hello:t1", lazy.index.clone().unwrap())
        .unwrap();
    for (arch, entry) in &lazy.archs {
        d.set_ref(&format!("docker.io/kiln/hello:t1-{arch}"), entry.clone())
            .unwrap();
    }
    let report = fsck(&d, false).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.on_demand.values().map(|v| v.0).sum::<u64>(), 2);
    assert!(report.to_string().contains("on demand from"), "{report}");
    // Reading them fetches each once, verified: a manifest from the manifest endpoint,
    // which records its config and layer, then those; then the cache holds everything.
    let before = up.requests().len();
    let desc = lazy.index.unwrap();
    let fetched = rt.block_on(d.ensure_graph(&desc)).unwrap();
    let made = up.requests().split_off(before);
    let blob_reads = made.iter().filter(|u| u.contains("/blobs/")).count();
    let manifest_reads = made
        .iter()
        .filter(|u| u.contains("/manifests/sha256:"))
        .count();
    // Two manifests, two configs and two layers (one each per arch).
    assert_eq!((manifest_reads, blob_reads), (2, 4), "{made:#?}");
    assert_eq!(made.len(), 6, "{made:#?}");
    let mut want = 0;
    for (_, entry) in &lazy.archs {
        let m = d.read_manifest(&entry.digest).unwrap();
        want += entry.size + m.children().map(|c| c.size).sum::<u64>();
    }
    assert_eq!(fetched, want);
    assert_eq!(rt.block_on(d.ensure_graph(&desc)).unwrap(), 0);
    assert!(d.missing_on_demand().unwrap().is_empty());
    let report = fsck(&d, false).unwrap();
    assert!(report.is_clean() && report.on_demand.is_empty(), "{report}");

    // A tag the upstream does not have is no error.
    let absent: ImageRef = "kiln/hello:nope".parse().unwrap();
    assert!(
        rt.block_on(upstreams.fetch_package(&b, &absent, &both, false))
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
    let (up, _) = Upstream::start(Mode::Plain);
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
    let (up, secured) = Upstream::start(Mode::Secure);
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
            false,
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
            false,
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
            false,
        ))
        .unwrap_err();
    assert!(err.to_string().contains(&up.addr), "{err}");
}

#[test]
fn token_auth_upstream_without_credentials_as_docker_hub_does() {
    let tokens = TokenServer::start();
    let (up, _) = Upstream::start(Mode::Token(&tokens));
    let spec: UpstreamSpec = up.addr.parse().unwrap();
    // The first request of each operation goes without a token and is refused; then
    // oci-client's token flow takes over: one probe and one token per repository and
    // operation (push, then pull), kept for what follows.
    push_then_fetch(
        &up,
        spec,
        AuthFiles::default(),
        &["--tls-verify=false".into()],
        1,
    );
    // Tokens and probes are per repository and operation, not per request: kiln's
    // push (its pull and push scopes), its fetches, skopeo's two inspects.
    let asked = tokens.asked.load(std::sync::atomic::Ordering::SeqCst);
    let made = up.requests();
    let probes = made.iter().filter(|u| *u == "/v2/").count();
    assert!(made.len() > 30, "{made:#?}");
    assert!((1..=6).contains(&asked), "{asked} token requests");
    assert!(probes <= 6, "{probes} probes: {made:#?}");
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
        .block_on(upstreams.fetch_package(&cache, &image, &amd64, false))
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
    // Marked down: the next target does not try again, and is simply not found.
    assert!(
        rt.block_on(upstreams.fetch_package(&cache, &image, &amd64, false))
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
    let (up, _) = Upstream::start(Mode::Plain);
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
            false,
        ))
        .unwrap_err();
    assert!(err.to_string().contains(&layer), "{err}");
    assert!(b.blob_size(&layer.parse().unwrap()).unwrap().is_none());
    assert!(fsck(&b, false).unwrap().is_clean());
}
