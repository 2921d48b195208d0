//! A TCP proxy that slows the server's answers down: each read of up to 64 KiB from the server
//! is passed on after a pause (a slow registry in front of a real one).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Listens on loopback and forwards every connection to `to`, pausing `pause` before passing
/// on each piece the server sends. Returns the proxy's `host:port`. Call it inside a Tokio
/// runtime (it spawns there).
pub fn start(to: &str, pause: Duration) -> String {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr: SocketAddr = std_listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    let to = to.to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&to).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                });
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            tokio::time::sleep(pause).await;
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = cw.shutdown().await;
                up.abort();
            });
        }
    });
    addr.to_string()
}
