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
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Import a key from a file or stdin, or let the agent generate one that never leaves the DPU.
    #[command(group(ArgGroup::new("source").required(true).args(["material_file", "material_stdin", "generate"])))]
    Create {
        /// ID or cryptoKeys/ID.
        #[arg(value_name = "ID", value_parser = key_id)]
        id: String,
        /// aes-256-xts (64 bytes, as cryptsetup's aes-xts-plain64 --key-size 512), aes-128-gcm, aes-256-gcm.
        #[arg(long, value_parser = ["aes-256-xts", "aes-128-gcm", "aes-256-gcm"])]
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
        _ => pb::KeyAlgorithm::Aes256Xts,
    }
}

fn algorithm_name(value: i32) -> &'static str {
    match pb::KeyAlgorithm::try_from(value) {
        Ok(pb::KeyAlgorithm::Aes256Xts) => "aes-256-xts",
        Ok(pb::KeyAlgorithm::Aes128Gcm) => "aes-128-gcm",
        Ok(pb::KeyAlgorithm::Aes256Gcm) => "aes-256-gcm",
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
