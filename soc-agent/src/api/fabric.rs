//! `dpu.v1.FabricService`: the fabric settings, the port inventory and pod attachments as persisted intent, and
//! the installed rules' counters. Ports are addressed by eSwitch identity; the switch is asked for the
//! inventory so attaching an absent VF is refused up front.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use dpu_fabric::model::{
    AttachmentSpec, Backend, FABRIC_ID, FabricSpec, Function, IpNet, MARK_BASE, MacAddr, Mode, PortId, Protocol,
    Segment, ServiceSpec, SessionAffinity, VXLAN_PORT, VxlanSpec,
};
use dpu_fabric::netlink::tc;
use dpu_fabric::ports::Port;
use dpu_fabric::reconcile::SUBSYSTEM;
use dpu_fabric::switch::Switch;
use dpu_intent::reconcile::{ObjectKey, StatusBoard};
use dpu_intent::{Meta, Resource, Store, Stored};
use dpu_proto::v1 as pb;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use super::agent::object_status;
use super::{FieldMask, generation, intent_status, invalid, page, parse_name};

/// Implementation of `FabricService`.
#[derive(Debug)]
pub struct FabricApi {
    store: Store,
    status: StatusBoard,
    switch: Arc<dyn Switch>,
    /// Serializes the conflict checks of attachments with their write.
    writes: Mutex<()>,
}

/// Parses `attachments/{id}` (or a bare id).
fn attachment_id(name: &str) -> Result<&str, Status> {
    parse_name(name, "attachments", "name")
}

/// Parses `services/{id}` (or a bare id).
fn service_id(name: &str) -> Result<&str, Status> {
    parse_name(name, "services", "name")
}

/// A pod network from the vlan / vni pair of a message: exactly one is set.
fn segment_from(object: &str, vlan: u32, vni: u32) -> Result<Segment, Status> {
    match (vlan, vni) {
        (0, 0) => Err(Status::invalid_argument(format!("{object}.vlan: one of vlan and vni is required"))),
        (_, 0) => Ok(Segment::Vlan(
            u16::try_from(vlan)
                .ok()
                .filter(|v| (1..=4094).contains(v))
                .ok_or_else(|| Status::invalid_argument(format!("{object}.vlan: {vlan} is not in 1..=4094")))?,
        )),
        (0, vni) => Ok(Segment::Vxlan(vni)),
        _ => Err(Status::invalid_argument(format!("{object}.vni: give either vlan or vni, not both"))),
    }
}

/// An IPv4 address of a service field; IPv6 is refused as not supported.
fn service_ipv4(field: &str, text: &str) -> Result<std::net::Ipv4Addr, Status> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(_)) => Err(Status::invalid_argument(format!("{field}: IPv6 services are not supported"))),
        Err(_) => Err(Status::invalid_argument(format!("{field}: {text:?} is not an IP address"))),
    }
}

fn port_from(field: &str, port: u32) -> Result<u16, Status> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument(format!("{field}: {port} is not a port")))
}

fn backends_from(backends: &[pb::ServiceBackend]) -> Result<Vec<Backend>, Status> {
    backends
        .iter()
        .map(|b| {
            Ok(Backend {
                ip: service_ipv4("service.backends", &b.ip)?,
                port: port_from("service.backends", b.port)?,
                ready: b.ready,
            })
        })
        .collect()
}

fn affinity_from(value: i32) -> Result<SessionAffinity, Status> {
    match pb::SessionAffinity::try_from(value) {
        Ok(pb::SessionAffinity::Unspecified | pb::SessionAffinity::None) => Ok(SessionAffinity::None),
        Ok(pb::SessionAffinity::ClientIp) => Ok(SessionAffinity::ClientIp),
        Err(_) => Err(Status::invalid_argument(format!("service.session_affinity: unknown value {value}"))),
    }
}

/// Validates an incoming service into the domain type (backends sorted).
fn service_from(s: &pb::Service) -> Result<ServiceSpec, Status> {
    let protocol = match pb::ServiceProtocol::try_from(s.protocol) {
        Ok(pb::ServiceProtocol::Tcp) => Protocol::Tcp,
        Ok(pb::ServiceProtocol::Udp) => Protocol::Udp,
        Ok(pb::ServiceProtocol::Unspecified) => {
            return Err(Status::invalid_argument("service.protocol: TCP or UDP is required"));
        }
        Err(_) => return Err(Status::invalid_argument(format!("service.protocol: unknown value {}", s.protocol))),
    };
    let mut spec = ServiceSpec {
        vip: service_ipv4("service.vip", &s.vip)?,
        port: port_from("service.port", s.port)?,
        protocol,
        segment: segment_from("service", s.vlan, s.vni)?,
        backends: backends_from(&s.backends)?,
        session_affinity: affinity_from(s.session_affinity)?,
    };
    spec.normalize();
    spec.validate().map_err(invalid)?;
    Ok(spec)
}

/// Parses a port (`pf0vf3` or `ports/pf0vf3`).
fn port_id(field: &str, text: &str) -> Result<PortId, Status> {
    text.strip_prefix("ports/")
        .unwrap_or(text)
        .parse()
        .map_err(|e: dpu_fabric::model::BadPortName| Status::invalid_argument(format!("{field}: {e}")))
}

