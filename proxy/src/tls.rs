//! Mesh mTLS: workload identities (certificate chain, key and trust bundle per certificate id), rustls
//! configurations that read those identities live, and SPIFFE peer identities.
//!
//! Every identity lives in its own swappable cell. Configurations built by [`TlsStore::server_config`] and
//! [`TlsStore::client_config`] hold the cell, not its contents: a later [`TlsStore::apply`] that rotates the
//! certificate or the trust bundle takes effect on the next handshake, and established connections are untouched.
//! Peers are authenticated by their chain to the trust bundle and by the SPIFFE ID in their URI SAN; DNS names
//! play no part. Mesh connections are TLS 1.3 only, on the `ring` provider.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwapOption;
use dpu_intent::Invalid;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName as TlsDistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::model::{CertificateSpec, SpiffeId};

const FIELD_CHAIN: &str = "certificate.certificate_chain_pem";
const FIELD_KEY: &str = "certificate.private_key_pem";
const FIELD_BUNDLE: &str = "certificate.trust_bundle_pem";

/// Errors building TLS configurations or development certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {0:?} is not loaded")]
    UnknownCertificate(String),
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("the CA certificate or key is unusable: {0}")]
    BadCa(String),
    #[error("cannot generate the certificate")]
    Generate(#[source] rcgen::Error),
}

/// Why a peer certificate was refused after its chain verified; carried to rustls as
/// [`CertificateError::Other`], so it shows in handshake errors and logs (rustls prints it with `Debug`, which
/// therefore prints the message).
#[derive(thiserror::Error)]
enum PeerError {
    #[error("the certificate is not valid X.509")]
    NotX509,
    #[error("the certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("the certificate has more than one spiffe:// URI SAN")]
    SeveralSpiffeIds,
    #[error("the certificate's URI SAN {uri:?} is not a SPIFFE ID: {message}")]
    BadSpiffeId { uri: String, message: String },
    #[error("the peer identity {presented} is none of the expected identities ({expected})")]
    UnexpectedIdentity { presented: SpiffeId, expected: String },
    #[error("the local certificate {0:?} was removed")]
    Removed(String),
}

