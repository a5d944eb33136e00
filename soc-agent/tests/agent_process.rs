//! The `dpu-agent` binary as an operator meets it: config errors, mTLS and roles, persistence across restarts,
//! graceful stop, and refusal of a corrupted intent store.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::{Agent, plaintext, run_to_exit};

use dpu_proto::v1 as pb;
use dpu_proto::v1::agent_service_client::AgentServiceClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

async fn tls(addr: SocketAddr, pki: &Path, identity: Option<&str>) -> Result<Channel, tonic::transport::Error> {
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.join("ca.pem")).unwrap()))
        .domain_name("localhost");
    if let Some(who) = identity {
        let cert = std::fs::read(pki.join(format!("{who}.pem"))).unwrap();
        let key = std::fs::read(pki.join(format!("{who}-key.pem"))).unwrap();
        config = config.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))?.tls_config(config)?.connect().await
}

fn generate_pki(dir: &Path) {
    let (status, stderr) = run_to_exit(&["certs", "--out", dir.to_str().unwrap()]);
    assert!(status.success(), "{stderr}");
}

fn tls_config_file(dir: &Path, pki: &Path) -> PathBuf {
    let path = dir.join("agent.toml");
    let p = |name: &str| pki.join(name).display().to_string();
    std::fs::write(
        &path,
        format!(
            "data_dir = \"data\"\n[api.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            p("server.pem"),
            p("server-key.pem"),
            p("ca.pem")
        ),
    )
    .unwrap();
    path
}

fn settings_update(filter: &str) -> pb::UpdateAgentSettingsRequest {
    pb::UpdateAgentSettingsRequest {
        settings: Some(pb::AgentSettings { log_filter: filter.into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["log_filter".into()] }),
        expected_generation: 0,
    }
}