/// Validates an incoming attachment into the domain type (`mark` 0 stays 0 until one is allocated).
fn attachment_from(a: pb::Attachment) -> Result<AttachmentSpec, Status> {
    let port = port_id("attachment.port", &a.port)?;
    let mac: MacAddr = a.mac.parse().map_err(|e| Status::invalid_argument(format!("attachment.mac: {e}")))?;
    let mut ips = BTreeSet::new();
    for ip in &a.ips {
        ips.insert(ip.parse::<IpNet>().map_err(|e| Status::invalid_argument(format!("attachment.ips: {e}")))?);
    }
    let segment = match (a.vlan, a.vni) {
        (0, 0) => return Err(Status::invalid_argument("attachment.vlan: one of vlan and vni is required")),
        (_, 0) => Segment::Vlan(
            u16::try_from(a.vlan)
                .ok()
                .filter(|v| (1..=4094).contains(v))
                .ok_or_else(|| Status::invalid_argument(format!("attachment.vlan: {} is not in 1..=4094", a.vlan)))?,
        ),
        (0, vni) => Segment::Vxlan(vni),
        _ => return Err(Status::invalid_argument("attachment.vni: give either vlan or vni, not both")),
    };
    let mut service_ports = BTreeSet::new();
    for p in &a.service_ports {
        let p = u16::try_from(*p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Status::invalid_argument(format!("attachment.service_ports: {p} is not a TCP port")))?;
        service_ports.insert(p);
    }
    let mode = match pb::AttachmentMode::try_from(a.mode) {
        Ok(pb::AttachmentMode::Unspecified | pb::AttachmentMode::Direct) if service_ports.is_empty() => Mode::Direct,
        Ok(pb::AttachmentMode::Unspecified | pb::AttachmentMode::Direct) => {
            return Err(Status::invalid_argument("attachment.service_ports: only used in mesh mode"));
        }
        Ok(pb::AttachmentMode::Mesh) => Mode::Mesh { service_ports },
        Err(_) => return Err(Status::invalid_argument(format!("attachment.mode: unknown value {}", a.mode))),
    };
    let spec = AttachmentSpec {
        port,
        mac,
        ips,
        segment,
        mode,
        rate_limit_bps: Some(a.rate_limit_bps).filter(|r| *r != 0),
        spiffe_id: a.spiffe_id,
        mark: a.mark,
    };
    // A zero mark is allocated later; validate everything else now.
    AttachmentSpec { mark: spec.mark.max(1), ..spec.clone() }.validate().map_err(invalid)?;
    Ok(spec)
}

/// The vxlan fields of an incoming fabric: all empty means none.
fn vxlan_from(f: &pb::Fabric) -> Result<Option<VxlanSpec>, Status> {
    if f.vxlan_device.is_empty() {
        if !f.vtep.is_empty() || !f.vxlan_peers.is_empty() {
            return Err(Status::invalid_argument("fabric.vxlan_device: required with vtep and vxlan_peers"));
        }
        return Ok(None);
    }
    let ip = |field: &str, text: &str| -> Result<IpAddr, Status> {
        text.parse().map_err(|_| Status::invalid_argument(format!("{field}: {text:?} is not an IP address")))
    };
    let port = match f.vxlan_port {
        0 => VXLAN_PORT,
        p => u16::try_from(p)
            .map_err(|_| Status::invalid_argument(format!("fabric.vxlan_port: {p} is not a UDP port")))?,
    };
    let mut peers = BTreeSet::new();
    for peer in &f.vxlan_peers {
        peers.insert(ip("fabric.vxlan_peers", peer)?);
    }
    Ok(Some(VxlanSpec { device: f.vxlan_device.clone(), local: ip("fabric.vtep", &f.vtep)?, port, peers }))
}

fn ips_overlap(a: &AttachmentSpec, b: &AttachmentSpec) -> Option<IpNet> {
    let theirs: BTreeSet<_> = b.ips.iter().map(|n| n.addr).collect();
    a.ips.iter().find(|n| theirs.contains(&n.addr)).copied()
}

fn flavour(f: Function) -> (&'static str, u32) {
    match f {
        Function::Physical => ("physical", 0),
        Function::HostPf => ("host_pf", 0),
        Function::Vf(n) => ("vf", u32::from(n)),
        Function::Sf(n) => ("sf", n),
    }
}

impl FabricApi {
    pub fn new(store: Store, status: StatusBoard, switch: Arc<dyn Switch>) -> Self {
        Self { store, status, switch, writes: Mutex::new(()) }
    }

    fn status_of(&self, kind: &str, id: &str, meta: &Meta) -> pb::ResourceStatus {
        let key = ObjectKey { kind: kind.into(), id: id.into() };
        object_status(self.status.get(SUBSYSTEM, &key), meta)
    }

    fn fabric_message(&self, stored: Option<Stored<FabricSpec>>) -> pb::Fabric {
        let (spec, meta) = match stored {
            Some(s) => (s.spec, Some(s.meta)),
            None => (FabricSpec::default(), None),
        };
        let vxlan = spec.vxlan.as_ref();
        pb::Fabric {
            name: format!("fabrics/{FABRIC_ID}"),
            uplink: spec.uplink.map(|p| p.to_string()).unwrap_or_default(),
            capture_device: spec.capture_device.clone().unwrap_or_default(),
            vxlan_device: vxlan.map(|v| v.device.clone()).unwrap_or_default(),
            vtep: vxlan.map(|v| v.local.to_string()).unwrap_or_default(),
            vxlan_port: vxlan.map_or(0, |v| u32::from(v.port)),
            vxlan_peers: vxlan.map(|v| v.peers.iter().map(ToString::to_string).collect()).unwrap_or_default(),
            service_gateway_mac: spec.gateway_mac().to_string(),
            generation: meta.as_ref().map_or(0, |m| generation(m.generation)),
            status: Some(match &meta {
                Some(m) => self.status_of(FabricSpec::KIND, FABRIC_ID, m),
                None => pb::ResourceStatus {
                    state: pb::ResourceState::Ready.into(),
                    reason: "defaults: no uplink, no capture device".into(),
                    observed_generation: 0,
                    ..pb::ResourceStatus::default()
                },
            }),
        }
    }

