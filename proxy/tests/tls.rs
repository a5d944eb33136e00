//! Mesh mTLS end to end: identities loaded into a `TlsStore`, real TLS 1.3 handshakes over in-memory pipes.

use std::collections::BTreeMap;
use std::sync::Arc;

use dpu_proxy::model::{CertificateSpec, SpiffeId};
use dpu_proxy::tls::{TlsStore, issue_dev_identity, new_dev_ca, peer_identity};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

struct Ca {
    cert: String,
    key: String,
}

impl Ca {
    fn new(trust_domain: &str) -> Ca {
        let (cert, key) = new_dev_ca(trust_domain).expect("CA");
        Ca { cert, key }
    }

    /// A certificate spec for `id`, trusting this CA.
    fn spec(&self, id: &SpiffeId) -> CertificateSpec {
        let (chain, key) = issue_dev_identity(&self.cert, &self.key, id, 1).expect("issue");
        CertificateSpec { certificate_chain_pem: chain, private_key_pem: key, trust_bundle_pem: self.cert.clone() }
    }
}

fn sid(s: &str) -> SpiffeId {
    s.parse().expect("SPIFFE ID")
}

fn web() -> SpiffeId {
    sid("spiffe://cluster.local/ns/shop/sa/web")
}

fn api() -> SpiffeId {
    sid("spiffe://cluster.local/ns/shop/sa/api")
}

fn store_with(certs: &[(&str, CertificateSpec)]) -> TlsStore {
    let store = TlsStore::default();
    let errors = store.apply(&certs.iter().map(|(id, spec)| (id.to_string(), spec.clone())).collect());
    assert!(errors.is_empty(), "{errors:?}");
    store
}

fn name() -> ServerName<'static> {
    ServerName::try_from("mesh.invalid").expect("server name")
}

type Pair = (std::io::Result<server::TlsStream<DuplexStream>>, std::io::Result<client::TlsStream<DuplexStream>>);

async fn handshake(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) -> Pair {
    let (s, c) = tokio::io::duplex(64 * 1024);
    tokio::join!(TlsAcceptor::from(server).accept(s), TlsConnector::from(client).connect(name(), c))
}

/// Client writes `ping`, server answers `pong`.
async fn exchange(server: &mut server::TlsStream<DuplexStream>, client: &mut client::TlsStream<DuplexStream>) {
    client.write_all(b"ping").await.expect("client write");
    client.flush().await.expect("client flush");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.expect("server read");
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.expect("server write");
    server.flush().await.expect("server flush");
    client.read_exact(&mut buf).await.expect("client read");
    assert_eq!(&buf, b"pong");
}

fn serial(cert: &CertificateDer<'_>) -> Vec<u8> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).expect("x509");
    parsed.raw_serial().to_vec()
}

fn server_chain(client: &client::TlsStream<DuplexStream>) -> Vec<CertificateDer<'static>> {
    client.get_ref().1.peer_certificates().expect("server certificates").to_vec()
}

