//! Who may call what.
//!
//! Clients authenticate with a certificate chained to the configured client CA (rustls refuses everyone else
//! during the handshake). The role comes from the certificate's subject organizational unit (`OU=viewer` or
//! `OU=operator`); a certificate without a recognised role gets none and is refused. Plaintext clients, allowed
//! only on loopback or with the explicit insecure flag, get the configured plaintext role.
//!
//! Authorization is default-deny by method name: only methods whose name starts with a read-only verb
//! (`Get`, `List`, `Watch`, `Check`, plus reflection) are open to viewers; everything else needs an operator.

use std::fmt;
use std::str::FromStr;
use std::task::{Context, Poll};

use http::{Request, Response};
use serde::{Deserialize, Serialize};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use crate::metrics::Metrics;

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only: Get/List/Watch.
    Viewer,
    /// May change intent.
    Operator,
}

impl Role {
    /// The label used in certificates and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            other => Err(format!("unknown role {other:?} (expected viewer or operator)")),
        }
    }
}

/// The caller's identity as seen by a handler, inserted into request extensions by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Caller {
    pub role: Role,
    /// Certificate subject common name, or "plaintext".
    pub name: String,
}

/// Reads the role and common name from a DER client certificate.
pub fn caller_from_certificate(der: &[u8]) -> Result<Caller, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unparsable certificate: {e}"))?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or("unnamed").to_owned();
    let mut roles = subject.iter_organizational_unit().filter_map(|ou| ou.as_str().ok()?.parse::<Role>().ok());
    // A certificate naming several roles gets the least privileged one.
    let role = roles
        .next()
        .map(|first| roles.fold(first, Role::min))
        .ok_or_else(|| format!("certificate {name:?} carries no role (expected subject OU=viewer or OU=operator)"))?;
    Ok(Caller { role, name })
}

/// True for methods a viewer may call. `path` is the gRPC path `/package.Service/Method`.
pub fn is_read_only(path: &str) -> bool {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (Some(service), Some(method)) = (parts.next(), parts.next()) else {
        return false;
    };
    if service.starts_with("grpc.reflection.") {
        return true;
    }
    ["Get", "List", "Watch", "Check"].iter().any(|verb| {
        method.strip_prefix(verb).is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_uppercase))
    })
}

/// Tower layer that authenticates the caller, authorizes the method and counts requests.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    plaintext_role: Role,
    metrics: Metrics,
}

impl AuthLayer {
    pub fn new(plaintext_role: Role, metrics: Metrics) -> Self {
        Self { plaintext_role, metrics }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, plaintext_role: self.plaintext_role, metrics: self.metrics.clone() }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    plaintext_role: Role,
    metrics: Metrics,
}

impl<S> Auth<S> {
    fn caller(&self, req: &Request<Body>) -> Result<Caller, String> {
        if let Some(tls) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
            let certs = tls.peer_certs().ok_or("no client certificate")?;
            let leaf = certs.first().ok_or("empty client certificate chain")?;
            return caller_from_certificate(leaf);
        }
        Ok(Caller { role: self.plaintext_role, name: "plaintext".into() })
    }
}

impl<S> Service<Request<Body>> for Auth<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let verdict = self.caller(&req).and_then(|caller| {
            if caller.role == Role::Operator || is_read_only(&path) {
                Ok(caller)
            } else {
                Err(format!("{path} changes state and needs the operator role; {:?} is a {}", caller.name, caller.role))
            }
        });
        match verdict {
            Ok(caller) => {
                self.metrics.api_request(&path, caller.role);
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(reason) => {
                self.metrics.api_denied(&path);
                tracing::warn!(method = %path, %reason, "request denied");
                let response = tonic::Status::permission_denied(reason).into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_methods() {
        assert!(is_read_only("/dpu.v1.AgentService/GetAgentInfo"));
        assert!(is_read_only("/dpu.v1.StorageService/ListVolumes"));
        assert!(is_read_only("/grpc.health.v1.Health/Check"));
        assert!(is_read_only("/grpc.health.v1.Health/Watch"));
        assert!(is_read_only("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(!is_read_only("/dpu.v1.AgentService/UpdateAgentSettings"));
        assert!(!is_read_only("/dpu.v1.StorageService/CreateVolume"));
        // A verb prefix must be a whole word: "Getaway" is not a Get.
        assert!(!is_read_only("/dpu.v1.X/Getaway"));
        assert!(!is_read_only("garbage"));
    }

    #[test]
    fn role_from_generated_certificates() {
        let pki = crate::pki::DevPki::generate(&["localhost".into()]).unwrap();
        let der = |pem: &str| {
            let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            p.contents
        };
        let viewer = caller_from_certificate(&der(&pki.viewer.cert_pem)).unwrap();
        assert_eq!(viewer.role, Role::Viewer);
        let operator = caller_from_certificate(&der(&pki.operator.cert_pem)).unwrap();
        assert_eq!(operator.role, Role::Operator);
        // The server certificate carries no role and must not act as a client.
        assert!(caller_from_certificate(&der(&pki.server.cert_pem)).is_err());
    }
}