    fn attachment_message(&self, stored: &Stored<AttachmentSpec>) -> pb::Attachment {
        let s = &stored.spec;
        let (mode, service_ports) = match &s.mode {
            Mode::Direct => (pb::AttachmentMode::Direct, Vec::new()),
            Mode::Mesh { service_ports } => {
                (pb::AttachmentMode::Mesh, service_ports.iter().map(|p| u32::from(*p)).collect())
            }
        };
        let (vlan, vni) = match s.segment {
            Segment::Vlan(id) => (u32::from(id), 0),
            Segment::Vxlan(vni) => (0, vni),
        };
        pb::Attachment {
            name: format!("attachments/{}", stored.id),
            port: s.port.to_string(),
            mac: s.mac.to_string(),
            ips: s.ips.iter().map(ToString::to_string).collect(),
            vlan,
            vni,
            mode: mode.into(),
            service_ports,
            rate_limit_bps: s.rate_limit_bps.unwrap_or(0),
            spiffe_id: s.spiffe_id.clone(),
            mark: s.mark,
            generation: generation(stored.meta.generation),
            status: Some(self.status_of(AttachmentSpec::KIND, &stored.id, &stored.meta)),
        }
    }

    fn service_message(&self, stored: &Stored<ServiceSpec>) -> pb::Service {
        let s = &stored.spec;
        let (vlan, vni) = match s.segment {
            Segment::Vlan(id) => (u32::from(id), 0),
            Segment::Vxlan(vni) => (0, vni),
        };
        let protocol = match s.protocol {
            Protocol::Tcp => pb::ServiceProtocol::Tcp,
            Protocol::Udp => pb::ServiceProtocol::Udp,
        };
        let affinity = match s.session_affinity {
            SessionAffinity::None => pb::SessionAffinity::None,
            SessionAffinity::ClientIp => pb::SessionAffinity::ClientIp,
        };
        pb::Service {
            name: format!("services/{}", stored.id),
            vip: s.vip.to_string(),
            port: u32::from(s.port),
            protocol: protocol.into(),
            vlan,
            vni,
            backends: s
                .backends
                .iter()
                .map(|b| pb::ServiceBackend { ip: b.ip.to_string(), port: u32::from(b.port), ready: b.ready })
                .collect(),
            session_affinity: affinity.into(),
            generation: generation(stored.meta.generation),
            status: Some(self.status_of(ServiceSpec::KIND, &stored.id, &stored.meta)),
        }
    }

    /// Refuses a service whose VIP, port and protocol another service of the same network has.
    fn check_service(&self, id: &str, spec: &ServiceSpec) -> Result<(), Status> {
        for other in self.store.list_all::<ServiceSpec>().map_err(intent_status)? {
            let o = &other.spec;
            if other.id != id
                && o.segment == spec.segment
                && (o.vip, o.port, o.protocol) == (spec.vip, spec.port, spec.protocol)
            {
                return Err(Status::already_exists(format!(
                    "{}:{}/{} on {} is used by services/{}",
                    spec.vip, spec.port, spec.protocol, spec.segment, other.id
                )));
            }
        }
        Ok(())
    }

    fn fabric(&self) -> Result<Option<Stored<FabricSpec>>, Status> {
        match self.store.get::<FabricSpec>(FABRIC_ID) {
            Ok(f) => Ok(Some(f)),
            Err(dpu_intent::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(intent_status(e)),
        }
    }

    /// The inventory, read on the blocking pool (sysfs and ethtool netlink).
    async fn ports(&self) -> Result<Vec<Port>, Status> {
        let switch = self.switch.clone();
        tokio::task::spawn_blocking(move || switch.ports())
            .await
            .map_err(|e| Status::internal(format!("reading the port inventory panicked: {e}")))?
            .map_err(|e| Status::unavailable(format!("reading the port inventory: {e}")))
    }

    /// Checks a new attachment against the inventory, the fabric and every other attachment.
    async fn check_new(&self, id: &str, spec: &AttachmentSpec) -> Result<(), Status> {
        let ports = self.ports().await?;
        if !ports.iter().any(|p| p.id == spec.port) {
            return Err(Status::not_found(format!("port {} is not present on this DPU", spec.port)));
        }
        let fabric = self.fabric()?.map(|f| f.spec).unwrap_or_default();
        if matches!(spec.mode, Mode::Mesh { .. }) && fabric.capture_device.is_none() {
            return Err(Status::failed_precondition(
                "mesh mode needs the fabric's capture_device; set it with UpdateFabric first",
            ));
        }
        if matches!(spec.segment, Segment::Vxlan(_)) && fabric.vxlan.is_none() {
            return Err(Status::failed_precondition(
                "VXLAN networks need the fabric's vxlan settings; set them with UpdateFabric first",
            ));
        }
        for other in self.store.list_all::<AttachmentSpec>().map_err(intent_status)? {
            if other.id == id {
                continue;
            }
            let o = &other.spec;
            if o.port == spec.port {
                return Err(Status::failed_precondition(format!(
                    "port {} is already attached as attachments/{}",
                    spec.port, other.id
                )));
            }
            if o.segment == spec.segment && o.mac == spec.mac {
                return Err(Status::already_exists(format!(
                    "MAC {} is used by attachments/{} on {}",
                    spec.mac, other.id, spec.segment
                )));
            }
            if o.segment == spec.segment
                && let Some(ip) = ips_overlap(spec, o)
            {
                return Err(Status::already_exists(format!(
                    "IP {} is used by attachments/{} on {}",
                    ip.addr, other.id, spec.segment
                )));
            }
            if spec.mark != 0 && o.mark == spec.mark {
                return Err(Status::already_exists(format!(
                    "mark {:#x} is used by attachments/{}",
                    spec.mark, other.id
                )));
            }
        }
        Ok(())
    }

    fn free_mark(&self) -> Result<u32, Status> {
        let used: BTreeSet<u32> =
            self.store.list_all::<AttachmentSpec>().map_err(intent_status)?.iter().map(|a| a.spec.mark).collect();
        (MARK_BASE..=MARK_BASE + 0xffff)
            .find(|m| !used.contains(m))
            .ok_or_else(|| Status::resource_exhausted("no free packet mark"))
    }
}

fn rule_stats(f: &tc::Filter) -> pb::RuleStats {
    pb::RuleStats {
        priority: u32::from(f.id.prio),
        protocol: u32::from(f.id.protocol),
        handle: f.id.handle,
        r#match: f.keys.to_string(),
        actions: f.actions.iter().map(ToString::to_string).collect(),
        in_hw: f.flags & tc::IN_HW != 0,
        in_hw_count: f.in_hw_count.unwrap_or(0),
        skip_sw: f.flags & tc::SKIP_SW != 0,
        skip_hw: f.flags & tc::SKIP_HW != 0,
        packets: f.packets,
        bytes: f.bytes,
    }
}

#[tonic::async_trait]
impl pb::fabric_service_server::FabricService for FabricApi {
    async fn get_fabric(&self, r: Request<pb::GetFabricRequest>) -> Result<Response<pb::Fabric>, Status> {
        let name = &r.get_ref().name;
        if !name.is_empty() && name != "fabrics/default" && name != FABRIC_ID {
            return Err(Status::not_found(format!("{name} does not exist (the one fabric is fabrics/default)")));
        }
        Ok(Response::new(self.fabric_message(self.fabric()?)))
    }

