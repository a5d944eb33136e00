//! CryptoService through the binary: ESP keys and IPsec tunnels — every refusal names its field, no answer
//! carries key material, and a tunnel the kernel cannot realise here (this host's kernel has xfrm but no ESP
//! algorithms) reports the kernel's own refusal in its status rather than pretending.

mod common;

use std::time::{Duration, Instant};

use common::Agent;
use dpu_proto::v1 as pb;
use dpu_proto::v1::crypto_service_client::CryptoServiceClient;
use tonic::Code;

fn tunnel(key_out: &str, key_in: &str) -> pb::IpsecTunnel {
    pb::IpsecTunnel {
        local_address: "192.168.77.1".into(),
        remote_address: "192.168.77.2".into(),
        local_subnet: "10.1.0.0/24".into(),
        remote_subnet: "10.2.0.0/24".into(),
        spi_out: 0x1001,
        spi_in: 0x1002,
        key_out: key_out.into(),
        key_in: key_in.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn ipsec_tunnels_are_checked_stored_and_report_what_the_kernel_did() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&["--data-dir", dir.path().join("data").to_str().unwrap()]);
    let mut c = CryptoServiceClient::new(agent.channel().await);
    let material: Vec<u8> = (0..36u8).map(|b| b.wrapping_mul(37) ^ 0xa5).collect();
    let key = |algorithm: pb::KeyAlgorithm, material: Vec<u8>| pb::CryptoKey {
        algorithm: algorithm as i32,
        material,
        ..Default::default()
    };
    for (id, algorithm) in [("k-out", pb::KeyAlgorithm::Aes256GcmEsp), ("k-in", pb::KeyAlgorithm::Aes256GcmEsp)] {
        let request = pb::CreateCryptoKeyRequest { key_id: id.into(), key: Some(key(algorithm, material.clone())) };
        let created = c.create_crypto_key(request).await.unwrap().into_inner();
        assert_eq!(created.size_bits, 288);
        assert!(created.material.is_empty());
    }
    let short = pb::CreateCryptoKeyRequest {
        key_id: "short".into(),
        key: Some(key(pb::KeyAlgorithm::Aes128GcmEsp, vec![1; 16])),
    };
    let err = c.create_crypto_key(short).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("20"), "{}", err.message());
    let gcm =
        pb::CreateCryptoKeyRequest { key_id: "gcm".into(), key: Some(key(pb::KeyAlgorithm::Aes256Gcm, vec![3; 32])) };
    c.create_crypto_key(gcm).await.unwrap();

    let create = |id: &str, t: pb::IpsecTunnel| pb::CreateIpsecTunnelRequest { tunnel_id: id.into(), tunnel: Some(t) };
    type Change = fn(&mut pb::IpsecTunnel);
    let refusals: [(pb::IpsecTunnel, Change, Code, &str); 6] = [
        (tunnel("k-out", "k-in"), |t: &mut pb::IpsecTunnel| t.spi_in = 7, Code::InvalidArgument, "tunnel.spi_in"),
        (
            tunnel("k-out", "k-in"),
            |t: &mut pb::IpsecTunnel| t.remote_address = "2001:db8::2".into(),
            Code::InvalidArgument,
            "tunnel.remote",
        ),
        (
            tunnel("k-out", "k-in"),
            |t: &mut pb::IpsecTunnel| t.local_subnet = "10.1.0.0/40".into(),
            Code::InvalidArgument,
            "tunnel.local_subnet",
        ),
        (tunnel("nope", "k-in"), |_: &mut pb::IpsecTunnel| {}, Code::FailedPrecondition, "tunnel.key_out"),
        (tunnel("k-out", "gcm"), |_: &mut pb::IpsecTunnel| {}, Code::FailedPrecondition, "aes-256-gcm-esp"),
        (
            tunnel("k-out", "k-in"),
            |t: &mut pb::IpsecTunnel| {
                t.policy = pb::CryptoPolicy::RequireHardware as i32;
                t.device = "lo".into();
            },
            Code::FailedPrecondition,
            "esp-hw-offload",
        ),
    ];
    for (mut t, change, code, text) in refusals {
        change(&mut t);
        let err = c.create_ipsec_tunnel(create("bad", t)).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(text), "{text}: {}", err.message());
    }
    assert!(
        c.list_ipsec_tunnels(pb::ListIpsecTunnelsRequest::default()).await.unwrap().into_inner().tunnels.is_empty()
    );

    let created = c.create_ipsec_tunnel(create("east", tunnel("k-out", "k-in"))).await.unwrap().into_inner();
    assert_eq!(created.name, "ipsecTunnels/east");
    assert_eq!(created.request_id >> 24, 0xd9);
    // Deleting a key a tunnel uses is refused, naming the tunnel.
    let err = c
        .delete_crypto_key(pb::DeleteCryptoKeyRequest { name: "cryptoKeys/k-in".into(), allow_missing: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("ipsecTunnels/east"), "{}", err.message());

    // The reconciler reports either the installed tunnel (a kernel with ESP) or the kernel's refusal.
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let got = c
            .get_ipsec_tunnel(pb::GetIpsecTunnelRequest { name: "ipsecTunnels/east".into() })
            .await
            .unwrap()
            .into_inner();
        let state = got.status.as_ref().map(|s| s.state).unwrap_or_default();
        if state == pb::ResourceState::Ready as i32 || state == pb::ResourceState::Error as i32 {
            break got;
        }
        assert!(Instant::now() < deadline, "the tunnel stayed pending: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = got.status.clone().unwrap();
    if status.state == pb::ResourceState::Ready as i32 {
        let placement = got.crypto.clone().expect("a ready tunnel reports its placement");
        assert!(!placement.hardware && placement.reason.contains("no offload device"), "{placement:?}");
    } else {
        assert!(status.reason.contains("kernel") || status.reason.contains("xfrm"), "{status:?}");
    }
    let hex: String = material.iter().map(|b| format!("{b:02x}")).collect();
    let answer = format!("{got:?}");
    assert!(!answer.contains(&hex) && !answer.contains(&format!("{:?}", &material[..8])), "{answer}");

    c.delete_ipsec_tunnel(pb::DeleteIpsecTunnelRequest { name: "ipsecTunnels/east".into(), allow_missing: false })
        .await
        .unwrap();
    c.delete_crypto_key(pb::DeleteCryptoKeyRequest { name: "cryptoKeys/k-in".into(), allow_missing: false })
        .await
        .unwrap();
    let log = std::fs::read(dir.path().join("data/intent.log")).unwrap();
    assert!(!log.windows(material.len()).any(|w| w == material.as_slice()), "raw key bytes in the intent log");
    assert!(!String::from_utf8_lossy(&log).contains(&hex), "hex key in the intent log");
    assert_eq!(agent.stop().await.code(), Some(0));
}
