//! `dpuctl fabric`: the eSwitch data path. `ports` lists the representor ports; `set` changes the fabric
//! settings (uplink, proxy capture device); `attach` / `detach` connect a VF to a pod network; `service-*` manage
//! ClusterIP services balanced in the eSwitch; `stats` shows the installed rules with their counters and offload
//! state.

use clap::{Subcommand, ValueEnum};
use dpu_proto::v1 as pb;
use dpu_proto::v1::fabric_service_client::FabricServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::resource_state;

#[derive(Debug, Subcommand)]
pub enum FabricCommand {
    /// The fabric settings.
    Get,
    /// Change the fabric settings; only the options given change.
    Set {
        /// Physical port leading to the other hosts, e.g. p0; "" to clear.
        #[arg(long)]
        uplink: Option<String>,
        /// Netdev the proxy captures steered traffic on; "" to clear.
        #[arg(long)]
        capture_device: Option<String>,
        /// Collect-metadata vxlan netdev for VXLAN networks; "" clears the vxlan settings.
        #[arg(long)]
        vxlan_device: Option<String>,
        /// This host's tunnel endpoint address (with --vxlan-device).
        #[arg(long, default_value = "")]
        vtep: String,
        /// Another host's tunnel endpoint (repeatable).
        #[arg(long = "vxlan-peer")]
        vxlan_peers: Vec<String>,
        /// VXLAN UDP port; 0 for 4789.
        #[arg(long, default_value_t = 0)]
        vxlan_port: u32,
        /// MAC address pods send service (ClusterIP) traffic to; "" for the default.
        #[arg(long)]
        service_gateway_mac: Option<String>,
    },
    /// The eSwitch ports on this DPU.
    Ports,
    /// Attach a VF to a pod network.
    Attach {
        /// Attachment id, e.g. the pod's name.
        id: String,
        /// The VF, e.g. pf0vf3.
        #[arg(long)]
        port: String,
        #[arg(long)]
        mac: String,
        /// Address with prefix, e.g. 10.0.0.3/24 (repeatable).
        #[arg(long = "ip")]
        ips: Vec<String>,
        /// VLAN of the pod network (or --vni).
        #[arg(long, default_value_t = 0)]
        vlan: u32,
        /// VXLAN network of the pod (or --vlan).
        #[arg(long, default_value_t = 0)]
        vni: u32,
        #[arg(long, value_enum, default_value_t = Mode::Direct)]
        mode: Mode,
        /// Mesh mode: TCP port steered to the proxy (repeatable).
        #[arg(long = "service-port")]
        service_ports: Vec<u32>,
        /// Rate limit in bits per second; 0 for none.
        #[arg(long, default_value_t = 0)]
        rate_limit_bps: u64,
        #[arg(long, default_value = "")]
        spiffe_id: String,
        /// Packet mark; 0 lets the agent choose.
        #[arg(long, default_value_t = 0)]
        mark: u32,
    },
    /// One attachment.
    Show { id: String },
    /// Every attachment.
    List,
    /// Detach: stop forwarding to and from the VF.
    Detach {
        id: String,
        #[arg(long)]
        allow_missing: bool,
    },
    /// Installed rules per port with counters and offload state.
    Stats,
    /// Balance a ClusterIP (VIP:port of a pod network) over backend pods.
    ServiceCreate {
        /// Service id, e.g. the Kubernetes service's name.
        id: String,
        /// The virtual IPv4 address, e.g. 10.96.0.10.
        #[arg(long)]
        vip: String,
        #[arg(long)]
        port: u32,
        #[arg(long, value_enum, default_value_t = ServiceProtocol::Tcp)]
        protocol: ServiceProtocol,
        /// VLAN of the pod network (or --vni).
        #[arg(long, default_value_t = 0)]
        vlan: u32,
        /// VXLAN network of the pods (or --vlan).
        #[arg(long, default_value_t = 0)]
        vni: u32,
        /// Backend pod as IP:PORT, or IP:PORT:unready (repeatable).
        #[arg(long = "backend")]
        backends: Vec<String>,
        #[arg(long, value_enum, default_value_t = Affinity::None)]
        affinity: Affinity,
    },
    /// One service with its status.
    ServiceGet { id: String },
    /// Every service.
    ServiceList,
    /// Replace a service's backends and/or session affinity; only the options given change.
    ServiceUpdate {
        id: String,
        /// Backend pod as IP:PORT, or IP:PORT:unready (repeatable); the list replaces the current one.
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// Remove every backend (instead of --backend).
        #[arg(long)]
        no_backends: bool,
        #[arg(long, value_enum)]
        affinity: Option<Affinity>,
    },
    /// Delete a service: the fabric stops balancing its VIP.
    ServiceDelete {
        id: String,
        #[arg(long)]
        allow_missing: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceProtocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Affinity {
    None,
    ClientIp,
}

impl Affinity {
    fn proto(self) -> pb::SessionAffinity {
        match self {
            Self::None => pb::SessionAffinity::None,
            Self::ClientIp => pb::SessionAffinity::ClientIp,
        }
    }
}

/// `IP:PORT` (ready) or `IP:PORT:unready` / `IP:PORT:ready`.
fn backend(text: &str) -> anyhow::Result<pb::ServiceBackend> {
    let mut parts = text.split(':');
    let (Some(ip), Some(port)) = (parts.next(), parts.next()) else {
        anyhow::bail!("--backend {text:?}: expected IP:PORT or IP:PORT:unready");
    };
    let ready = match parts.next() {
        None | Some("ready") => true,
        Some("unready") => false,
        Some(other) => anyhow::bail!("--backend {text:?}: {other:?} is neither ready nor unready"),
    };
    if parts.next().is_some() {
        anyhow::bail!("--backend {text:?}: expected IP:PORT or IP:PORT:unready");
    }
    let port = port.parse().map_err(|_| anyhow::anyhow!("--backend {text:?}: {port:?} is not a port"))?;
    Ok(pb::ServiceBackend { ip: ip.to_owned(), port, ready })
}

fn service_json(s: pb::Service) -> Value {
    let protocol = match pb::ServiceProtocol::try_from(s.protocol) {
        Ok(pb::ServiceProtocol::Udp) => "udp",
        _ => "tcp",
    };
    let affinity = match pb::SessionAffinity::try_from(s.session_affinity) {
        Ok(pb::SessionAffinity::ClientIp) => "client_ip",
        _ => "none",
    };
    let backends: Vec<Value> =
        s.backends.iter().map(|b| json!({ "ip": b.ip, "port": b.port, "ready": b.ready })).collect();
    json!({ "name": s.name, "vip": s.vip, "port": s.port, "protocol": protocol, "vlan": s.vlan, "vni": s.vni,
            "backends": backends, "session_affinity": affinity, "generation": s.generation,
            "status": resource_state(s.status.as_ref()) })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Direct,
    Mesh,
}

fn fabric_json(f: pb::Fabric) -> Value {
    json!({ "name": f.name, "uplink": f.uplink, "capture_device": f.capture_device,
            "vxlan_device": f.vxlan_device, "vtep": f.vtep, "vxlan_port": f.vxlan_port, "vxlan_peers": f.vxlan_peers,
            "service_gateway_mac": f.service_gateway_mac, "generation": f.generation, "status": resource_state(f.status.as_ref()) })
}

fn attachment_json(a: pb::Attachment) -> Value {
    let mode = match pb::AttachmentMode::try_from(a.mode) {
        Ok(pb::AttachmentMode::Mesh) => "mesh",
        _ => "direct",
    };
    json!({ "name": a.name, "port": a.port, "mac": a.mac, "ips": a.ips, "vlan": a.vlan, "vni": a.vni, "mode": mode,
            "service_ports": a.service_ports, "rate_limit_bps": a.rate_limit_bps, "spiffe_id": a.spiffe_id,
            "mark": a.mark, "generation": a.generation, "status": resource_state(a.status.as_ref()) })
}

fn port_json(p: pb::Port) -> Value {
    json!({ "name": p.name, "state": p.attachment, "port": p.port, "flavour": p.flavour, "netdev": p.netdev,
            "ifindex": p.ifindex, "hw_tc_offload": p.hw_tc_offload, "controller": p.controller, "pf": p.pf,
            "number": p.number, "source": p.source })
}

fn rule_json(port: &str, r: &pb::RuleStats) -> Value {
    let placement = if r.in_hw {
        "in_hw"
    } else if r.skip_sw {
        "skip_sw"
    } else {
        "software"
    };
    json!({ "name": format!("{port}/{}", r.priority), "state": placement, "handle": format!("{:#x}", r.handle),
            "match": r.r#match, "actions": r.actions.join(", "), "packets": r.packets, "bytes": r.bytes,
            "in_hw_count": r.in_hw_count })
}

pub async fn fabric(channel: Channel, command: &FabricCommand) -> anyhow::Result<Value> {
    let mut c = FabricServiceClient::new(channel);
    Ok(match command {
        FabricCommand::Get => {
            fabric_json(c.get_fabric(pb::GetFabricRequest { name: String::new() }).await?.into_inner())
        }
        FabricCommand::Set {
            uplink,
            capture_device,
            vxlan_device,
            vtep,
            vxlan_peers,
            vxlan_port,
            service_gateway_mac,
        } => {
            let mut paths = Vec::new();
            let mut fabric = pb::Fabric::default();
            if let Some(u) = uplink {
                fabric.uplink.clone_from(u);
                paths.push("uplink".to_owned());
            }
            if let Some(d) = capture_device {
                fabric.capture_device.clone_from(d);
                paths.push("capture_device".to_owned());
            }
            if let Some(d) = vxlan_device {
                fabric.vxlan_device.clone_from(d);
                fabric.vtep.clone_from(vtep);
                fabric.vxlan_peers.clone_from(vxlan_peers);
                fabric.vxlan_port = *vxlan_port;
                paths.push("vxlan".to_owned());
            }
            if let Some(mac) = service_gateway_mac {
                fabric.service_gateway_mac.clone_from(mac);
                paths.push("service_gateway_mac".to_owned());
            }
            if paths.is_empty() {
                anyhow::bail!(
                    "nothing to change: give --uplink, --capture-device, --vxlan-device or --service-gateway-mac"
                );
            }
            let request = pb::UpdateFabricRequest {
                fabric: Some(fabric),
                update_mask: Some(prost_types::FieldMask { paths }),
                expected_generation: 0,
            };
            fabric_json(c.update_fabric(request).await?.into_inner())
        }
        FabricCommand::Ports => {
            let ports = c.list_ports(pb::ListPortsRequest {}).await?.into_inner().ports;
            json!({ "ports": ports.into_iter().map(port_json).collect::<Vec<_>>() })
        }
        FabricCommand::Attach {
            id,
            port,
            mac,
            ips,
            vlan,
            vni,
            mode,
            service_ports,
            rate_limit_bps,
            spiffe_id,
            mark,
        } => {
            let mode = match mode {
                Mode::Direct => pb::AttachmentMode::Direct,
                Mode::Mesh => pb::AttachmentMode::Mesh,
            };
            let attachment = pb::Attachment {
                port: port.clone(),
                mac: mac.clone(),
                ips: ips.clone(),
                vlan: *vlan,
                vni: *vni,
                mode: mode.into(),
                service_ports: service_ports.clone(),
                rate_limit_bps: *rate_limit_bps,
                spiffe_id: spiffe_id.clone(),
                mark: *mark,
                ..Default::default()
            };
            let request = pb::CreateAttachmentRequest { attachment_id: id.clone(), attachment: Some(attachment) };
            attachment_json(c.create_attachment(request).await?.into_inner())
        }
        FabricCommand::Show { id } => attachment_json(
            c.get_attachment(pb::GetAttachmentRequest { name: format!("attachments/{id}") }).await?.into_inner(),
        ),
        FabricCommand::List => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page =
                    c.list_attachments(pb::ListAttachmentsRequest { page_size: 0, page_token }).await?.into_inner();
                all.extend(page.attachments.into_iter().map(attachment_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            json!({ "attachments": all })
        }
        FabricCommand::Detach { id, allow_missing } => {
            let name = format!("attachments/{id}");
            c.delete_attachment(pb::DeleteAttachmentRequest { name: name.clone(), allow_missing: *allow_missing })
                .await?;
            json!({ "deleted": name })
        }
        FabricCommand::ServiceCreate { id, vip, port, protocol, vlan, vni, backends, affinity } => {
            let protocol = match protocol {
                ServiceProtocol::Tcp => pb::ServiceProtocol::Tcp,
                ServiceProtocol::Udp => pb::ServiceProtocol::Udp,
            };
            let service = pb::Service {
                vip: vip.clone(),
                port: *port,
                protocol: protocol.into(),
                vlan: *vlan,
                vni: *vni,
                backends: backends.iter().map(|b| backend(b)).collect::<anyhow::Result<_>>()?,
                session_affinity: affinity.proto().into(),
                ..Default::default()
            };
            let request = pb::CreateServiceRequest { service_id: id.clone(), service: Some(service) };
            service_json(c.create_service(request).await?.into_inner())
        }
        FabricCommand::ServiceGet { id } => {
            service_json(c.get_service(pb::GetServiceRequest { name: format!("services/{id}") }).await?.into_inner())
        }
        FabricCommand::ServiceList => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = c.list_services(pb::ListServicesRequest { page_size: 0, page_token }).await?.into_inner();
                all.extend(page.services.into_iter().map(service_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            json!({ "services": all })
        }
        FabricCommand::ServiceUpdate { id, backends, no_backends, affinity } => {
            let mut paths = Vec::new();
            let mut service = pb::Service { name: format!("services/{id}"), ..Default::default() };
            if !backends.is_empty() || *no_backends {
                if !backends.is_empty() && *no_backends {
                    anyhow::bail!("give either --backend or --no-backends");
                }
                service.backends = backends.iter().map(|b| backend(b)).collect::<anyhow::Result<_>>()?;
                paths.push("backends".to_owned());
            }
            if let Some(a) = affinity {
                service.session_affinity = a.proto().into();
                paths.push("session_affinity".to_owned());
            }
            if paths.is_empty() {
                anyhow::bail!("nothing to change: give --backend, --no-backends or --affinity");
            }
            let request = pb::UpdateServiceRequest {
                service: Some(service),
                update_mask: Some(prost_types::FieldMask { paths }),
                expected_generation: 0,
            };
            service_json(c.update_service(request).await?.into_inner())
        }
        FabricCommand::ServiceDelete { id, allow_missing } => {
            let name = format!("services/{id}");
            c.delete_service(pb::DeleteServiceRequest { name: name.clone(), allow_missing: *allow_missing }).await?;
            json!({ "deleted": name })
        }
        FabricCommand::Stats => {
            let stats = c.get_fabric_stats(pb::GetFabricStatsRequest {}).await?.into_inner();
            let rules: Vec<Value> =
                stats.ports.iter().flat_map(|p| p.rules.iter().map(|r| rule_json(&p.port, r))).collect();
            let ports: Vec<Value> = stats
                .ports
                .iter()
                .map(|p| {
                    let packets: u64 = p.rules.iter().map(|r| r.packets).sum();
                    json!({ "name": p.port, "state": p.attachment, "netdev": p.netdev,
                            "hw_tc_offload": p.hw_tc_offload, "rules": p.rules.len(), "packets": packets })
                })
                .collect();
            json!({ "ports": ports, "rules": rules })
        }
    })
}
