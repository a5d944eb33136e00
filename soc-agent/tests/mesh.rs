//! The mesh proxy through the real agent binary: objects created over `MeshService` carry traffic, bad specs are
//! refused naming the field, referenced objects cannot be deleted, and after SIGKILL the restarted agent rebuilds
//! the proxy from intent alone.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Agent;
use dpu_proto::v1 as pb;
use dpu_proto::v1::mesh_service_client::MeshServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An HTTP/1.1 backend answering every request with its name, keep-alive included.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let response = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}", name.len());
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// One `GET /` through the proxy with `Connection: close`; retried until the listener is up.
async fn get(proxy: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut stream) = TcpStream::connect(proxy).await {
            stream.write_all(b"GET / HTTP/1.1\r\nHost: web.default\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut response = String::new();
            if stream.read_to_string(&mut response).await.is_ok() && !response.is_empty() {
                return response;
            }
        }
        assert!(Instant::now() < deadline, "the proxy never answered on {proxy}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cluster(endpoint: &str) -> pb::MeshCluster {
    pb::MeshCluster {
        protocol: pb::MeshUpstreamProtocol::Http1 as i32,
        endpoints: vec![pb::MeshEndpoint { address: endpoint.into(), ..Default::default() }],
        ..Default::default()
    }
}

async fn create_web(mesh: &mut MeshServiceClient<Channel>, backend: SocketAddr, listen: SocketAddr) {
    mesh.create_mesh_cluster(pb::CreateMeshClusterRequest {
        cluster_id: "web".into(),
        cluster: Some(cluster(&backend.to_string())),
    })
    .await
    .unwrap();
    let route = pb::MeshRoute {
        name: "all".into(),
        path: Some(pb::mesh_route::Path::PathPrefix("/".into())),
        action: Some(pb::mesh_route::Action::Forward(pb::MeshForward {
            clusters: vec![pb::MeshWeightedCluster { cluster: "web".into(), weight: 1 }],
            ..Default::default()
        })),
        ..Default::default()
    };
    mesh.create_mesh_route_table(pb::CreateMeshRouteTableRequest {
        route_table_id: "web".into(),
        route_table: Some(pb::MeshRouteTable {
            virtual_hosts: vec![pb::MeshVirtualHost {
                name: "web".into(),
                domains: vec!["web.default".into()],
                routes: vec![route],
            }],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let http = pb::MeshHttpHandler { route_table: "web".into(), codec: pb::MeshHttpCodec::Http1 as i32 };
    mesh.create_mesh_listener(pb::CreateMeshListenerRequest {
        listener_id: "inbound".into(),
        listener: Some(pb::MeshListener {
            address: listen.to_string(),
            default_handler: Some(pb::MeshHandler { kind: Some(pb::mesh_handler::Kind::Http(http)) }),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_objects_carry_traffic_and_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let backend_a = backend("backend-a").await;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));

    let agent = Agent::start(&["--data-dir", data]);
    let mut mesh = MeshServiceClient::new(agent.channel().await);
    create_web(&mut mesh, backend_a, listen).await;
    let response = get(listen).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("backend-a"), "{response}");

    // Bad input is refused with the field named, and nothing is stored.
    let err = mesh
        .create_mesh_cluster(pb::CreateMeshClusterRequest {
            cluster_id: "bad".into(),
            cluster: Some(cluster("127.0.0.1:0")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("cluster.endpoints[0].address:"), "{}", err.message());
    let err = mesh.get_mesh_cluster(pb::GetMeshResourceRequest { name: "meshClusters/bad".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // A cluster a route table still uses cannot go.
    let err = mesh
        .delete_mesh_cluster(pb::DeleteMeshResourceRequest { name: "meshClusters/web".into(), allow_missing: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("meshRouteTables/web"), "{}", err.message());

    // The listener reports ready at its generation.
    let listener =
        mesh.get_mesh_listener(pb::GetMeshResourceRequest { name: "meshListeners/inbound".into() }).await.unwrap();
    let status = listener.into_inner().status.unwrap();
    assert_eq!(status.state, pb::ResourceState::Ready as i32, "{status:?}");

    // Crash: the restarted agent rebuilds the proxy from intent alone.
    agent.kill();
    let agent = Agent::start(&["--data-dir", data]);
    let response = get(listen).await;
    assert!(response.ends_with("backend-a"), "{response}");

    // An update to the cluster reaches new requests without touching the listener.
    let backend_b = backend("backend-b").await;
    let mut mesh = MeshServiceClient::new(agent.channel().await);
    let mut web = cluster(&backend_b.to_string());
    web.name = "meshClusters/web".into();
    mesh.update_mesh_cluster(pb::UpdateMeshClusterRequest { cluster: Some(web), expected_generation: 1 })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !get(listen).await.ends_with("backend-b") {
        assert!(Instant::now() < deadline, "the cluster update never took effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = common::metrics(agent.admin).await;
    assert!(metrics.contains("istio_requests_total{reporter=\"destination\""), "{metrics}");
    // Poll mode `in_flight` is the default: the workers polled while those requests were in flight.
    let awake = metrics
        .lines()
        .find_map(|line| line.strip_prefix("dpu_proxy_poll_awake_seconds_total "))
        .and_then(|value| value.parse::<f64>().ok());
    assert!(awake.is_some_and(|seconds| seconds > 0.0), "{awake:?} in {metrics}");
    assert!(agent.stop().await.success());
}

/// Access log lines (target `dpu_proxy::access`) among the agent's log events since the last look.
fn access_lines(agent: &Agent) -> usize {
    agent.events().iter().filter(|e| e["target"] == "dpu_proxy::access").count()
}

/// Sets the `log_filter` agent setting and waits until the agent reports it applied.
async fn set_log_filter(agent: &Agent, filter: &str) {
    let mut client = pb::agent_service_client::AgentServiceClient::new(agent.channel().await);
    let request = pb::UpdateAgentSettingsRequest {
        settings: Some(pb::AgentSettings { log_filter: filter.into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["log_filter".into()] }),
        expected_generation: 0,
    };
    let generation = client.update_agent_settings(request).await.unwrap().into_inner().generation;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let settings = client
            .get_agent_settings(pb::GetAgentSettingsRequest { name: "settings".into() })
            .await
            .unwrap()
            .into_inner();
        let status = settings.status.unwrap_or_default();
        if status.observed_generation == generation && status.state == pb::ResourceState::Ready as i32 {
            return;
        }
        assert!(Instant::now() < deadline, "log_filter {filter:?} not applied: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_filters_access_logs_until_a_log_filter_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let backend_a = backend("backend-a").await;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent =
        Agent::start_with_env(&["--data-dir", data.to_str().unwrap()], &[("RUST_LOG", "info,dpu_proxy::access=off")]);
    let mut mesh = MeshServiceClient::new(agent.channel().await);
    create_web(&mut mesh, backend_a, listen).await;

    // The settings pass has run (nothing stored: the start filter stays), and requests log no access line.
    set_log_filter(&agent, "").await;
    assert!(get(listen).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(access_lines(&agent), 0, "RUST_LOG turned the access log off");

    // A stored filter wins over RUST_LOG while it is set.
    set_log_filter(&agent, "info").await;
    assert!(get(listen).await.starts_with("HTTP/1.1 200"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while access_lines(&agent) == 0 {
        assert!(Instant::now() < deadline, "no access line with log_filter \"info\"");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Cleared: back to the filter the agent started with.
    set_log_filter(&agent, "").await;
    let _ = access_lines(&agent);
    assert!(get(listen).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(access_lines(&agent), 0, "clearing log_filter restores the start filter");
    agent.stop().await;
}