#[tokio::test]
async fn mutual_tls_reports_both_identities() {
    let ca = Ca::new("cluster.local");
    let store = store_with(&[("web", ca.spec(&web())), ("api", ca.spec(&api()))]);
    assert_eq!(store.identity("web"), Some(web()));
    assert_eq!(store.identity("api"), Some(api()));
    assert_eq!(store.identity("nope"), None);

    let server = store.server_config("api", true, &[b"h2"], false).expect("server config");
    let client = store.client_config("web", &[api()], &[b"h2"], false).expect("client config");
    let (s, c) = handshake(server, client).await;
    let (mut s, mut c) = (s.expect("server handshake"), c.expect("client handshake"));

    let (_, server_conn) = s.get_ref();
    assert_eq!(server_conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(server_conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(peer_identity(server_conn.peer_certificates().expect("client chain")), Some(web()));
    assert_eq!(peer_identity(&server_chain(&c)), Some(api()));
    exchange(&mut s, &mut c).await;
}

#[tokio::test]
async fn any_spiffe_identity_is_accepted_when_none_is_expected() {
    let ca = Ca::new("cluster.local");
    let store = store_with(&[("web", ca.spec(&web())), ("api", ca.spec(&api()))]);
    let (s, c) = handshake(
        store.server_config("api", true, &[], false).unwrap(),
        store.client_config("web", &[], &[], false).unwrap(),
    )
    .await;
    let (mut s, mut c) = (s.expect("server handshake"), c.expect("client handshake"));
    assert_eq!(peer_identity(&server_chain(&c)), Some(api()));
    exchange(&mut s, &mut c).await;
}

#[tokio::test]
async fn wrong_server_identity_is_refused() {
    let ca = Ca::new("cluster.local");
    let store = store_with(&[("web", ca.spec(&web())), ("api", ca.spec(&api()))]);
    let other = sid("spiffe://cluster.local/ns/shop/sa/payments");
    let (s, c) = handshake(
        store.server_config("api", true, &[], false).unwrap(),
        store.client_config("web", std::slice::from_ref(&other), &[], false).unwrap(),
    )
    .await;
    let err = c.expect_err("client must refuse the server").to_string();
    assert!(err.contains("spiffe://cluster.local/ns/shop/sa/api") && err.contains(&other.to_string()), "{err}");
    assert!(s.is_err());
}

#[tokio::test]
async fn server_from_another_ca_is_refused() {
    let ca = Ca::new("cluster.local");
    let rogue = Ca::new("cluster.local");
    let mut api_spec = rogue.spec(&api());
    // The server trusts our CA (so it would accept the client) but presents a certificate of another CA.
    api_spec.trust_bundle_pem = format!("{}{}", ca.cert, rogue.cert);
    let store = store_with(&[("web", ca.spec(&web())), ("api", api_spec)]);
    let (s, c) = handshake(
        store.server_config("api", true, &[], false).unwrap(),
        store.client_config("web", &[], &[], false).unwrap(),
    )
    .await;
    let err = c.expect_err("client must refuse the server").to_string();
    // Both CAs carry the same name, so the chain fails on the issuer's signature.
    assert!(err.contains("BadSignature") || err.contains("UnknownIssuer"), "{err}");
    assert!(s.is_err());
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let ca = Ca::new("cluster.local");
    let rogue = Ca::new("cluster.local");
    let mut web_spec = rogue.spec(&web());
    web_spec.trust_bundle_pem = format!("{}{}", rogue.cert, ca.cert);
    let store = store_with(&[("web", web_spec), ("api", ca.spec(&api()))]);
    let (s, c) = handshake(
        store.server_config("api", true, &[], false).unwrap(),
        store.client_config("web", &[], &[], false).unwrap(),
    )
    .await;
    let err = s.expect_err("server must refuse the client").to_string();
    assert!(err.contains("BadSignature") || err.contains("UnknownIssuer"), "{err}");
    // TLS 1.3: the client finishes first, then learns of the refusal on its first read.
    if let Ok(mut c) = c {
        let mut buf = [0u8; 1];
        assert!(matches!(c.read(&mut buf).await, Err(_) | Ok(0)), "the refused client must not get data");
    }
}

#[tokio::test]
async fn client_without_certificate_is_refused_when_required() {
    #[derive(Debug)]
    struct NoCert;
    impl rustls::client::ResolvesClientCert for NoCert {
        fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
        fn has_certs(&self) -> bool {
            false
        }
    }

    let ca = Ca::new("cluster.local");
    let store = store_with(&[("web", ca.spec(&web())), ("api", ca.spec(&api()))]);
    let mut anonymous = (*store.client_config("web", &[], &[], false).unwrap()).clone();
    anonymous.client_auth_cert_resolver = Arc::new(NoCert);
    let anonymous = Arc::new(anonymous);

    let (s, _c) = handshake(store.server_config("api", true, &[], false).unwrap(), anonymous.clone()).await;
    let err = s.expect_err("server must refuse a client without a certificate").to_string();
    assert!(err.contains("NoCertificatesPresented") || err.contains("certificate"), "{err}");

    // Without required client authentication the same client is served, and has no peer identity.
    let (s, c) = handshake(store.server_config("api", false, &[], false).unwrap(), anonymous).await;
    let (mut s, mut c) = (s.expect("server handshake"), c.expect("client handshake"));
    assert!(s.get_ref().1.peer_certificates().is_none());
    exchange(&mut s, &mut c).await;
}

#[tokio::test]
async fn rotation_keeps_established_connections_and_serves_the_new_certificate() {
    let ca = Ca::new("cluster.local");
    let web_spec = ca.spec(&web());
    let store = store_with(&[("web", web_spec.clone()), ("api", ca.spec(&api()))]);
    let server = store.server_config("api", true, &[], false).unwrap();
    let client = store.client_config("web", &[api()], &[], false).unwrap();

    let (s, c) = handshake(server.clone(), client.clone()).await;
    let (mut s, mut c) = (s.expect("server handshake"), c.expect("client handshake"));
    let old_serial = serial(&server_chain(&c)[0]);

    let rotated = ca.spec(&api());
    let errors = store.apply(&BTreeMap::from([("web".to_string(), web_spec), ("api".to_string(), rotated)]));
    assert!(errors.is_empty(), "{errors:?}");

    // The established connection is untouched.
    exchange(&mut s, &mut c).await;

    // A new handshake on the configs built before the rotation presents the new certificate.
    let (s2, c2) = handshake(server, client).await;
    let (mut s2, mut c2) = (s2.expect("server handshake"), c2.expect("client handshake"));
    let new_chain = server_chain(&c2);
    assert_ne!(serial(&new_chain[0]), old_serial);
    assert_eq!(peer_identity(&new_chain), Some(api()));
    exchange(&mut s2, &mut c2).await;
}

#[tokio::test]
async fn trust_bundle_rotation_applies_to_new_handshakes() {
    let old_ca = Ca::new("cluster.local");
    let new_ca = Ca::new("cluster.local");
    let store = store_with(&[("web", old_ca.spec(&web())), ("api", old_ca.spec(&api()))]);
    let server = store.server_config("api", true, &[], false).unwrap();
    let client = store.client_config("web", &[], &[], false).unwrap();

    // The server moves to the new CA and trusts both; the client still trusts only the old one.
    let mut api_spec = new_ca.spec(&api());
    api_spec.trust_bundle_pem = format!("{}{}", old_ca.cert, new_ca.cert);
    let mut certs = BTreeMap::from([("web".to_string(), old_ca.spec(&web())), ("api".to_string(), api_spec)]);
    assert!(store.apply(&certs).is_empty());
    let (_s, c) = handshake(server.clone(), client.clone()).await;
    assert!(c.is_err(), "the client does not trust the new CA yet");

    // Once the client's bundle carries the new CA, the same configs connect.
    certs.get_mut("web").unwrap().trust_bundle_pem = format!("{}{}", old_ca.cert, new_ca.cert);
    assert!(store.apply(&certs).is_empty());
    let (s, c) = handshake(server, client).await;
    let (mut s, mut c) = (s.expect("server handshake"), c.expect("client handshake"));
    exchange(&mut s, &mut c).await;
}

#[tokio::test]
async fn removed_certificate_refuses_new_handshakes() {
    let ca = Ca::new("cluster.local");
    let web_spec = ca.spec(&web());
    let store = store_with(&[("web", web_spec.clone()), ("api", ca.spec(&api()))]);
    let server = store.server_config("api", true, &[], false).unwrap();
    let client = store.client_config("web", &[], &[], false).unwrap();
    assert!(store.apply(&BTreeMap::from([("web".to_string(), web_spec)])).is_empty());
    assert_eq!(store.identity("api"), None);
    assert!(store.server_config("api", true, &[], false).is_err());
    let (s, c) = handshake(server, client).await;
    assert!(s.is_err() && c.is_err());
}

#[tokio::test]
async fn intermediate_ca_chains_are_served_and_verified() {
    let root = Ca::new("cluster.local");
    // An intermediate CA issued by the root, and a workload certificate issued by the intermediate.
    let root_key = rcgen::KeyPair::from_pem(&root.key).unwrap();
    let root_issuer = rcgen::Issuer::from_ca_cert_pem(&root.cert, root_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "mesh intermediate");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let intermediate_key = rcgen::KeyPair::generate().unwrap();
    let intermediate = params.signed_by(&intermediate_key, &root_issuer).unwrap();
    let (leaf, key) = issue_dev_identity(&intermediate.pem(), &intermediate_key.serialize_pem(), &api(), 1).unwrap();
    let api_spec = CertificateSpec {
        certificate_chain_pem: format!("{leaf}{}", intermediate.pem()),
        private_key_pem: key,
        trust_bundle_pem: root.cert.clone(),
    };
    let store = store_with(&[("web", root.spec(&web())), ("api", api_spec)]);
    let (s, c) = handshake(
        store.server_config("api", true, &[], false).unwrap(),
        store.client_config("web", &[api()], &[], false).unwrap(),
    )
    .await;
    let (mut s, mut c) = (s.expect("server handshake"), c.expect("client handshake"));
    assert_eq!(server_chain(&c).len(), 2);
    exchange(&mut s, &mut c).await;
}

#[tokio::test]
async fn bad_specs_name_the_field_and_keep_the_previous_identity() {
    let ca = Ca::new("cluster.local");
    let good = ca.spec(&api());
    let store = store_with(&[("api", good.clone())]);
    let server = store.server_config("api", false, &[], false).unwrap();

    let other = ca.spec(&web());
    let no_uri = {
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert, rcgen::KeyPair::from_pem(&ca.key).unwrap()).unwrap();
        let params = rcgen::CertificateParams::new(vec!["api.shop.svc".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        CertificateSpec {
            certificate_chain_pem: cert.pem(),
            private_key_pem: key.serialize_pem(),
            trust_bundle_pem: ca.cert.clone(),
        }
    };
    let foreign_bundle = CertificateSpec { trust_bundle_pem: Ca::new("cluster.local").cert, ..good.clone() };
    let cases = [
        (
            CertificateSpec {
                certificate_chain_pem: "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into(),
                ..good.clone()
            },
            "certificate.certificate_chain_pem",
            "PEM",
        ),
        (
            CertificateSpec { private_key_pem: other.private_key_pem.clone(), ..good.clone() },
            "certificate.private_key_pem",
            "does not match",
        ),
        (no_uri, "certificate.certificate_chain_pem", "no spiffe:// URI SAN"),
        (foreign_bundle, "certificate.certificate_chain_pem", "does not chain to the trust bundle"),
        (
            CertificateSpec {
                trust_bundle_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
                ..good.clone()
            },
            "certificate.trust_bundle_pem",
            "not a usable trust anchor",
        ),
    ];
    for (spec, field, message) in cases {
        let errors = store.apply(&BTreeMap::from([("api".to_string(), spec)]));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, "api");
        assert_eq!(errors[0].1.field, field, "{}", errors[0].1.message);
        assert!(errors[0].1.message.contains(message), "{}", errors[0].1.message);
        assert_eq!(store.identity("api"), Some(api()), "the previous identity is kept");
    }

    // The config built before the failed updates still serves the original certificate.
    let client_store = store_with(&[("web", other)]);
    let (_s, c) = handshake(server, client_store.client_config("web", &[api()], &[], false).unwrap()).await;
    let chain = server_chain(&c.expect("client handshake"));
    let good_leaf = rustls_pemfile::certs(&mut good.certificate_chain_pem.as_bytes()).next().unwrap().unwrap();
    assert_eq!(chain[0], good_leaf);
}

#[tokio::test]
async fn a_new_id_with_a_bad_spec_is_not_loaded() {
    let ca = Ca::new("cluster.local");
    let mut spec = ca.spec(&api());
    spec.private_key_pem = ca.spec(&web()).private_key_pem;
    let store = TlsStore::default();
    let errors = store.apply(&BTreeMap::from([("api".to_string(), spec)]));
    assert_eq!(errors.len(), 1);
    assert_eq!(store.identity("api"), None);
    assert!(store.client_config("api", &[], &[], false).is_err());
}

#[test]
fn dev_identities_have_the_mesh_shape() {
    let ca = Ca::new("cluster.local");
    let (pem, _) = issue_dev_identity(&ca.cert, &ca.key, &web(), 30).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    assert_eq!(cert.version(), x509_parser::x509::X509Version::V3);
    let bc = cert.basic_constraints().unwrap().expect("basic constraints").value;
    assert!(!bc.ca);
    let eku = cert.extended_key_usage().unwrap().expect("extended key usage").value;
    assert!(eku.server_auth && eku.client_auth);
    let san = cert.subject_alternative_name().unwrap().expect("SAN").value;
    let uris: Vec<_> = san
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://cluster.local/ns/shop/sa/web"]);
    assert_eq!(peer_identity(&[der]), Some(web()));
    assert!(issue_dev_identity("not a cert", &ca.key, &web(), 1).is_err());
}

#[test]
fn peer_identity_needs_exactly_one_spiffe_uri() {
    let ca = Ca::new("cluster.local");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert, rcgen::KeyPair::from_pem(&ca.key).unwrap()).unwrap();
    let leaf = |uris: &[&str]| {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names =
            uris.iter().map(|u| rcgen::SanType::URI(u.to_string().try_into().unwrap())).collect();
        params.signed_by(&rcgen::KeyPair::generate().unwrap(), &issuer).unwrap().der().clone()
    };
    let one = leaf(&["https://shop.example/", "spiffe://cluster.local/ns/shop/sa/web"]);
    assert_eq!(peer_identity(&[one]), Some(web()));
    assert_eq!(
        peer_identity(&[leaf(&["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/api"])]),
        None
    );
    assert_eq!(peer_identity(&[leaf(&["spiffe://cluster.local/not/istio"])]), None);
    assert_eq!(peer_identity(&[leaf(&[])]), None);
    assert_eq!(peer_identity(&[CertificateDer::from(vec![0x30, 0x00])]), None);
    assert_eq!(peer_identity(&[]), None);

    // The same rule when loading: two SPIFFE IDs in the leaf are refused.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/api"]
        .iter()
        .map(|u| rcgen::SanType::URI(u.to_string().try_into().unwrap()))
        .collect();
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let spec = CertificateSpec {
        certificate_chain_pem: params.signed_by(&key, &issuer).unwrap().pem(),
        private_key_pem: key.serialize_pem(),
        trust_bundle_pem: ca.cert.clone(),
    };
    let errors = TlsStore::default().apply(&BTreeMap::from([("two".to_string(), spec)]));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].1.field, "certificate.certificate_chain_pem");
    assert!(errors[0].1.message.contains("more than one"), "{}", errors[0].1.message);
}
