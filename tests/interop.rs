//! A non-Rust gRPC client on the agent's Unix socket: Python grpcio (grpc C-core) runs
//! `tests/interop/ads_client.py`, once with grpcio's own `:authority` (the socket path,
//! percent-encoded) and once with the raw socket path as grpc-java sends it. Both are invalid
//! URI authorities that stock h2 refuses (see vendor/README.md); here a request must reach the
//! control plane and a response must come back, unchanged, for SotW and for Delta.
//!
//! Python comes from `PYTHON_BIN` or `.venv/bin/python3` and must have grpcio (installed by
//! `make test-deps`, which `make test` runs). Without it the tests fail, naming that target.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use prost::Message;
use support::res::{cluster, CDS};
use support::xds::WAIT;
use support::{Agent, ControlPlane, CpStream};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const NODE: &str = "grpcio-client";

/// The `:authority` the Python client sends.
#[derive(Clone, Copy, Debug)]
enum Authority {
    /// grpcio's default for a `unix:` target: the socket path percent-encoded, without its
    /// leading `/` (`tmp%2F.tmpXXXX%2FXDS`).
    Grpcio,
    /// The raw socket path (`--authority`), as grpc-java sends it.
    RawPath,
}

/// The Python interpreter with grpcio; fails the test when there is none.
fn python() -> PathBuf {
    let py = std::env::var_os("PYTHON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3"));
    match std::process::Command::new(&py)
        .args(["-c", "import grpc"])
        .output()
    {
        Ok(out) if out.status.success() => py,
        Ok(out) => panic!(
            "grpcio is not importable by {}: {} (run `make test-deps`)",
            py.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!(
            "cannot run Python at {}: {e} (run `make test-deps`, or set PYTHON_BIN)",
            py.display()
        ),
    }
}

/// `tests/interop/ads_client.py` as a child process (killed on drop).
struct PyClient {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: PathBuf,
}

