//! `dpuctl crypto`: what the DPU can do in hardware, and the keys its data paths use. Key material goes to the
//! agent from a file or stdin (raw bytes, or hex with `--hex`) and never comes back.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{ArgGroup, Subcommand};
use dpu_proto::v1 as pb;
use dpu_proto::v1::crypto_service_client::CryptoServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

#[derive(Debug, Subcommand)]
pub enum CryptoCommand {
    /// The crypto capability registry: CPU, kernel and per-netdev offloads, probed now.
    Capabilities,
    /// Keys (write-only: their material never comes back).
    #[command(subcommand)]
    Key(KeyCommand),
    /// IPsec tunnels: tunnel-mode ESP with configured keys, kept in the kernel's xfrm tables.
    #[command(subcommand)]
    Tunnel(TunnelCommand),
}

#[derive(Debug, Subcommand)]
pub enum TunnelCommand {
    /// Create a tunnel to a peer (configure the peer with the same SPIs and keys, swapped).
    Create {
        #[arg(value_name = "ID", value_parser = tunnel_id)]
        id: String,
        /// This end's outer address.
        #[arg(long)]
        local: String,
        /// The peer's outer address.
        #[arg(long)]
        remote: String,
        /// What this end sends through the tunnel, e.g. 10.1.0.0/24.
        #[arg(long)]
        local_subnet: String,
        /// What the peer sends through it.
        #[arg(long)]
        remote_subnet: String,
        /// SPI of the outbound ESP state (256 or more; decimal or 0x hex).
        #[arg(long, value_parser = spi)]
        spi_out: u32,
        /// SPI of the inbound ESP state.
        #[arg(long, value_parser = spi)]
        spi_in: u32,
        /// cryptoKeys id of the outbound key (aes-128-gcm-esp or aes-256-gcm-esp).
        #[arg(long)]
        key_out: String,
        /// cryptoKeys id of the inbound key.
        #[arg(long)]
        key_in: String,
        /// The netdev that may offload ESP (esp-hw-offload).
        #[arg(long, default_value = "")]
        device: String,
        /// Where ESP may run: require-hardware, prefer-hardware (default), software.
        #[arg(long, value_parser = ["require-hardware", "prefer-hardware", "software"])]
        policy: Option<String>,
    },
    /// Rekey (new SPIs and keys; the previous states keep working for the overlap) or change a tunnel.
    Update {
        #[arg(value_name = "ID", value_parser = tunnel_id)]
        id: String,
        #[arg(long, value_parser = spi)]
        spi_out: Option<u32>,
        #[arg(long, value_parser = spi)]
        spi_in: Option<u32>,
        #[arg(long)]
        key_out: Option<String>,
        #[arg(long)]
        key_in: Option<String>,
        /// Seconds the replaced states keep working (default 30).
        #[arg(long)]
        overlap_seconds: Option<u32>,
    },
    /// One tunnel: its settings, status, placement and request id.
    Get {
        #[arg(value_name = "ID", value_parser = tunnel_id)]
        id: String,
    },
    /// Every tunnel.
    List,
    /// Delete a tunnel: its states and policies leave the kernel.
    Delete {
        #[arg(value_name = "ID", value_parser = tunnel_id)]
        id: String,
        #[arg(long)]
        allow_missing: bool,
    },
}

fn tunnel_id(text: &str) -> Result<String, String> {
    let id = text.strip_prefix("ipsecTunnels/").unwrap_or(text);
    if id.is_empty() || id.contains('/') {
        return Err(format!("{text:?} is neither an id nor a name like ipsecTunnels/ID"));
    }
    Ok(id.to_owned())
}

fn spi(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a 32-bit SPI"))
}

