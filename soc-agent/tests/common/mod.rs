//! Running the real `dpu-agent` binary from tests: start on ephemeral loopback ports, stop with SIGTERM or
//! SIGKILL, and connect to its API.
#![allow(dead_code)] // Each test file uses a different part of this harness.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use dpu_proto::v1::agent_service_client::AgentServiceClient;
use tonic::transport::{Channel, Endpoint};

pub const AGENT: &str = env!("CARGO_BIN_EXE_dpu-agent");

/// The agent binary as a command. When cross-testing, `DPU_TEST_RUNNER` names the emulator that runs target
/// binaries (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`), as cargo's runner does for the test itself.
pub fn agent_command() -> Command {
    match std::env::var("DPU_TEST_RUNNER").ok().filter(|r| !r.trim().is_empty()) {
        Some(runner) => {
            let mut words = runner.split_whitespace();
            let mut command = Command::new(words.next().unwrap());
            command.args(words).arg(AGENT);
            command
        }
        None => Command::new(AGENT),
    }
}

/// A running agent on ephemeral loopback ports, stopped with SIGTERM on drop. Its stderr is read for as long
/// as it runs (so it never blocks on a full pipe); the JSON log events are kept for [`Agent::events`].
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    events: Mutex<mpsc::Receiver<serde_json::Value>>,
}

impl Agent {
    /// Starts the agent with `args` and waits for it to report both listeners.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = agent_command()
            .args(["--log-format", "json", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dpu-agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                // The receiver goes with the Agent; keep draining the pipe after that.
                let _ = tx.send(event);
            }
        });
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let Ok(event) = rx.recv_timeout(Duration::from_secs(20)) else {
                let status = child.wait().unwrap();
                panic!("agent did not start (exit {status})");
            };
            let message = event["message"].as_str().unwrap_or_default();
            let at = event["addr"].as_str().unwrap_or_default();
            if message.starts_with("serving the control API") {
                addr = at.parse().ok();
            } else if message.starts_with("admin listener") {
                admin = at.parse().ok();
            }
        }
        Self { child, addr: addr.unwrap(), admin: admin.unwrap(), events: Mutex::new(rx) }
    }

    /// The log events written since the previous call (or since start-up finished).
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.events.lock().unwrap().try_iter().collect()
    }

    /// SIGTERM and wait for the exit status. Waits off the runtime thread, so the test's gRPC connections
    /// keep running and can answer the agent's GOAWAY while it drains.
    pub async fn stop(mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the agent binary to completion (for start-up failures) and returns its status and stderr.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let out = agent_command().args(args).output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

pub async fn plaintext(addr: SocketAddr) -> AgentServiceClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    AgentServiceClient::new(channel)
}

impl Agent {
    /// SIGKILL: no drain, no flush — what a crash or an OOM kill does.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A gRPC channel to the agent's API.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }
}

/// Fetches /metrics with a bare HTTP/1.1 request (no client library needed for one GET).
pub async fn metrics(admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}