#[test]
fn malformed_config_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "data_dir = \"d\"\n[api]\nlisten = \"127.0.0.1:1\"\nport = 5\n").unwrap();
    let (status, stderr) = run_to_exit(&["--config", path.to_str().unwrap(), "check-config"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown field `port`"), "{stderr}");

    std::fs::write(&path, "[api]\nlisten = \"not an address\"\n").unwrap();
    let (status, stderr) = run_to_exit(&["--config", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("listen"), "{stderr}");
}

#[test]
fn plaintext_on_a_non_loopback_address_is_refused_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (status, stderr) = run_to_exit(&["--data-dir", data, "--listen", "0.0.0.0:0", "check-config"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("api.listen") && stderr.contains("plaintext"), "{stderr}");
    let (status, stderr) =
        run_to_exit(&["--data-dir", data, "--listen", "0.0.0.0:0", "--insecure-plaintext", "check-config"]);
    assert!(status.success(), "{stderr}");
}

#[tokio::test]
async fn settings_persist_across_a_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let agent = Agent::start(&["--data-dir", data]);
    let mut client = plaintext(agent.addr).await;

    let info = client.get_agent_info(pb::GetAgentInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.target_arch, std::env::consts::ARCH);
    assert_eq!(info.kernel_release, std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim());
    let names: Vec<_> = info.capabilities.iter().map(|c| c.name.as_str()).collect();
    assert!(names.contains(&"io_uring") && names.contains(&"ktls"), "{names:?}");

    let updated = client.update_agent_settings(settings_update("debug")).await.unwrap().into_inner();
    assert_eq!((updated.log_filter.as_str(), updated.generation), ("debug", 1));
    // Identical update: nothing written, generation unchanged.
    let again = client.update_agent_settings(settings_update("debug")).await.unwrap().into_inner();
    assert_eq!(again.generation, 1);

    let metrics = common::metrics(agent.admin).await;
    assert!(metrics.contains("dpu_api_requests_total{method=\"/dpu.v1.AgentService/UpdateAgentSettings\""));

    assert_eq!(agent.stop().await.code(), Some(0), "SIGTERM must stop the agent cleanly");

    let agent = Agent::start(&["--data-dir", data]);
    let mut client = plaintext(agent.addr).await;
    let settings = client.get_agent_settings(pb::GetAgentSettingsRequest::default()).await.unwrap().into_inner();
    assert_eq!((settings.log_filter.as_str(), settings.generation), ("debug", 1));
    assert_eq!(agent.stop().await.code(), Some(0));
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&["--data-dir", dir.path().to_str().unwrap()]);
    let mut client = plaintext(agent.addr).await;

    let err = client.update_agent_settings(settings_update("info,[[[")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("settings.log_filter"), "{}", err.message());

    let mut request = settings_update("debug");
    request.update_mask = Some(prost_types::FieldMask { paths: vec!["log_level".into()] });
    let err = client.update_agent_settings(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("update_mask") && err.message().contains("log_level"), "{}", err.message());

    let mut request = settings_update("debug");
    request.settings.as_mut().unwrap().labels.insert("Bad Key".into(), "v".into());
    request.update_mask = None;
    let err = client.update_agent_settings(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("settings.labels"), "{}", err.message());

    let err = client.get_agent_settings(pb::GetAgentSettingsRequest { name: "volumes/x".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn mtls_refuses_strangers_and_enforces_roles() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    generate_pki(&pki);
    let config = tls_config_file(dir.path(), &pki);
    let agent = Agent::start(&["--config", config.to_str().unwrap()]);

    // No client certificate: refused during the TLS handshake, before any RPC.
    let anonymous = match tls(agent.addr, &pki, None).await {
        Ok(channel) => AgentServiceClient::new(channel).get_agent_info(pb::GetAgentInfoRequest {}).await.err(),
        Err(e) => Some(tonic::Status::unavailable(e.to_string())),
    };
    assert!(anonymous.is_some(), "a client without a certificate must be refused");

    // A certificate from another CA is refused as well.
    let stranger = dir.path().join("stranger");
    generate_pki(&stranger);
    std::fs::copy(pki.join("ca.pem"), stranger.join("ca.pem")).unwrap();
    let stranger_call = match tls(agent.addr, &stranger, Some("operator")).await {
        Ok(channel) => AgentServiceClient::new(channel).get_agent_info(pb::GetAgentInfoRequest {}).await.err(),
        Err(e) => Some(tonic::Status::unavailable(e.to_string())),
    };
    assert!(stranger_call.is_some(), "a certificate from another CA must be refused");

    // Plaintext to a TLS listener fails.
    let plain = Endpoint::from_shared(format!("http://{}", agent.addr)).unwrap().connect().await;
    if let Ok(channel) = plain {
        assert!(AgentServiceClient::new(channel).get_agent_info(pb::GetAgentInfoRequest {}).await.is_err());
    }

    let mut viewer = AgentServiceClient::new(tls(agent.addr, &pki, Some("viewer")).await.unwrap());
    viewer.get_agent_info(pb::GetAgentInfoRequest {}).await.unwrap();
    let err = viewer.update_agent_settings(settings_update("debug")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("operator"), "{}", err.message());

    let mut operator = AgentServiceClient::new(tls(agent.addr, &pki, Some("operator")).await.unwrap());
    let updated = operator.update_agent_settings(settings_update("debug")).await.unwrap().into_inner();
    assert_eq!(updated.generation, 1);

    // Keys and tunnels: viewers list them, only operators create.
    use dpu_proto::v1::crypto_service_client::CryptoServiceClient;
    let mut viewer = CryptoServiceClient::new(tls(agent.addr, &pki, Some("viewer")).await.unwrap());
    viewer.list_crypto_keys(pb::ListCryptoKeysRequest::default()).await.unwrap();
    viewer.list_ipsec_tunnels(pb::ListIpsecTunnelsRequest::default()).await.unwrap();
    let key = pb::CryptoKey { algorithm: pb::KeyAlgorithm::Aes256GcmEsp as i32, generate: true, ..Default::default() };
    let create = pb::CreateCryptoKeyRequest { key_id: "k".into(), key: Some(key) };
    let err = viewer.create_crypto_key(create.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let tunnel = pb::CreateIpsecTunnelRequest { tunnel_id: "t".into(), tunnel: Some(pb::IpsecTunnel::default()) };
    let err = viewer.create_ipsec_tunnel(tunnel).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut operator = CryptoServiceClient::new(tls(agent.addr, &pki, Some("operator")).await.unwrap());
    operator.create_crypto_key(create).await.unwrap();
    assert_eq!(agent.stop().await.code(), Some(0));
}

#[tokio::test]
async fn corrupted_intent_store_refuses_start_and_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let agent = Agent::start(&["--data-dir", data]);
    let mut client = plaintext(agent.addr).await;
    client.update_agent_settings(settings_update("debug")).await.unwrap();
    let mut labels = settings_update("warn");
    labels.settings.as_mut().unwrap().labels.insert("rack".into(), "r7".into());
    labels.update_mask = None;
    client.update_agent_settings(labels).await.unwrap();
    assert_eq!(agent.stop().await.code(), Some(0));

    let log = dir.path().join("intent.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&log, &bytes).unwrap();

    let (status, stderr) =
        run_to_exit(&["--data-dir", data, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("corrupt") && stderr.contains("intent.log"), "{stderr}");
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "the corrupted file must be left exactly as found");
}