impl fmt::Debug for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<PeerError> for rustls::Error {
    fn from(e: PeerError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------------------------------------------

/// A parsed trust bundle with the client verifier built from it, shared by every identity whose bundle PEM is
/// identical, so the verifier is built once per bundle version and never on the handshake path.
struct Bundle {
    pem: String,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

/// One loaded identity: what a handshake reads from the live cell.
struct Identity {
    spiffe: SpiffeId,
    certified: Arc<CertifiedKey>,
    bundle: Arc<Bundle>,
    /// The spec it was loaded from, to skip unchanged re-applies (never printed: `CertificateSpec`'s `Debug`
    /// redacts the key).
    spec: CertificateSpec,
}

type Cell = Arc<ArcSwapOption<Identity>>;

/// Workload identities by certificate id. Cheap to share (`Send + Sync`); configurations built from it follow
/// later rotations.
#[derive(Default)]
pub struct TlsStore {
    cells: RwLock<HashMap<String, Cell>>,
}

impl fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cells = self.cells.read().unwrap_or_else(|e| e.into_inner());
        let mut map = f.debug_map();
        for (id, cell) in cells.iter() {
            map.entry(id, &cell.load().as_ref().map(|i| i.spiffe.to_string()));
        }
        map.finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

impl TlsStore {
    /// Loads or rotates identities by certificate id. Returns per-id errors (field-named `Invalid`); an id whose
    /// new spec is bad keeps its previous good identity. Ids absent from `certs` are removed: configurations built
    /// for them refuse new handshakes from then on, even if the id is loaded again later (build new ones then).
    pub fn apply(&self, certs: &BTreeMap<String, CertificateSpec>) -> Vec<(String, Invalid)> {
        let mut cells = self.cells.write().unwrap_or_else(|e| e.into_inner());
        cells.retain(|id, cell| {
            let keep = certs.contains_key(id);
            if !keep {
                tracing::info!(certificate = %id, "certificate removed");
                cell.store(None);
            }
            keep
        });
        // Bundles already built, by PEM, so identities sharing a trust bundle share its verifier.
        let mut bundles: HashMap<String, Arc<Bundle>> = cells
            .values()
            .filter_map(|cell| cell.load_full())
            .map(|identity| (identity.bundle.pem.clone(), identity.bundle.clone()))
            .collect();
        let mut errors = Vec::new();
        for (id, spec) in certs {
            let current = cells.get(id).and_then(|cell| cell.load_full());
            if current.as_ref().is_some_and(|identity| identity.spec == *spec) {
                continue;
            }
            match load_identity(spec, &mut bundles) {
                Ok(identity) => {
                    tracing::info!(
                        certificate = %id,
                        identity = %identity.spiffe,
                        rotated = current.is_some(),
                        "certificate loaded"
                    );
                    let identity = Some(Arc::new(identity));
                    match cells.get(id) {
                        Some(cell) => cell.store(identity),
                        None => {
                            cells.insert(id.clone(), Arc::new(ArcSwapOption::new(identity)));
                        }
                    }
                }
                Err(invalid) => {
                    tracing::warn!(
                        certificate = %id,
                        field = %invalid.field,
                        error = %invalid.message,
                        kept_previous = current.is_some(),
                        "certificate rejected"
                    );
                    errors.push((id.clone(), invalid));
                }
            }
        }
        errors
    }

    /// The SPIFFE ID in the leaf's URI SAN of `cert_id`.
    pub fn identity(&self, cert_id: &str) -> Option<SpiffeId> {
        self.cell(cert_id).ok()?.load().as_ref().map(|identity| identity.spiffe.clone())
    }

    fn cell(&self, cert_id: &str) -> Result<Cell, TlsError> {
        let cells = self.cells.read().unwrap_or_else(|e| e.into_inner());
        cells.get(cert_id).cloned().ok_or_else(|| TlsError::UnknownCertificate(cert_id.to_owned()))
    }

    /// A TLS 1.3 server configuration presenting the live certificate of `cert_id`. With `require_client_cert`,
    /// clients must present a chain to the live trust bundle of `cert_id` with a SPIFFE URI SAN; without it, no
    /// client certificate is requested. With `kernel_tls`, sessions keep their keys for the kernel hand-over.
    pub fn server_config(
        &self,
        cert_id: &str,
        require_client_cert: bool,
        alpn: &[&[u8]],
        kernel_tls: bool,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let cell = self.cell(cert_id)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?;
        let resolver = Arc::new(LiveServerCert { cert_id: cert_id.to_owned(), cell: cell.clone() });
        let mut config = if require_client_cert {
            let verifier = Arc::new(LiveClientVerifier { cert_id: cert_id.to_owned(), cell, algorithms: algorithms() });
            builder.with_client_cert_verifier(verifier).with_cert_resolver(resolver)
        } else {
            builder.with_no_client_auth().with_cert_resolver(resolver)
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // No resumption: a resumed session would skip the live certificate and bundle checks after a rotation.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.enable_secret_extraction = kernel_tls;
        Ok(Arc::new(config))
    }

    /// A TLS 1.3 client configuration presenting the live certificate of `cert_id`. It verifies the server chain
    /// against the live bundle of `cert_id`, and its SPIFFE URI SAN against `server_identities` (any SPIFFE ID
    /// when empty) instead of a DNS name, so the `ServerName` given to the connector only sets SNI. With
    /// `kernel_tls`, sessions keep their keys for the kernel hand-over.
    pub fn client_config(
        &self,
        cert_id: &str,
        server_identities: &[SpiffeId],
        alpn: &[&[u8]],
        kernel_tls: bool,
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let cell = self.cell(cert_id)?;
        let verifier = Arc::new(LiveServerVerifier {
            cert_id: cert_id.to_owned(),
            cell: cell.clone(),
            expected: server_identities.to_vec(),
            algorithms: algorithms(),
        });
        let resolver = Arc::new(LiveClientCert { cert_id: cert_id.to_owned(), cell });
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(resolver);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // No resumption: every connection verifies the server against the live bundle and identities.
        config.resumption = rustls::client::Resumption::disabled();
        config.enable_secret_extraction = kernel_tls;
        Ok(Arc::new(config))
    }
}

fn bad(field: &str, message: impl Into<String>) -> Invalid {
    Invalid { field: field.to_owned(), message: message.into() }
}

fn parse_certs(field: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, Invalid> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(field, format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(field, "holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

fn load_bundle(pem: &str) -> Result<Bundle, Invalid> {
    let mut roots = RootCertStore::empty();
    for (i, der) in parse_certs(FIELD_BUNDLE, pem)?.into_iter().enumerate() {
        roots.add(der).map_err(|e| bad(FIELD_BUNDLE, format!("certificate {i} is not a usable trust anchor: {e}")))?;
    }
    let roots = Arc::new(roots);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| bad(FIELD_BUNDLE, format!("cannot build a client verifier: {e}")))?;
    Ok(Bundle { pem: pem.to_owned(), roots, client_verifier })
}

fn load_identity(spec: &CertificateSpec, bundles: &mut HashMap<String, Arc<Bundle>>) -> Result<Identity, Invalid> {
    spec.validate()?;
    let chain = parse_certs(FIELD_CHAIN, &spec.certificate_chain_pem)?;
    let spiffe = leaf_spiffe_id(&chain[0]).map_err(|e| bad(FIELD_CHAIN, format!("leaf: {e}")))?;

    let key_der = rustls_pemfile::private_key(&mut spec.private_key_pem.as_bytes())
        .map_err(|e| bad(FIELD_KEY, format!("is not valid PEM: {e}")))?
        .ok_or_else(|| bad(FIELD_KEY, "holds no PKCS#8, SEC1 or PKCS#1 private key"))?;
    let key = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| bad(FIELD_KEY, format!("is not a usable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|e| bad(FIELD_KEY, format!("does not match the leaf certificate: {e}")))?;

    let bundle = match bundles.get(&spec.trust_bundle_pem) {
        Some(bundle) => bundle.clone(),
        None => {
            let bundle = Arc::new(load_bundle(&spec.trust_bundle_pem)?);
            bundles.insert(spec.trust_bundle_pem.clone(), bundle.clone());
            bundle
        }
    };

    // The chain must validate against the bundle now, or peers would refuse it.
    let leaf = ParsedCertificate::try_from(&certified.cert[0])
        .map_err(|e| bad(FIELD_CHAIN, format!("leaf is not a valid certificate: {e}")))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &leaf,
        &bundle.roots,
        &certified.cert[1..],
        UnixTime::now(),
        algorithms().all,
    )
    .map_err(|e| bad(FIELD_CHAIN, format!("does not chain to the trust bundle: {e}")))?;

    Ok(Identity { spiffe, certified: Arc::new(certified), bundle, spec: spec.clone() })
}

// ---------------------------------------------------------------------------------------------------------------
// SPIFFE IDs in certificates
// ---------------------------------------------------------------------------------------------------------------

/// The one SPIFFE ID among the URI SANs of `cert`.
fn leaf_spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerError> {
    let uris = spiffe_uris(cert).ok_or(PeerError::NotX509)?;
    match uris.as_slice() {
        [] => Err(PeerError::NoSpiffeId),
        [uri] => uri.parse().map_err(|message| PeerError::BadSpiffeId { uri: uri.clone(), message }),
        _ => Err(PeerError::SeveralSpiffeIds),
    }
}

/// The `spiffe://` URI SANs of `cert`; `None` when it is not a parseable X.509 certificate.
fn spiffe_uris(cert: &CertificateDer<'_>) -> Option<Vec<String>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut uris = Vec::new();
    for ext in parsed.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.get(..9).is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
                {
                    uris.push((*uri).to_owned());
                }
            }
        }
    }
    Some(uris)
}

/// The SPIFFE ID in the URI SAN of the first certificate of a peer chain (`None` without exactly one).
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    leaf_spiffe_id(chain.first()?).ok()
}

// ---------------------------------------------------------------------------------------------------------------
// Live resolvers and verifiers
// ---------------------------------------------------------------------------------------------------------------

struct LiveServerCert {
    cert_id: String,
    cell: Cell,
}

impl fmt::Debug for LiveServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveServerCert").field("cert_id", &self.cert_id).finish()
    }
}

impl ResolvesServerCert for LiveServerCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let identity = self.cell.load();
        if identity.is_none() {
            tracing::warn!(certificate = %self.cert_id, "handshake refused: certificate was removed");
        }
        identity.as_ref().map(|identity| identity.certified.clone())
    }
}

