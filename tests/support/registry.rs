//! Real OCI registries (Debian's `docker-registry`) on 127.0.0.1: plain HTTP, or TLS (CA + leaf
//! cert) with htpasswd (bcrypt) auth. Images are pushed over the registry v2 API, and blob
//! downloads are counted from the registry's own access log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::agent::free_port;

pub const USER: &str = "testuser";
pub const PASS: &str = "testpass";

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Test PKI (CA + 127.0.0.1 leaf) and htpasswd, made once per test process.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub htpasswd: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (run `make test-deps`)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ecds-agent-test-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = |n: &str| dir.join(n);
        run(Command::new("openssl").args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
            "-subj", "/CN=ecds-agent-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign"]).arg("-keyout").arg(p("ca.key")).arg("-out").arg(p("ca.crt")));
        // Leaf certificates signed by the CA: the server one (registries, TLS control plane)
        // and a client one (mTLS to the control plane).
        let leaf = |name: &str, cn: &str, eku: &str| {
            run(Command::new("openssl").args(["req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", &format!("/CN={cn}")])
                .arg("-keyout").arg(p(&format!("{name}.key"))).arg("-out").arg(p(&format!("{name}.csr"))));
            std::fs::write(p(&format!("{name}.ext")), format!("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={eku}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")).unwrap();
            run(Command::new("openssl").args(["x509", "-req", "-days", "3650", "-sha256", "-CAcreateserial"])
                .arg("-in").arg(p(&format!("{name}.csr"))).arg("-CA").arg(p("ca.crt")).arg("-CAkey").arg(p("ca.key"))
                .arg("-extfile").arg(p(&format!("{name}.ext"))).arg("-out").arg(p(&format!("{name}.crt"))));
        };
        leaf("leaf", "localhost", "serverAuth");
        leaf("client", "ecds-agent", "clientAuth");
        let out = Command::new("htpasswd").args(["-Bbn", USER, PASS]).output().expect("htpasswd (apache2-utils)");
        std::fs::write(p("htpasswd"), out.stdout).unwrap();
        Pki {
            ca: p("ca.crt"),
            cert: p("leaf.crt"),
            key: p("leaf.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
            htpasswd: p("htpasswd"),
            dir,
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Solo/Istio Wasm artifact: `application/vnd.module.wasm.content.layer.v1+wasm` (+ config).
    Artifact,
    /// CNCF Wasm artifact: `application/vnd.wasm.content.layer.v1+wasm`.
    CncfArtifact,
    /// Docker schema 2 image, last layer a tar.gz holding plugin.wasm.
    Docker,
    /// OCI image, last layer `application/vnd.oci.image.layer.v1.tar+gzip` holding plugin.wasm.
    OciImage,
}

pub struct Registry {
    child: Option<Child>,
    pub addr: String,
    pub secure: bool,
    config: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn tar_gz(name: &str, data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
    let tar = b.into_inner().unwrap();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&tar).unwrap();
    (tar.clone(), e.finish().unwrap())
}

impl Registry {
    pub async fn plain() -> Self {
        Self::start(false).await
    }

    pub async fn secure() -> Self {
        Self::start(true).await
    }

    /// A plain registry in pull-through cache mode in front of `upstream` (`http://host:port`;
    /// start the upstream first: distribution 2.8 panics otherwise).
    pub async fn pull_through(upstream: &str) -> Self {
        Self::start_with(false, Some(upstream)).await
    }

    async fn start(secure: bool) -> Self {
        Self::start_with(secure, None).await
    }

    async fn start_with(secure: bool, proxy: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut yml = format!(
            "version: 0.1\nlog: {{level: info}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp:\n  addr: \"{addr}\"\n",
            dir.path().join("data").display()
        );
        if secure {
            let p = pki();
            yml.push_str(&format!(
                "  tls: {{certificate: {}, key: {}}}\nauth:\n  htpasswd: {{realm: test-registry, path: {}}}\n",
                p.cert.display(),
                p.key.display(),
                p.htpasswd.display()
            ));
        }
        if let Some(remote) = proxy {
            yml.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        let config = dir.path().join("config.yml");
        std::fs::write(&config, yml).unwrap();
        let log = dir.path().join("registry.log");
        let mut r = Registry {
            child: None,
            addr,
            secure,
            config,
            log,
            _dir: dir,
        };
        r.spawn().await;
        r
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            // The access log goes to stdout, everything else to stderr: keep both.
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry not installed (run `make test-deps`)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        let client = self.client();
        loop {
            if let Ok(r) = client.get(format!("{}/v2/", self.base())).send().await {
                if r.status() == 200 || r.status() == 401 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "registry did not start: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the registry process (its data stays for `restart`).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub fn base(&self) -> String {
        format!(
            "{}://{}",
            if self.secure { "https" } else { "http" },
            self.addr
        )
    }

    pub fn url(&self, repo_ref: &str) -> String {
        format!("oci://{}/{}", self.addr, repo_ref)
    }

    fn client(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder();
        if self.secure {
            let ca = std::fs::read(&pki().ca).unwrap();
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
        }
        b.build().unwrap()
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if self.secure {
            rb.basic_auth(USER, Some(PASS))
        } else {
            rb
        }
    }

    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let c = self.client();
        let digest = format!("sha256:{}", sha256_hex(data));
        let r = self
            .auth(c.post(format!("{}/v2/{repo}/blobs/uploads/", self.base())))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "start upload");
        let loc = r.headers()["location"].to_str().unwrap().to_owned();
        let loc = if loc.starts_with('/') {
            format!("{}{loc}", self.base())
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .auth(c.put(format!("{loc}{sep}digest={digest}")))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "finish upload: {}",
            r.text().await.unwrap_or_default()
        );
        digest
    }

    /// Puts a manifest; returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &serde_json::Value,
    ) -> String {
        self.push_manifest_bytes(
            repo,
            reference,
            media_type,
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }

    /// Puts a manifest exactly as `bytes` (its digest is theirs); returns the digest.
    pub async fn push_manifest_bytes(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> String {
        let r = self
            .auth(
                self.client()
                    .put(format!("{}/v2/{repo}/manifests/{reference}", self.base())),
            )
            .header("content-type", media_type)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "push manifest: {}",
            r.text().await.unwrap_or_default()
        );
        format!("sha256:{}", sha256_hex(&bytes))
    }

    /// Pushes `wasm` as `repo:tag` in `layout`; returns the manifest digest.
    pub async fn push(&self, repo: &str, tag: &str, wasm: &[u8], layout: Layout) -> String {
        let (manifest_type, config_type, layer_type, config, layer) = match layout {
            Layout::Artifact | Layout::CncfArtifact => (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.module.wasm.config.v1+json",
                if layout == Layout::Artifact {
                    "application/vnd.module.wasm.content.layer.v1+wasm"
                } else {
                    "application/vnd.wasm.content.layer.v1+wasm"
                },
                b"{}".to_vec(),
                wasm.to_vec(),
            ),
            Layout::Docker | Layout::OciImage => {
                let (tar, gz) = tar_gz("plugin.wasm", wasm);
                let config = serde_json::to_vec(&serde_json::json!({
                    "architecture": "amd64", "os": "linux", "config": {},
                    "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))]}
                }))
                .unwrap();
                if layout == Layout::Docker {
                    (
                        "application/vnd.docker.distribution.manifest.v2+json",
                        "application/vnd.docker.container.image.v1+json",
                        "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        config,
                        gz,
                    )
                } else {
                    (
                        "application/vnd.oci.image.manifest.v1+json",
                        "application/vnd.oci.image.config.v1+json",
                        "application/vnd.oci.image.layer.v1.tar+gzip",
                        config,
                        gz,
                    )
                }
            }
        };
        let cd = self.push_blob(repo, &config).await;
        let ld = self.push_blob(repo, &layer).await;
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": cd, "size": config.len()},
            "layers": [{"mediaType": layer_type, "digest": ld, "size": layer.len()}],
        });
        self.push_manifest(repo, tag, manifest_type, &m).await
    }

    /// Pushes `bundle` (a sigstore bundle) as an OCI 1.1 referrer of `subject` in `repo`, the
    /// way cosign v3 does on a registry without the referrers API (the referrers tag schema).
    pub async fn push_bundle_referrer(&self, repo: &str, subject: &str, bundle: &[u8]) {
        const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
        let empty = b"{}".to_vec();
        let cd = self.push_blob(repo, &empty).await;
        let ld = self.push_blob(repo, bundle).await;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": BUNDLE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cd, "size": 2},
            "layers": [{"mediaType": BUNDLE, "digest": ld, "size": bundle.len()}],
            "subject": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": subject, "size": 0},
        }))
        .unwrap();
        let md = format!("sha256:{}", sha256_hex(&manifest));
        let size = manifest.len();
        self.push_manifest_bytes(
            repo,
            &md,
            "application/vnd.oci.image.manifest.v1+json",
            manifest,
        )
        .await;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": size, "artifactType": BUNDLE}],
        });
        self.push_manifest(
            repo,
            &subject.replace(':', "-"),
            "application/vnd.oci.image.index.v1+json",
            &index,
        )
        .await;
    }

    /// How many blob GETs the registry served for `repo` (from its access log).
    pub fn blob_gets(&self, repo: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/sha256:");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle) && (l.contains("\" 200 ") || l.contains("\" 307 ")))
            .count()
    }

    /// The registry's access and error log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many manifest GETs the registry served for `repo`.
    pub fn manifest_gets(&self, repo: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/manifests/");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle) && l.contains("\" 200 "))
            .count()
    }

    pub fn ca_path(&self) -> &Path {
        &pki().ca
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Docker config JSON for the secure registry.
pub fn pull_secret(addr: &str, user: &str, pass: &str) -> Vec<u8> {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    serde_json::to_vec(&serde_json::json!({"auths": {addr: {"auth": auth}}})).unwrap()
}
