//! Development PKI: a CA, a server certificate and one client certificate per role, so the agent can be run
//! with mTLS out of the box. Production deployments bring their own CA; the agent only needs PEM files.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::api::auth::Role;

/// A PEM certificate and its PEM private key.
#[derive(Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The CA plus the server and per-role client certificates it issued.
#[derive(Debug)]
pub struct DevPki {
    pub ca: Issued,
    pub server: Issued,
    pub operator: Issued,
    pub viewer: Issued,
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

impl DevPki {
    /// Generates fresh keys and certificates. `server_names` are DNS names or IP addresses for the server
    /// certificate's subjectAltName.
    pub fn generate(server_names: &[String]) -> Result<Self, rcgen::Error> {
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = name("dpu-agent development CA", None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut ca_params, 3650);
        let ca_key = KeyPair::generate()?;
        let ca_key_pem = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

        let leaf = |common_name: &str, sans: Vec<String>, role: Option<Role>| -> Result<Issued, rcgen::Error> {
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name = name(common_name, role);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![if role.is_some() {
                ExtendedKeyUsagePurpose::ClientAuth
            } else {
                ExtendedKeyUsagePurpose::ServerAuth
            }];
            validity(&mut params, 825);
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca)?;
            Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
        };

        Ok(Self {
            server: leaf("dpu-agent", server_names.to_vec(), None)?,
            operator: leaf("dpuctl-operator", Vec::new(), Some(Role::Operator))?,
            viewer: leaf("dpuctl-viewer", Vec::new(), Some(Role::Viewer))?,
            ca: Issued { cert_pem: ca.pem(), key_pem: ca_key_pem },
        })
    }

    /// Writes `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem`, `operator.pem`, `operator-key.pem`,
    /// `viewer.pem`, `viewer-key.pem` into `dir` (keys mode 0600).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        for (stem, issued) in
            [("ca", &self.ca), ("server", &self.server), ("operator", &self.operator), ("viewer", &self.viewer)]
        {
            write_file(&dir.join(format!("{stem}.pem")), &issued.cert_pem, 0o644)?;
            write_file(&dir.join(format!("{stem}-key.pem")), &issued.key_pem, 0o600)?;
        }
        Ok(())
    }
}

fn name(common_name: &str, role: Option<Role>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "dpu-agent");
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.as_str());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn write_file(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}