struct LiveClientCert {
    cert_id: String,
    cell: Cell,
}

impl fmt::Debug for LiveClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveClientCert").field("cert_id", &self.cert_id).finish()
    }
}

impl ResolvesClientCert for LiveClientCert {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.cell.load().as_ref().map(|identity| identity.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.cell.load().is_some()
    }
}

/// Client authentication against the live bundle: the bundle's cached [`WebPkiClientVerifier`] checks the chain,
/// then the leaf must carry exactly one SPIFFE ID. Sends no CA names in the certificate request, since the bundle
/// can rotate under a config that must hand out a borrowed list; mesh clients present their one identity anyway.
struct LiveClientVerifier {
    cert_id: String,
    cell: Cell,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for LiveClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveClientVerifier").field("cert_id", &self.cert_id).finish()
    }
}

impl ClientCertVerifier for LiveClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[TlsDistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let identity = self.cell.load_full().ok_or_else(|| PeerError::Removed(self.cert_id.clone()))?;
        let verified = identity.bundle.client_verifier.verify_client_cert(end_entity, intermediates, now)?;
        leaf_spiffe_id(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Server authentication against the live bundle with webpki, then by SPIFFE ID instead of DNS name.
struct LiveServerVerifier {
    cert_id: String,
    cell: Cell,
    expected: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for LiveServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveServerVerifier").field("cert_id", &self.cert_id).field("expected", &self.expected).finish()
    }
}

impl ServerCertVerifier for LiveServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let identity = self.cell.load_full().ok_or_else(|| PeerError::Removed(self.cert_id.clone()))?;
        let leaf = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &identity.bundle.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = leaf_spiffe_id(end_entity)?;
        if !self.expected.is_empty() && !self.expected.contains(&presented) {
            let expected = self.expected.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            return Err(PeerError::UnexpectedIdentity { presented, expected }.into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Development PKI
// ---------------------------------------------------------------------------------------------------------------

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// A fresh self-signed mesh CA for `trust_domain` (ECDSA P-256, ten years): `(cert_pem, key_pem)`.
pub fn new_dev_ca(trust_domain: &str) -> Result<(String, String), TlsError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, format!("{trust_domain} mesh development CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, 3650);
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A workload certificate for `spiffe`, issued by the CA in `ca_cert_pem` / `ca_key_pem`, valid `days` days:
/// `(cert_pem, key_pem)`. The shape Istio and Envoy expect: X.509 v3, `CA:FALSE`, the SPIFFE ID as the only URI
/// SAN, key usage digitalSignature + keyEncipherment, EKU serverAuth + clientAuth.
pub fn issue_dev_identity(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    spiffe: &SpiffeId,
    days: u32,
) -> Result<(String, String), TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| TlsError::BadCa(format!("CA key: {e}")))?;
    let issuer =
        Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(|e| TlsError::BadCa(format!("CA certificate: {e}")))?;
    let mut params = CertificateParams::default();
    let uri = spiffe.to_string().try_into().map_err(TlsError::Generate)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, spiffe.trust_domain());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(TlsError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}