fn tunnel_json(t: pb::IpsecTunnel) -> Value {
    let (status, generation) = crate::status_json(t.status.as_ref(), t.generation);
    let mut out = json!({ "name": t.name, "local": t.local_address, "remote": t.remote_address,
        "local_subnet": t.local_subnet, "remote_subnet": t.remote_subnet,
        "spi_out": format!("{:#x}", t.spi_out), "spi_in": format!("{:#x}", t.spi_in),
        "key_out": t.key_out, "key_in": t.key_in, "policy": crate::policy_name(t.policy), "device": t.device,
        "rekey_overlap_seconds": t.rekey_overlap_seconds, "request_id": format!("{:#x}", t.request_id),
        "generation": generation, "status": status });
    if let Some(p) = t.crypto {
        out["crypto"] = crate::placement_json(&p);
    }
    out
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Import a key from a file or stdin, or let the agent generate one that never leaves the DPU.
    #[command(group(ArgGroup::new("source").required(true).args(["material_file", "material_stdin", "generate"])))]
    Create {
        /// ID or cryptoKeys/ID.
        #[arg(value_name = "ID", value_parser = key_id)]
        id: String,
        /// aes-256-xts (64 bytes, as cryptsetup's aes-xts-plain64 --key-size 512), aes-128-gcm, aes-256-gcm,
        /// aes-128-gcm-esp / aes-256-gcm-esp (IPsec: key and 4-byte salt, 20 / 36 bytes, as `ip xfrm` takes it).
        #[arg(long, value_parser = ["aes-256-xts", "aes-128-gcm", "aes-256-gcm", "aes-128-gcm-esp", "aes-256-gcm-esp"])]
        algorithm: String,
        /// Read the material from a file (raw bytes, e.g. a cryptsetup --key-file).
        #[arg(long, value_name = "PATH")]
        material_file: Option<PathBuf>,
        /// Read the material from stdin.
        #[arg(long)]
        material_stdin: bool,
        /// The material is hex text (whitespace ignored) rather than raw bytes.
        #[arg(long)]
        hex: bool,
        /// The agent generates the material.
        #[arg(long)]
        generate: bool,
    },
    /// One key (never its material).
    Get {
        #[arg(value_name = "ID", value_parser = key_id)]
        id: String,
    },
    /// Every key.
    List,
    /// Delete a key; refused while a volume uses it.
    Delete {
        #[arg(value_name = "ID", value_parser = key_id)]
        id: String,
        #[arg(long)]
        allow_missing: bool,
    },
}

fn key_id(text: &str) -> Result<String, String> {
    let id = text.strip_prefix("cryptoKeys/").unwrap_or(text);
    if id.is_empty() || id.contains('/') {
        return Err(format!("{text:?} is neither an id nor a name like cryptoKeys/ID"));
    }
    Ok(id.to_owned())
}

fn algorithm(text: &str) -> pb::KeyAlgorithm {
    match text {
        "aes-128-gcm" => pb::KeyAlgorithm::Aes128Gcm,
        "aes-256-gcm" => pb::KeyAlgorithm::Aes256Gcm,
        "aes-128-gcm-esp" => pb::KeyAlgorithm::Aes128GcmEsp,
        "aes-256-gcm-esp" => pb::KeyAlgorithm::Aes256GcmEsp,
        _ => pb::KeyAlgorithm::Aes256Xts,
    }
}

fn algorithm_name(value: i32) -> &'static str {
    match pb::KeyAlgorithm::try_from(value) {
        Ok(pb::KeyAlgorithm::Aes256Xts) => "aes-256-xts",
        Ok(pb::KeyAlgorithm::Aes128Gcm) => "aes-128-gcm",
        Ok(pb::KeyAlgorithm::Aes256Gcm) => "aes-256-gcm",
        Ok(pb::KeyAlgorithm::Aes128GcmEsp) => "aes-128-gcm-esp",
        Ok(pb::KeyAlgorithm::Aes256GcmEsp) => "aes-256-gcm-esp",
        _ => "unknown",
    }
}

/// Key material from a file or stdin, raw or hex.
fn read_material(file: Option<&PathBuf>, hex: bool) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    match file {
        Some(path) => bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => _ = std::io::stdin().read_to_end(&mut bytes).context("reading the key from stdin")?,
    }
    if !hex {
        return Ok(bytes);
    }
    let digits: Vec<u8> = bytes.into_iter().filter(|b| !b.is_ascii_whitespace()).collect();
    anyhow::ensure!(digits.len().is_multiple_of(2), "the hex key has an odd number of digits");
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .context("the key is not hex text")
        })
        .collect()
}

fn key_json(k: pb::CryptoKey) -> Value {
    json!({ "name": k.name, "algorithm": algorithm_name(k.algorithm), "size_bits": k.size_bits, "kek_id": k.kek_id,
            "users": k.users, "generation": k.generation })
}

