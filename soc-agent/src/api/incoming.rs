//! The control API's accept loop, with its TLS handshakes, outside tonic: so that a stop is two steps. First no
//! new connection is accepted (the socket stays with the next process: one taking over, or a restarted one on
//! systemd's stored socket); then the connections already accepted finish their handshakes and are handed to the
//! server, and only then does the stream end, which starts the server's graceful drain. Had tonic run the
//! handshakes, a stop would drop the ones in progress and those clients would see "tls handshake eof".

use std::io;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsConfig;

/// A client that takes longer than this over its handshake is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted (and handshaken) but not yet taken by the server.
const BACKLOG: usize = 64;
/// At a stop, the time a connection handed to the server last gets to send its first request before the stream
/// ends and the server tells every connection to go away (a client whose request is not sent by then sees the
/// connection close and, if it does not retry by itself, fails).
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(250);

/// The rustls configuration of the API's mTLS: the server's certificate and key, clients verified against
/// `client_ca`, HTTP/2 only.
pub fn server_config(tls: &TlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let read = |path: &std::path::Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let pem_certs = |path: &std::path::Path| -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
        let pem = read(path)?;
        let certs = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not PEM certificates", path.display()))?;
        anyhow::ensure!(!certs.is_empty(), "{}: no certificate", path.display());
        Ok(certs)
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(&tls.client_ca)? {
        roots.add(cert).with_context(|| format!("{}: not a usable CA certificate", tls.client_ca.display()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("the client CA")?;
    let key = rustls_pemfile::private_key(&mut read(&tls.key)?.as_slice())
        .with_context(|| format!("{}: not a PEM private key", tls.key.display()))?
        .with_context(|| format!("{}: no private key", tls.key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(&tls.cert)?, key)
        .with_context(|| format!("{} and {}", tls.cert.display(), tls.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Plaintext connections from `listener` until `stop` turns true.
pub fn plain(listener: TcpListener, stop: watch::Receiver<bool>) -> ReceiverStream<io::Result<TcpStream>> {
    run(listener, stop, |stream| async move { Ok(stream) })
}

/// TLS connections from `listener`, handshaken, until `stop` turns true and the handshakes under way finished.
pub fn tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    stop: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let acceptor = TlsAcceptor::from(config);
    run(listener, stop, move |stream| {
        let acceptor = acceptor.clone();
        async move {
            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")))
        }
    })
}

fn run<T, F, Fut>(listener: TcpListener, mut stop: watch::Receiver<bool>, open: F) -> ReceiverStream<io::Result<T>>
where
    T: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<T>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(BACKLOG);
    tokio::spawn(async move {
        let mut opening: JoinSet<(std::net::SocketAddr, io::Result<T>)> = JoinSet::new();
        let mut accepting = true;
        let mut last_handed = tokio::time::Instant::now() - FIRST_REQUEST_GRACE;
        while accepting || !opening.is_empty() {
            tokio::select! {
                () = async { let _ = stop.wait_for(|s| *s).await; }, if accepting => accepting = false,
                accepted = listener.accept(), if accepting => match accepted {
                    Ok((stream, peer)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!(%peer, error = %e, "TCP_NODELAY");
                        }
                        let open = open(stream);
                        opening.spawn(async move { (peer, open.await) });
                    }
                    Err(e) => {
                        // Out of descriptors or memory: wait rather than spin; connections wait in the queue.
                        tracing::warn!(error = %e, "accepting an API connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = opening.join_next() => match done {
                    Ok((_, Ok(conn))) => {
                        if tx.send(Ok(conn)).await.is_err() {
                            return;
                        }
                        last_handed = tokio::time::Instant::now();
                    }
                    Ok((peer, Err(e))) => tracing::info!(%peer, error = %e, "API connection refused in its handshake"),
                    Err(e) => tracing::warn!(error = %e, "API handshake task failed"),
                },
            }
        }
        // The socket stays open in the process serving next; this one's copy closes here.
        drop(listener);
        tokio::time::sleep_until(last_handed + FIRST_REQUEST_GRACE).await;
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_stream::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn a_stop_lets_accepted_connections_through_then_ends() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop) = watch::channel(false);
        // A handshake that takes a while: the connection must still come out after the stop.
        let (release_tx, release) = watch::channel(false);
        let mut incoming = run(listener, stop, move |mut stream: TcpStream| {
            let mut release = release.clone();
            async move {
                let _ = release.wait_for(|r| *r).await;
                stream.write_all(b"hi").await?;
                Ok(stream)
            }
        });
        let mut client = TcpStream::connect(addr).await.expect("connect");
        // Let the loop accept it before stopping.
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop_tx.send(true).expect("stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
        release_tx.send(true).expect("release");
        let conn = incoming.next().await.expect("the accepted connection").expect("opened");
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hi");
        assert!(incoming.next().await.is_none(), "the stream ends after the stop");
        drop(conn);
        // Nothing listens in this process any more.
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
