//! Shared by the poll-mode tests, one policy per test binary (the poll state is per process).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use dpu_proxy::poll::{Request, moved};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::{Handle, Runtime};

pub const WINDOW: Duration = Duration::from_secs(1);

/// The poll mode's awake seconds, added to a metrics counter (as the proxy does).
pub fn counting(counter: &prometheus_client::metrics::counter::Counter<f64>) -> dpu_proxy::poll::AwakeCounter {
    let counter = counter.clone();
    std::sync::Arc::new(move |seconds| {
        counter.inc_by(seconds);
    })
}

pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Times the runtime's workers parked, summed: a parked worker counts one per wake-up.
pub fn parks(handle: &Handle) -> u64 {
    let metrics = handle.metrics();
    (0..metrics.num_workers()).map(|w| metrics.worker_park_count(w)).sum()
}

/// An echo server on the runtime that reports its traffic the way the proxy's connections do. Each message is
/// four bytes: `open` starts an HTTP request on its connection (held until `shut`), anything else is echoed.
pub fn echo(runtime: &Runtime) -> SocketAddr {
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = None;
                    let mut message = [0u8; 4];
                    while socket.read_exact(&mut message).await.is_ok() {
                        moved();
                        match &message {
                            b"open" => request = Some(Request::start()),
                            b"shut" => request = None,
                            _ => {}
                        }
                        if socket.write_all(&message).await.is_err() {
                            break;
                        }
                    }
                    drop(request);
                });
            }
        });
        address
    })
}

/// A client of [`echo`], pausing 5 ms before each message like a client at a moderate rate.
pub struct Client(TcpStream);

impl Client {
    pub fn connect(address: SocketAddr) -> Client {
        Client(TcpStream::connect(address).unwrap())
    }

    pub fn send(&mut self, message: &[u8; 4]) {
        std::thread::sleep(Duration::from_millis(5));
        self.0.write_all(message).unwrap();
        let mut answer = [0u8; 4];
        self.0.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, message);
    }

    pub fn pings(&mut self, n: u32) {
        for round in 0..n {
            self.send(&round.to_be_bytes());
        }
    }
}