pub async fn crypto(channel: Channel, command: &CryptoCommand) -> anyhow::Result<Value> {
    let mut c = CryptoServiceClient::new(channel);
    Ok(match command {
        CryptoCommand::Capabilities => {
            let found = c.get_crypto_capabilities(pb::GetCryptoCapabilitiesRequest {}).await?.into_inner();
            json!({ "capabilities": found.capabilities.into_iter().map(|c| json!({
                "subject": c.subject, "feature": c.feature, "state": crate::capability_state(c.state),
                "hardware": c.hardware, "detail": c.detail,
            })).collect::<Vec<_>>() })
        }
        CryptoCommand::Key(KeyCommand::Create {
            id,
            algorithm: name,
            material_file,
            material_stdin,
            hex,
            generate,
        }) => {
            let material = if *generate {
                Vec::new()
            } else {
                debug_assert!(*material_stdin || material_file.is_some());
                read_material(material_file.as_ref(), *hex)?
            };
            let key = pb::CryptoKey {
                algorithm: algorithm(name) as i32,
                material,
                generate: *generate,
                ..Default::default()
            };
            key_json(
                c.create_crypto_key(pb::CreateCryptoKeyRequest { key_id: id.clone(), key: Some(key) })
                    .await?
                    .into_inner(),
            )
        }
        CryptoCommand::Key(KeyCommand::Get { id }) => {
            key_json(c.get_crypto_key(pb::GetCryptoKeyRequest { name: format!("cryptoKeys/{id}") }).await?.into_inner())
        }
        CryptoCommand::Key(KeyCommand::List) => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page =
                    c.list_crypto_keys(pb::ListCryptoKeysRequest { page_size: 0, page_token }).await?.into_inner();
                all.extend(page.keys.into_iter().map(key_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            json!({ "keys": all })
        }
        CryptoCommand::Tunnel(TunnelCommand::Create {
            id,
            local,
            remote,
            local_subnet,
            remote_subnet,
            spi_out,
            spi_in,
            key_out,
            key_in,
            device,
            policy,
        }) => {
            let tunnel = pb::IpsecTunnel {
                local_address: local.clone(),
                remote_address: remote.clone(),
                local_subnet: local_subnet.clone(),
                remote_subnet: remote_subnet.clone(),
                spi_out: *spi_out,
                spi_in: *spi_in,
                key_out: key_out.clone(),
                key_in: key_in.clone(),
                device: device.clone(),
                policy: crate::policy_value(policy.as_deref()) as i32,
                ..Default::default()
            };
            let request = pb::CreateIpsecTunnelRequest { tunnel_id: id.clone(), tunnel: Some(tunnel) };
            tunnel_json(c.create_ipsec_tunnel(request).await?.into_inner())
        }
        CryptoCommand::Tunnel(TunnelCommand::Update { id, spi_out, spi_in, key_out, key_in, overlap_seconds }) => {
            let name = format!("ipsecTunnels/{id}");
            let mut t = c.get_ipsec_tunnel(pb::GetIpsecTunnelRequest { name }).await?.into_inner();
            let generation = t.generation;
            t.spi_out = spi_out.unwrap_or(t.spi_out);
            t.spi_in = spi_in.unwrap_or(t.spi_in);
            t.key_out = key_out.clone().unwrap_or(t.key_out);
            t.key_in = key_in.clone().unwrap_or(t.key_in);
            t.rekey_overlap_seconds = overlap_seconds.unwrap_or(t.rekey_overlap_seconds);
            let request = pb::UpdateIpsecTunnelRequest { tunnel: Some(t), expected_generation: generation };
            tunnel_json(c.update_ipsec_tunnel(request).await?.into_inner())
        }
        CryptoCommand::Tunnel(TunnelCommand::Get { id }) => tunnel_json(
            c.get_ipsec_tunnel(pb::GetIpsecTunnelRequest { name: format!("ipsecTunnels/{id}") }).await?.into_inner(),
        ),
        CryptoCommand::Tunnel(TunnelCommand::List) => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page =
                    c.list_ipsec_tunnels(pb::ListIpsecTunnelsRequest { page_size: 0, page_token }).await?.into_inner();
                all.extend(page.tunnels.into_iter().map(tunnel_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            json!({ "tunnels": all })
        }
        CryptoCommand::Tunnel(TunnelCommand::Delete { id, allow_missing }) => {
            let request =
                pb::DeleteIpsecTunnelRequest { name: format!("ipsecTunnels/{id}"), allow_missing: *allow_missing };
            c.delete_ipsec_tunnel(request).await?;
            json!({ "deleted": format!("ipsecTunnels/{id}") })
        }
        CryptoCommand::Key(KeyCommand::Delete { id, allow_missing }) => {
            let request =
                pb::DeleteCryptoKeyRequest { name: format!("cryptoKeys/{id}"), allow_missing: *allow_missing };
            c.delete_crypto_key(request).await?;
            json!({ "deleted": format!("cryptoKeys/{id}") })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_material() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "00ff 10\n2a").unwrap();
        assert_eq!(read_material(Some(&path), true).unwrap(), vec![0, 255, 16, 42]);
        assert_eq!(read_material(Some(&path), false).unwrap(), b"00ff 10\n2a");
        std::fs::write(&path, "0g").unwrap();
        assert!(read_material(Some(&path), true).is_err());
        std::fs::write(&path, "abc").unwrap();
        assert!(read_material(Some(&path), true).is_err());
    }

    #[test]
    fn key_names() {
        assert_eq!(key_id("cryptoKeys/disk").unwrap(), "disk");
        assert_eq!(key_id("disk").unwrap(), "disk");
        assert!(key_id("volumes/disk").is_err());
        assert!(key_id("").is_err());
    }
}