    async fn update_fabric(&self, r: Request<pb::UpdateFabricRequest>) -> Result<Response<pb::Fabric>, Status> {
        let r = r.into_inner();
        let f = r.fabric.ok_or_else(|| Status::invalid_argument("fabric: required"))?;
        let mask = FieldMask::parse(r.update_mask, &["uplink", "capture_device", "vxlan", "service_gateway_mac"])?;
        let gateway = match f.service_gateway_mac.as_str() {
            "" => None,
            text => Some(
                text.parse::<MacAddr>()
                    .map_err(|e| Status::invalid_argument(format!("fabric.service_gateway_mac: {e}")))?,
            ),
        };
        let vxlan = vxlan_from(&f)?;
        let uplink = match f.uplink.as_str() {
            "" => None,
            text => Some(port_id("fabric.uplink", text)?),
        };
        let capture = Some(f.capture_device).filter(|c| !c.is_empty());
        let expected = u64::try_from(r.expected_generation).ok().filter(|g| *g != 0);
        let _guard = self.writes.lock().await;
        let current = self.fabric()?;
        let mut spec = current.as_ref().map(|c| c.spec.clone()).unwrap_or_default();
        if mask.covers("uplink") {
            spec.uplink = uplink;
        }
        if mask.covers("capture_device") {
            spec.capture_device = capture;
        }
        if mask.covers("vxlan") {
            spec.vxlan = vxlan;
        }
        if mask.covers("service_gateway_mac") {
            spec.service_gateway_mac = gateway;
        }
        spec.validate().map_err(invalid)?;
        let attachments = self.store.list_all::<AttachmentSpec>().map_err(intent_status)?;
        if spec.capture_device.is_none()
            && let Some(a) = attachments.iter().find(|a| matches!(a.spec.mode, Mode::Mesh { .. }))
        {
            return Err(Status::failed_precondition(format!(
                "attachments/{} is in mesh mode and needs the capture device",
                a.id
            )));
        }
        if spec.vxlan.is_none()
            && let Some(a) = attachments.iter().find(|a| matches!(a.spec.segment, Segment::Vxlan(_)))
        {
            return Err(Status::failed_precondition(format!(
                "attachments/{} is on a VXLAN network and needs the vxlan settings",
                a.id
            )));
        }
        let stored = match current {
            None if expected.is_some() => {
                return Err(Status::aborted("the fabric was never written; expected_generation must be 0"));
            }
            None => self.store.create(FABRIC_ID, spec).map(dpu_intent::Created::into_stored),
            Some(c) => self.store.update(FABRIC_ID, spec, Some(expected.unwrap_or(c.meta.generation))),
        }
        .map_err(intent_status)?;
        tracing::info!(generation = stored.meta.generation, "fabric settings updated");
        Ok(Response::new(self.fabric_message(Some(stored))))
    }