impl PyClient {
    /// Starts the client on `sock`, writes `requests` (hex lines) and closes its stdin; it
    /// sends them all and keeps the stream open until it has printed `count` responses.
    async fn spawn(
        python: &Path,
        sock: &Path,
        authority: Authority,
        method: &str,
        requests: &[Vec<u8>],
        count: usize,
    ) -> PyClient {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/ads_client.py");
        let stderr = sock.with_file_name("ads_client.stderr");
        let mut cmd = Command::new(python);
        cmd.arg(&script)
            .arg("--target")
            .arg(format!("unix:{}", sock.display()))
            .args(["--method", method, "--count", &count.to_string()]);
        if let Authority::RawPath = authority {
            cmd.arg("--authority").arg(sock);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn the Python ADS client");
        let mut stdin = child.stdin.take().unwrap();
        let input: String = requests
            .iter()
            .map(|r| format!("{}\n", hex::encode(r)))
            .collect();
        stdin.write_all(input.as_bytes()).await.unwrap();
        drop(stdin);
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        PyClient {
            child,
            stdout,
            stderr,
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next response the client printed (panics after 15 s or if it exits first).
    async fn recv(&mut self) -> Vec<u8> {
        match tokio::time::timeout(WAIT, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => hex::decode(line.trim())
                .unwrap_or_else(|e| panic!("grpcio client printed {line:?}, not hex: {e}")),
            Ok(Ok(None)) => panic!(
                "grpcio client exited before printing a response; stderr:\n{}",
                self.stderr_text()
            ),
            Ok(Err(e)) => panic!("reading the grpcio client's stdout: {e}"),
            Err(_) => panic!(
                "grpcio client printed no response within {WAIT:?}; stderr:\n{}",
                self.stderr_text()
            ),
        }
    }

    /// Waits for the client to exit and checks it succeeded.
    async fn finish(mut self) {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("grpcio client did not exit after its responses")
            .unwrap();
        assert!(
            status.success(),
            "grpcio client: {status}; stderr:\n{}",
            self.stderr_text()
        );
    }
}

/// The control plane, the agent on a Unix socket and the grpcio client that sent `request`,
/// once that client's stream has reached the control plane.
struct Rig {
    py: PyClient,
    upstream: CpStream,
    _agent: Agent,
    _cp: ControlPlane,
    _dir: tempfile::TempDir,
}

async fn start(method: &str, authority: Authority, request: Vec<u8>) -> Rig {
    let python = python(); // first: a missing grpcio is the failure to report
    let mut cp = ControlPlane::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("XDS");
    let agent = Agent::builder(&cp.url())
        .listen(&format!("unix:{}", sock.display()))
        .start()
        .await;
    let mut py = PyClient::spawn(&python, &sock, authority, method, &[request], 1).await;
    let upstream = tokio::select! {
        s = cp.next_stream() => s,
        st = py.child.wait() => panic!(
            "grpcio client ({authority:?} authority) exited ({st:?}) before its stream reached \
             the control plane; stderr:\n{}",
            py.stderr_text()
        ),
    };
    Rig {
        py,
        upstream,
        _agent: agent,
        _cp: cp,
        _dir: dir,
    }
}

async fn sotw_round_trip(authority: Authority) {
    let req = DiscoveryRequest {
        node: Some(Node {
            id: NODE.into(),
            ..Default::default()
        }),
        resource_names: vec!["c1".into()],
        type_url: CDS.into(),
        ..Default::default()
    };
    let mut rig = start("sotw", authority, req.encode_to_vec()).await;
    let CpStream::Sotw(up) = &mut rig.upstream else {
        panic!("expected a SotW stream, got Delta");
    };
    let got = up.recv().await;
    assert_eq!(got.type_url, CDS);
    assert_eq!(got.node.as_ref().map(|n| n.id.as_str()), Some(NODE));
    assert_eq!(got, req, "request unchanged");

    let resp = DiscoveryResponse {
        version_info: "v1".into(),
        resources: vec![cluster("c1")],
        type_url: CDS.into(),
        nonce: "n1".into(),
        ..Default::default()
    };
    up.send(resp.clone());
    let bytes = rig.py.recv().await;
    assert_eq!(bytes, resp.encode_to_vec(), "response byte-for-byte");
    assert_eq!(DiscoveryResponse::decode(bytes.as_slice()).unwrap(), resp);
    rig.py.finish().await;
}

async fn delta_round_trip(authority: Authority) {
    let req = DeltaDiscoveryRequest {
        node: Some(Node {
            id: NODE.into(),
            ..Default::default()
        }),
        type_url: CDS.into(),
        resource_names_subscribe: vec!["c1".into()],
        ..Default::default()
    };
    let mut rig = start("delta", authority, req.encode_to_vec()).await;
    let CpStream::Delta(up) = &mut rig.upstream else {
        panic!("expected a Delta stream, got SotW");
    };
    let got = up.recv().await;
    assert_eq!(got.type_url, CDS);
    assert_eq!(got.node.as_ref().map(|n| n.id.as_str()), Some(NODE));
    assert_eq!(got, req, "request unchanged");

    let resp = DeltaDiscoveryResponse {
        system_version_info: "sys1".into(),
        resources: vec![Resource {
            name: "c1".into(),
            version: "1".into(),
            resource: Some(cluster("c1")),
            ..Default::default()
        }],
        type_url: CDS.into(),
        nonce: "d1".into(),
        ..Default::default()
    };
    up.send(resp.clone());
    let bytes = rig.py.recv().await;
    assert_eq!(bytes, resp.encode_to_vec(), "response byte-for-byte");
    assert_eq!(
        DeltaDiscoveryResponse::decode(bytes.as_slice()).unwrap(),
        resp
    );
    rig.py.finish().await;
}

#[tokio::test]
async fn grpcio_sotw_with_percent_encoded_path_authority() {
    sotw_round_trip(Authority::Grpcio).await;
}

#[tokio::test]
async fn grpcio_sotw_with_raw_path_authority() {
    sotw_round_trip(Authority::RawPath).await;
}

#[tokio::test]
async fn grpcio_delta_with_percent_encoded_path_authority() {
    delta_round_trip(Authority::Grpcio).await;
}

#[tokio::test]
async fn grpcio_delta_with_raw_path_authority() {
    delta_round_trip(Authority::RawPath).await;
}

/// Appends field `number` as a length-delimited field.
fn put_len(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// A large response as another encoder may write it: `type_url` before the resources, and
/// fields this agent does not know (at the top level and inside resources), which a decode and
/// re-encode would drop.
fn foreign_response(delta: bool, resources: usize) -> Vec<u8> {
    let mut out = Vec::new();
    put_len(&mut out, 1, b"v-foreign");
    if resources.is_multiple_of(2) {
        put_len(&mut out, 4, CDS.as_bytes());
    }
    for i in 0..resources {
        let mut any = Vec::new();
        put_len(&mut any, 1, CDS.as_bytes());
        put_len(&mut any, 2, &support::res::cluster(&format!("c{i}")).value);
        put_len(&mut any, 77, b"unknown-in-any");
        if delta {
            let mut env = Vec::new();
            put_len(&mut env, 1, b"1");
            put_len(&mut env, 2, &any);
            put_len(&mut env, 3, format!("c{i}").as_bytes());
            put_len(&mut out, 2, &env);
        } else {
            put_len(&mut out, 2, &any);
        }
    }
    if !resources.is_multiple_of(2) {
        put_len(&mut out, 4, CDS.as_bytes());
    }
    put_len(&mut out, 5, b"nonce-foreign");
    put_len(&mut out, 99, &[0xab; 4096]);
    out
}

/// Python grpcio on both sides of the agent: a control plane sends large responses (relayed
/// cut-through, see src/xds/relay.rs) and a small one, with unknown fields and unusual field
/// orders, and the grpcio client on the agent's socket must receive exactly those bytes (a
/// decode and re-encode would drop the unknown fields) — for SotW and Delta.
#[tokio::test]
async fn grpcio_control_plane_large_responses_arrive_byte_for_byte() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    for (method, delta) in [("sotw", false), ("delta", true)] {
        let small = foreign_response(delta, 3);
        let large = [
            foreign_response(delta, 20_000),
            foreign_response(delta, 5_001),
        ];
        assert!(large[0].len() > 1 << 20 && small.len() < 16 << 10);
        let file = dir.path().join(format!("{method}.hex"));
        let lines: String = [&small, &large[0], &large[1]]
            .iter()
            .map(|m| format!("{}\n", hex::encode(m)))
            .collect();
        std::fs::write(&file, lines).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/ads_server.py");
        let mut server = Command::new(&python)
            .arg(&script)
            .arg("--responses")
            .arg(&file)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the Python control plane");
        let mut out = BufReader::new(server.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(WAIT, out.next_line())
            .await
            .expect("the Python control plane printed no port")
            .unwrap()
            .expect("the Python control plane exited");
        let sock = dir.path().join(format!("{method}.sock"));
        let agent = Agent::builder(&format!("http://127.0.0.1:{}", port.trim()))
            .listen(&format!("unix:{}", sock.display()))
            .start()
            .await;
        let req = if delta {
            DeltaDiscoveryRequest {
                type_url: CDS.into(),
                ..Default::default()
            }
            .encode_to_vec()
        } else {
            DiscoveryRequest {
                type_url: CDS.into(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let mut py = PyClient::spawn(&python, &sock, Authority::Grpcio, method, &[req], 3).await;
        // Small (read whole) or large (relayed as it arrives): not ECDS, so not decoded.
        let got = py.recv().await;
        assert!(
            got == small,
            "{method}: the small response changed on the way"
        );
        for (i, want) in large.iter().enumerate() {
            let got = py.recv().await;
            assert!(
                got == *want,
                "{method}: large response {i} changed on the way ({} bytes, want {})",
                got.len(),
                want.len()
            );
        }
        py.finish().await;
        drop(agent);
    }
}