    async fn list_ports(&self, _: Request<pb::ListPortsRequest>) -> Result<Response<pb::ListPortsResponse>, Status> {
        let ports = self.ports().await?;
        let attachments = self.store.list_all::<AttachmentSpec>().map_err(intent_status)?;
        let ports = ports
            .into_iter()
            .map(|p| {
                let (flavour, number) = flavour(p.id.function);
                pb::Port {
                    name: format!("ports/{}", p.id),
                    port: p.id.to_string(),
                    flavour: flavour.into(),
                    controller: p.id.controller,
                    pf: u32::from(p.id.pf),
                    number,
                    netdev: p.netdev,
                    ifindex: p.ifindex,
                    hw_tc_offload: p.hw_tc_offload,
                    attachment: attachments
                        .iter()
                        .find(|a| a.spec.port == p.id)
                        .map(|a| format!("attachments/{}", a.id))
                        .unwrap_or_default(),
                    source: p.source.as_str().into(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListPortsResponse { ports }))
    }

    async fn create_attachment(
        &self,
        r: Request<pb::CreateAttachmentRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        let r = r.into_inner();
        dpu_intent::validate_id(&r.attachment_id)
            .map_err(|e| Status::invalid_argument(format!("attachment_id: {e}")))?;
        let mut spec = attachment_from(r.attachment.ok_or_else(|| Status::invalid_argument("attachment: required"))?)?;
        let _guard = self.writes.lock().await;
        if let Ok(existing) = self.store.get::<AttachmentSpec>(&r.attachment_id) {
            let same = AttachmentSpec { mark: if spec.mark == 0 { existing.spec.mark } else { spec.mark }, ..spec };
            return if same == existing.spec {
                Ok(Response::new(self.attachment_message(&existing)))
            } else {
                Err(Status::already_exists(format!("attachments/{} exists with a different spec", r.attachment_id)))
            };
        }
        self.check_new(&r.attachment_id, &spec).await?;
        if spec.mark == 0 {
            spec.mark = self.free_mark()?;
        }
        spec.validate().map_err(invalid)?;
        let created = self.store.create(&r.attachment_id, spec).map_err(intent_status)?.into_stored();
        tracing::info!(
            attachment = %created.id,
            port = %created.spec.port,
            segment = %created.spec.segment,
            mark = created.spec.mark,
            "attachment created"
        );
        Ok(Response::new(self.attachment_message(&created)))
    }

    async fn get_attachment(&self, r: Request<pb::GetAttachmentRequest>) -> Result<Response<pb::Attachment>, Status> {
        let id = attachment_id(&r.get_ref().name)?;
        let stored = self.store.get::<AttachmentSpec>(id).map_err(intent_status)?;
        Ok(Response::new(self.attachment_message(&stored)))
    }

    async fn list_attachments(
        &self,
        r: Request<pb::ListAttachmentsRequest>,
    ) -> Result<Response<pb::ListAttachmentsResponse>, Status> {
        let r = r.into_inner();
        let (size, token) = page(r.page_size, &r.page_token)?;
        let page = self.store.list::<AttachmentSpec>(size, token).map_err(intent_status)?;
        Ok(Response::new(pb::ListAttachmentsResponse {
            attachments: page.items.iter().map(|a| self.attachment_message(a)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_attachment(
        &self,
        r: Request<pb::DeleteAttachmentRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        let id = attachment_id(&r.name)?;
        let _guard = self.writes.lock().await;
        if let Some(deleted) = self.store.delete::<AttachmentSpec>(id, r.allow_missing).map_err(intent_status)? {
            tracing::info!(attachment = %deleted.id, port = %deleted.spec.port, "attachment deleted");
        }
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_service(&self, r: Request<pb::CreateServiceRequest>) -> Result<Response<pb::Service>, Status> {
        let r = r.into_inner();
        dpu_intent::validate_id(&r.service_id).map_err(|e| Status::invalid_argument(format!("service_id: {e}")))?;
        let spec = service_from(r.service.as_ref().ok_or_else(|| Status::invalid_argument("service: required"))?)?;
        let _guard = self.writes.lock().await;
        if let Ok(existing) = self.store.get::<ServiceSpec>(&r.service_id) {
            return if existing.spec == spec {
                Ok(Response::new(self.service_message(&existing)))
            } else {
                Err(Status::already_exists(format!("services/{} exists with a different spec", r.service_id)))
            };
        }
        self.check_service(&r.service_id, &spec)?;
        let created = self.store.create(&r.service_id, spec).map_err(intent_status)?.into_stored();
        tracing::info!(
            service = %created.id,
            vip = %created.spec.vip,
            port = created.spec.port,
            protocol = %created.spec.protocol,
            segment = %created.spec.segment,
            backends = created.spec.backends.len(),
            "service created"
        );
        Ok(Response::new(self.service_message(&created)))
    }

    async fn get_service(&self, r: Request<pb::GetServiceRequest>) -> Result<Response<pb::Service>, Status> {
        let id = service_id(&r.get_ref().name)?;
        let stored = self.store.get::<ServiceSpec>(id).map_err(intent_status)?;
        Ok(Response::new(self.service_message(&stored)))
    }

    async fn list_services(
        &self,
        r: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let r = r.into_inner();
        let (size, token) = page(r.page_size, &r.page_token)?;
        let page = self.store.list::<ServiceSpec>(size, token).map_err(intent_status)?;
        Ok(Response::new(pb::ListServicesResponse {
            services: page.items.iter().map(|s| self.service_message(s)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn update_service(&self, r: Request<pb::UpdateServiceRequest>) -> Result<Response<pb::Service>, Status> {
        let r = r.into_inner();
        let s = r.service.ok_or_else(|| Status::invalid_argument("service: required"))?;
        let id = service_id(&s.name)?.to_owned();
        let mask = FieldMask::parse(r.update_mask, &["backends", "session_affinity"])?;
        let backends = if mask.covers("backends") { Some(backends_from(&s.backends)?) } else { None };
        let affinity = if mask.covers("session_affinity") { Some(affinity_from(s.session_affinity)?) } else { None };
        let expected = u64::try_from(r.expected_generation).ok().filter(|g| *g != 0);
        let _guard = self.writes.lock().await;
        let current = self.store.get::<ServiceSpec>(&id).map_err(intent_status)?;
        let mut spec = current.spec.clone();
        if let Some(b) = backends {
            spec.backends = b;
        }
        if let Some(a) = affinity {
            spec.session_affinity = a;
        }
        spec.normalize();
        spec.validate().map_err(invalid)?;
        if spec == current.spec && expected.is_none_or(|g| g == current.meta.generation) {
            return Ok(Response::new(self.service_message(&current)));
        }
        let stored =
            self.store.update(&id, spec, Some(expected.unwrap_or(current.meta.generation))).map_err(intent_status)?;
        tracing::info!(
            service = %stored.id,
            generation = stored.meta.generation,
            ready = stored.spec.backends.iter().filter(|b| b.ready).count(),
            backends = stored.spec.backends.len(),
            "service updated"
        );
        Ok(Response::new(self.service_message(&stored)))
    }

    async fn delete_service(
        &self,
        r: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        let id = service_id(&r.name)?;
        let _guard = self.writes.lock().await;
        if let Some(deleted) = self.store.delete::<ServiceSpec>(id, r.allow_missing).map_err(intent_status)? {
            tracing::info!(service = %deleted.id, vip = %deleted.spec.vip, "service deleted");
        }
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn get_fabric_stats(
        &self,
        _: Request<pb::GetFabricStatsRequest>,
    ) -> Result<Response<pb::FabricStats>, Status> {
        let attachments = self.store.list_all::<AttachmentSpec>().map_err(intent_status)?;
        let switch = self.switch.clone();
        let collected = tokio::task::spawn_blocking(move || -> Result<Vec<(Port, Vec<tc::Filter>)>, String> {
            let mut out = Vec::new();
            let ports = switch.ports().map_err(|e| e.to_string())?;
            let links = switch.links().map_err(|e| e.to_string())?;
            for port in ports {
                let rules = match switch.has_clsact(&links, &port.netdev) {
                    Ok(true) => switch.rules(&links, &port.netdev).map_err(|e| e.to_string())?,
                    Ok(false) => Vec::new(),
                    Err(e) => return Err(e.to_string()),
                };
                out.push((port, rules));
            }
            Ok(out)
        })
        .await
        .map_err(|e| Status::internal(format!("reading fabric counters panicked: {e}")))?
        .map_err(|e| Status::unavailable(format!("reading fabric counters: {e}")))?;
        let ports = collected
            .into_iter()
            .map(|(port, rules)| pb::PortStats {
                port: port.id.to_string(),
                netdev: port.netdev,
                hw_tc_offload: port.hw_tc_offload,
                attachment: attachments
                    .iter()
                    .find(|a| a.spec.port == port.id)
                    .map(|a| format!("attachments/{}", a.id))
                    .unwrap_or_default(),
                rules: rules.iter().map(rule_stats).collect(),
            })
            .collect();
        Ok(Response::new(pb::FabricStats { ports }))
    }
}

#[cfg(test)]
mod tests {
    use dpu_fabric::switch::SimSwitch;
    use pb::fabric_service_server::FabricService as _;

    use super::*;

    fn api() -> (tempfile::TempDir, FabricApi, Arc<SimSwitch>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sim = Arc::new(SimSwitch::new());
        sim.add_device("p0", Some("p0".parse().unwrap()), false);
        for vf in 1..=3 {
            sim.add_device(&format!("pf0vf{vf}"), Some(PortId::vf(0, vf)), false);
        }
        let api = FabricApi::new(store, StatusBoard::new(), sim.clone());
        (dir, api, sim)
    }

    fn attachment(port: &str, mac: &str, ip: &str) -> pb::Attachment {
        pb::Attachment {
            port: port.into(),
            mac: mac.into(),
            ips: vec![ip.into()],
            vlan: 100,
            spiffe_id: "spiffe://cluster.local/ns/default/sa/web".into(),
            ..pb::Attachment::default()
        }
    }

    async fn create(api: &FabricApi, id: &str, a: pb::Attachment) -> Result<pb::Attachment, Status> {
        let r = pb::CreateAttachmentRequest { attachment_id: id.into(), attachment: Some(a) };
        api.create_attachment(Request::new(r)).await.map(Response::into_inner)
    }

    #[tokio::test]
    async fn attach_validates_and_refuses_conflicts() {
        let (_dir, api, _sim) = api();
        let a = create(&api, "web", attachment("pf0vf1", "02:00:00:00:00:01", "10.0.0.1/24")).await.unwrap();
        assert_eq!((a.name.as_str(), a.port.as_str(), a.mark), ("attachments/web", "pf0vf1", MARK_BASE));
        assert_eq!(a.status.unwrap().state, i32::from(pb::ResourceState::Pending));
        // Idempotent: the same spec returns the existing attachment with its mark.
        let again = create(&api, "web", attachment("ports/pf0vf1", "02:00:00:00:00:01", "10.0.0.1/24")).await;
        assert_eq!(again.unwrap().mark, MARK_BASE);
        let code = |r: Result<pb::Attachment, Status>| r.unwrap_err().code();
        let c = |port: &str, mac: &str, ip: &str| attachment(port, mac, ip);
        assert_eq!(
            code(create(&api, "web", c("pf0vf2", "02:00:00:00:00:01", "10.0.0.1/24")).await),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            code(create(&api, "db", c("pf0vf9", "02:00:00:00:00:09", "10.0.0.9/24")).await),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(create(&api, "db", c("pf0vf1", "02:00:00:00:00:02", "10.0.0.2/24")).await),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(create(&api, "db", c("pf0vf2", "02:00:00:00:00:01", "10.0.0.2/24")).await),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            code(create(&api, "db", c("pf0vf2", "02:00:00:00:00:02", "10.0.0.1/32")).await),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            code(create(&api, "db", c("eth0", "02:00:00:00:00:02", "10.0.0.2/24")).await),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(create(&api, "db", c("p0", "02:00:00:00:00:02", "10.0.0.2/24")).await),
            tonic::Code::InvalidArgument
        );
        let mut mesh = c("pf0vf2", "02:00:00:00:00:02", "10.0.0.2/24");
        mesh.mode = pb::AttachmentMode::Mesh.into();
        mesh.service_ports = vec![80];
        assert_eq!(code(create(&api, "db", mesh.clone()).await), tonic::Code::FailedPrecondition, "no capture device");
        let update = pb::UpdateFabricRequest {
            fabric: Some(pb::Fabric { uplink: "p0".into(), capture_device: "proxy0".into(), ..pb::Fabric::default() }),
            ..pb::UpdateFabricRequest::default()
        };
        let fabric = api.update_fabric(Request::new(update)).await.unwrap().into_inner();
        assert_eq!((fabric.uplink.as_str(), fabric.generation), ("p0", 1));
        let db = create(&api, "db", mesh).await.unwrap();
        assert_eq!(db.mark, MARK_BASE + 1);
        assert_eq!(db.service_ports, vec![80]);
        // VXLAN networks need the fabric's vxlan settings.
        let mut vx = c("pf0vf3", "02:00:00:00:00:07", "10.200.0.7/24");
        (vx.vlan, vx.vni) = (0, 5000);
        assert_eq!(code(create(&api, "vx", vx.clone()).await), tonic::Code::FailedPrecondition);
        let update = pb::UpdateFabricRequest {
            fabric: Some(pb::Fabric {
                vxlan_device: "vxlan0".into(),
                vtep: "192.168.50.1".into(),
                vxlan_peers: vec!["192.168.50.2".into()],
                ..pb::Fabric::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["vxlan".into()] }),
            ..pb::UpdateFabricRequest::default()
        };
        let fabric = api.update_fabric(Request::new(update)).await.unwrap().into_inner();
        assert_eq!((fabric.vxlan_port, fabric.uplink.as_str()), (4789, "p0"), "the mask kept the uplink");
        let created = create(&api, "vx", vx).await.unwrap();
        assert_eq!((created.vni, created.vlan), (5000, 0));
        let clear = pb::UpdateFabricRequest {
            fabric: Some(pb::Fabric::default()),
            update_mask: Some(prost_types::FieldMask { paths: vec!["vxlan".into()] }),
            ..pb::UpdateFabricRequest::default()
        };
        assert_eq!(api.update_fabric(Request::new(clear)).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
        let delete = pb::DeleteAttachmentRequest { name: "vx".into(), allow_missing: false };
        api.delete_attachment(Request::new(delete)).await.unwrap();
        // The same MAC on another VLAN is another network.
        let mut other = c("pf0vf3", "02:00:00:00:00:01", "10.0.0.1/24");
        other.vlan = 200;
        create(&api, "other", other).await.unwrap();

        let ports = api.list_ports(Request::new(pb::ListPortsRequest {})).await.unwrap().into_inner().ports;
        let vf1 = ports.iter().find(|p| p.port == "pf0vf1").unwrap();
        assert_eq!((vf1.flavour.as_str(), vf1.number, vf1.attachment.as_str()), ("vf", 1, "attachments/web"));
        let delete = pb::DeleteAttachmentRequest { name: "attachments/web".into(), allow_missing: false };
        api.delete_attachment(Request::new(delete.clone())).await.unwrap();
        assert_eq!(api.delete_attachment(Request::new(delete)).await.unwrap_err().code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn stats_report_rules_and_placement() {
        let (_dir, api, sim) = api();
        create(&api, "web", attachment("pf0vf1", "02:00:00:00:00:01", "10.0.0.1/24")).await.unwrap();
        let reconciler = dpu_fabric::reconcile::FabricReconciler::new(sim.clone());
        dpu_intent::reconcile::Reconciler::reconcile(&reconciler, &api.store).await.unwrap();
        let stats = api.get_fabric_stats(Request::new(pb::GetFabricStatsRequest {})).await.unwrap().into_inner();
        let vf1 = stats.ports.iter().find(|p| p.port == "pf0vf1").unwrap();
        assert_eq!(vf1.attachment, "attachments/web");
        assert!(!vf1.rules.is_empty());
        assert!(vf1.rules.iter().all(|r| r.skip_hw && !r.in_hw));
        let last = vf1.rules.iter().max_by_key(|r| r.priority).unwrap();
        assert_eq!((last.r#match.as_str(), last.actions.as_slice()), ("all", &["drop".to_owned()][..]));
    }

    #[test]
    fn conversion_errors_name_the_field() {
        let base = attachment("pf0vf1", "02:00:00:00:00:01", "10.0.0.1/24");
        let field = |a: pb::Attachment| attachment_from(a).unwrap_err().message().split(':').next().unwrap().to_owned();
        assert_eq!(field(pb::Attachment { mac: "zz".into(), ..base.clone() }), "attachment.mac");
        assert_eq!(field(pb::Attachment { vlan: 0, ..base.clone() }), "attachment.vlan");
        assert_eq!(field(pb::Attachment { vni: 7, ..base.clone() }), "attachment.vni");
        assert_eq!(field(pb::Attachment { vlan: 0, vni: 1 << 24, ..base.clone() }), "attachment.vni");
        assert_eq!(field(pb::Attachment { ips: vec!["10.0.0.1/40".into()], ..base.clone() }), "attachment.ips");
        assert_eq!(field(pb::Attachment { service_ports: vec![80], ..base.clone() }), "attachment.service_ports");
        assert_eq!(field(pb::Attachment { mode: 9, ..base.clone() }), "attachment.mode");
        assert_eq!(field(pb::Attachment { spiffe_id: "nope".into(), ..base.clone() }), "attachment.spiffe_id");
        assert_eq!(field(pb::Attachment { rate_limit_bps: 5, ..base }), "attachment.rate_limit_bps");
    }

    fn svc(vip: &str, backends: &[(&str, u32, bool)]) -> pb::Service {
        pb::Service {
            vip: vip.into(),
            port: 80,
            protocol: pb::ServiceProtocol::Tcp.into(),
            vlan: 100,
            backends: backends
                .iter()
                .map(|(ip, port, ready)| pb::ServiceBackend { ip: (*ip).into(), port: *port, ready: *ready })
                .collect(),
            ..pb::Service::default()
        }
    }

    async fn create_svc(api: &FabricApi, id: &str, s: pb::Service) -> Result<pb::Service, Status> {
        let r = pb::CreateServiceRequest { service_id: id.into(), service: Some(s) };
        api.create_service(Request::new(r)).await.map(Response::into_inner)
    }

    #[tokio::test]
    async fn services_are_validated_persisted_and_updated() {
        let (_dir, api, sim) = api();
        create(&api, "b1", attachment("pf0vf1", "02:00:00:00:00:01", "10.100.0.1/24")).await.unwrap();
        let web = create_svc(&api, "web", svc("10.96.0.10", &[("10.100.0.5", 80, true), ("10.100.0.1", 80, true)]))
            .await
            .unwrap();
        assert_eq!(web.name, "services/web");
        assert_eq!(web.backends[0].ip, "10.100.0.1", "backends are kept sorted");
        assert_eq!(web.status.unwrap().state, i32::from(pb::ResourceState::Pending));
        // Idempotent create; a conflicting VIP:port/protocol on the same network is refused.
        let again = create_svc(&api, "web", svc("10.96.0.10", &[("10.100.0.1", 80, true), ("10.100.0.5", 80, true)]));
        assert_eq!(again.await.unwrap().generation, 1);
        let code = |r: Result<pb::Service, Status>| r.unwrap_err();
        let dup = code(create_svc(&api, "web2", svc("10.96.0.10", &[])).await);
        assert_eq!(dup.code(), tonic::Code::AlreadyExists, "{dup:?}");
        let mut other_net = svc("10.96.0.10", &[]);
        other_net.vlan = 200;
        create_svc(&api, "web3", other_net).await.unwrap();
        let field = |s: Status| (s.code(), s.message().split(':').next().unwrap().to_owned());
        let bad = |f: fn(&mut pb::Service)| {
            let mut s = svc("10.96.0.20", &[("10.100.0.1", 80, true)]);
            f(&mut s);
            s
        };
        for (service, expected) in [
            (bad(|s| s.vip = "fd00::10".into()), "service.vip"),
            (bad(|s| s.vip = "nope".into()), "service.vip"),
            (bad(|s| s.port = 0), "service.port"),
            (bad(|s| s.protocol = 0), "service.protocol"),
            (bad(|s| s.vni = 5), "service.vni"),
            (bad(|s| s.vlan = 0), "service.vlan"),
            (bad(|s| s.backends[0].port = 70_000), "service.backends"),
            (bad(|s| s.backends.push(s.backends[0].clone())), "service.backends"),
            (bad(|s| s.session_affinity = 9), "service.session_affinity"),
        ] {
            let e = code(create_svc(&api, "x", service).await);
            assert_eq!(field(e), (tonic::Code::InvalidArgument, expected.to_owned()));
        }
        // The reconciler reports the backend that is no pod of the network here.
        let reconciler = dpu_fabric::reconcile::FabricReconciler::new(sim.clone());
        let pass = dpu_intent::reconcile::Reconciler::reconcile(&reconciler, &api.store).await.unwrap();
        let status = pass.statuses.iter().find(|(k, _)| k.kind == "services" && k.id == "web").unwrap();
        assert!(status.1.reason.contains("10.100.0.5:80"), "{}", status.1.reason);
        // Update: readiness and affinity; the network and VIP are not in the mask.
        let mut change = svc("10.96.0.99", &[("10.100.0.1", 80, false)]);
        change.name = "services/web".into();
        change.session_affinity = pb::SessionAffinity::ClientIp.into();
        let request = pb::UpdateServiceRequest { service: Some(change.clone()), ..Default::default() };
        let updated = api.update_service(Request::new(request)).await.unwrap().into_inner();
        assert_eq!((updated.vip.as_str(), updated.generation), ("10.96.0.10", 2));
        assert_eq!((updated.backends.len(), updated.backends[0].ready), (1, false));
        assert_eq!(updated.session_affinity, i32::from(pb::SessionAffinity::ClientIp));
        let mask = |paths: &[&str]| Some(prost_types::FieldMask { paths: paths.iter().map(|p| (*p).into()).collect() });
        let request = pb::UpdateServiceRequest {
            service: Some(change.clone()),
            update_mask: mask(&["vip"]),
            ..Default::default()
        };
        assert_eq!(api.update_service(Request::new(request)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        let stale = pb::UpdateServiceRequest { service: Some(change), expected_generation: 1, ..Default::default() };
        assert_ne!(api.update_service(Request::new(stale)).await.unwrap_err().code(), tonic::Code::Ok);
        let list = api.list_services(Request::new(pb::ListServicesRequest::default())).await.unwrap().into_inner();
        assert_eq!(list.services.len(), 2);
        let delete = pb::DeleteServiceRequest { name: "services/web".into(), allow_missing: false };
        api.delete_service(Request::new(delete.clone())).await.unwrap();
        assert_eq!(api.delete_service(Request::new(delete)).await.unwrap_err().code(), tonic::Code::NotFound);
        let get = pb::GetServiceRequest { name: "services/web".into() };
        assert_eq!(api.get_service(Request::new(get)).await.unwrap_err().code(), tonic::Code::NotFound);
        // The fabric reports its service gateway MAC and accepts another one.
        let fabric = api.get_fabric(Request::new(pb::GetFabricRequest::default())).await.unwrap().into_inner();
        assert_eq!(fabric.service_gateway_mac, dpu_fabric::model::DEFAULT_SERVICE_GATEWAY_MAC.to_string());
        let update = pb::UpdateFabricRequest {
            fabric: Some(pb::Fabric { service_gateway_mac: "02:00:00:00:fe:01".into(), ..pb::Fabric::default() }),
            update_mask: mask(&["service_gateway_mac"]),
            ..pb::UpdateFabricRequest::default()
        };
        let fabric = api.update_fabric(Request::new(update)).await.unwrap().into_inner();
        assert_eq!(fabric.service_gateway_mac, "02:00:00:00:fe:01");
        let update = pb::UpdateFabricRequest {
            fabric: Some(pb::Fabric { service_gateway_mac: "ff:ff:ff:ff:ff:ff".into(), ..pb::Fabric::default() }),
            update_mask: mask(&["service_gateway_mac"]),
            ..pb::UpdateFabricRequest::default()
        };
        let e = api.update_fabric(Request::new(update)).await.unwrap_err();
        assert!(e.message().starts_with("fabric.service_gateway_mac"), "{e:?}");
    }
}
