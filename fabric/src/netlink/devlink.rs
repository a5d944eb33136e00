//! devlink over generic netlink: the eSwitch's ports as the driver registered them, each with its flavour
//! (physical, PCI PF, PCI VF, PCI SF), its (controller, PF, VF/SF) numbers and the netdev representing it.
//!
//! Numbers are those of the kernel's `include/uapi/linux/devlink.h`.

use super::attr::Attrs;
use super::socket::{NlSocket, genl_payload, open_genl_family};
use crate::FabricError;
use crate::model::{Function, PortId};

/// `DEVLINK_GENL_NAME`.
pub const FAMILY: &str = "devlink";
const DEVLINK_GENL_VERSION: u8 = 1;
/// `DEVLINK_CMD_PORT_GET` (dumpable).
pub const CMD_PORT_GET: u8 = 5;
/// `DEVLINK_CMD_PORT_NEW`: what the kernel names its port replies and notifications.
pub const CMD_PORT_NEW: u8 = 7;

pub const ATTR_BUS_NAME: u16 = 1;
pub const ATTR_DEV_NAME: u16 = 2;
pub const ATTR_PORT_INDEX: u16 = 3;
pub const ATTR_PORT_NETDEV_IFINDEX: u16 = 6;
pub const ATTR_PORT_NETDEV_NAME: u16 = 7;
pub const ATTR_PORT_FLAVOUR: u16 = 77;
pub const ATTR_PORT_NUMBER: u16 = 78;
pub const ATTR_PORT_SPLIT_SUBPORT_NUMBER: u16 = 79;
pub const ATTR_PORT_PCI_PF_NUMBER: u16 = 127;
pub const ATTR_PORT_PCI_VF_NUMBER: u16 = 128;
pub const ATTR_PORT_EXTERNAL: u16 = 149;
pub const ATTR_PORT_CONTROLLER_NUMBER: u16 = 150;
pub const ATTR_PORT_PCI_SF_NUMBER: u16 = 164;

/// `enum devlink_port_flavour`.
pub const FLAVOUR_PHYSICAL: u16 = 0;
pub const FLAVOUR_CPU: u16 = 1;
pub const FLAVOUR_DSA: u16 = 2;
pub const FLAVOUR_PCI_PF: u16 = 3;
pub const FLAVOUR_PCI_VF: u16 = 4;
pub const FLAVOUR_VIRTUAL: u16 = 5;
pub const FLAVOUR_UNUSED: u16 = 6;
pub const FLAVOUR_PCI_SF: u16 = 7;

/// The name `devlink port show` uses for a flavour.
pub fn flavour_name(flavour: u16) -> &'static str {
    match flavour {
        FLAVOUR_PHYSICAL => "physical",
        FLAVOUR_CPU => "cpu",
        FLAVOUR_DSA => "dsa",
        FLAVOUR_PCI_PF => "pcipf",
        FLAVOUR_PCI_VF => "pcivf",
        FLAVOUR_VIRTUAL => "virtual",
        FLAVOUR_UNUSED => "unused",
        FLAVOUR_PCI_SF => "pcisf",
        _ => "unknown",
    }
}

/// One devlink port as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevlinkPort {
    /// The devlink handle, `bus/device` (e.g. `pci/0000:03:00.0`, `netdevsim/netdevsim1`).
    pub device: String,
    pub index: u32,
    /// `enum devlink_port_flavour`; see [`flavour_name`].
    pub flavour: u16,
    /// The eSwitch identity for physical, PCI PF, VF and SF ports; `None` for the other flavours and for split
    /// physical ports, which the fabric does not program.
    pub id: Option<PortId>,
    /// The netdev representing the port, when it has one.
    pub netdev: Option<String>,
    pub ifindex: Option<u32>,
}

impl DevlinkPort {
    /// `bus/device/index`, the name `devlink port show` prints.
    pub fn handle(&self) -> String {
        format!("{}/{}", self.device, self.index)
    }
}

/// The payload of a `DEVLINK_CMD_PORT_GET` dump request (every port of every devlink device).
pub fn port_dump_request() -> Vec<u8> {
    genl_payload(CMD_PORT_GET, DEVLINK_GENL_VERSION, &[])
}

/// Decodes one port message: the generic netlink header, then the port's attributes.
pub fn decode_port(payload: &[u8]) -> Result<DevlinkPort, FabricError> {
    let body = payload.get(4..).ok_or_else(|| FabricError::Decode("devlink message without its header".into()))?;
    let attrs = Attrs::parse(body)?;
    let missing = |what: &str| FabricError::Decode(format!("devlink port message without {what}"));
    let bus = attrs.string(ATTR_BUS_NAME)?.ok_or_else(|| missing("a bus name"))?;
    let dev = attrs.string(ATTR_DEV_NAME)?.ok_or_else(|| missing("a device name"))?;
    let index = attrs.u32(ATTR_PORT_INDEX)?.ok_or_else(|| missing("a port index"))?;
    let flavour = attrs.u16(ATTR_PORT_FLAVOUR)?.ok_or_else(|| missing("a flavour"))?;
    let device = format!("{bus}/{dev}");
    let id = identity(flavour, &attrs).map_err(|e| match e {
        FabricError::Decode(m) => FabricError::Decode(format!("devlink port {device}/{index}: {m}")),
        other => other,
    })?;
    Ok(DevlinkPort {
        device,
        index,
        flavour,
        id,
        netdev: attrs.string(ATTR_PORT_NETDEV_NAME)?.filter(|n| !n.is_empty()),
        ifindex: attrs.u32(ATTR_PORT_NETDEV_IFINDEX)?,
    })
}

/// The (controller, PF, function) of a port from its flavour's attributes.
fn identity(flavour: u16, attrs: &Attrs<'_>) -> Result<Option<PortId>, FabricError> {
    let required_u16 = |kind: u16, what: &str| -> Result<u16, FabricError> {
        attrs.u16(kind)?.ok_or_else(|| FabricError::Decode(format!("{} port without {what}", flavour_name(flavour))))
    };
    let required_u32 = |kind: u16, what: &str| -> Result<u32, FabricError> {
        attrs.u32(kind)?.ok_or_else(|| FabricError::Decode(format!("{} port without {what}", flavour_name(flavour))))
    };
    // Kernels before controllers were introduced (5.10) only knew controller 0.
    let controller = || -> Result<u32, FabricError> { Ok(attrs.u32(ATTR_PORT_CONTROLLER_NUMBER)?.unwrap_or(0)) };
    let id = match flavour {
        FLAVOUR_PHYSICAL => {
            if attrs.get(ATTR_PORT_SPLIT_SUBPORT_NUMBER).is_some() {
                return Ok(None);
            }
            let number = required_u32(ATTR_PORT_NUMBER, "a port number")?;
            let Ok(pf) = u16::try_from(number) else {
                return Err(FabricError::Decode(format!("physical port number {number} is out of range")));
            };
            PortId { controller: 0, pf, function: Function::Physical }
        }
        FLAVOUR_PCI_PF => PortId {
            controller: controller()?,
            pf: required_u16(ATTR_PORT_PCI_PF_NUMBER, "a PF number")?,
            function: Function::HostPf,
        },
        FLAVOUR_PCI_VF => PortId {
            controller: controller()?,
            pf: required_u16(ATTR_PORT_PCI_PF_NUMBER, "a PF number")?,
            function: Function::Vf(required_u16(ATTR_PORT_PCI_VF_NUMBER, "a VF number")?),
        },
        FLAVOUR_PCI_SF => PortId {
            controller: controller()?,
            pf: required_u16(ATTR_PORT_PCI_PF_NUMBER, "a PF number")?,
            function: Function::Sf(required_u32(ATTR_PORT_PCI_SF_NUMBER, "an SF number")?),
        },
        _ => return Ok(None),
    };
    Ok(Some(id))
}

/// A generic netlink socket bound to the devlink family.
#[derive(Debug)]
pub struct Devlink {
    socket: NlSocket,
    family: u16,
}

impl Devlink {
    /// Opens a generic netlink socket and resolves the `devlink` family (refused with `ENOENT` by kernels
    /// built without devlink).
    pub fn open() -> Result<Self, FabricError> {
        let (socket, family) = open_genl_family(FAMILY)?;
        Ok(Self { socket, family })
    }

    /// Every port of every devlink device.
    pub fn ports(&mut self) -> Result<Vec<DevlinkPort>, FabricError> {
        let dump = self.socket.dump(self.family, &port_dump_request(), "listing devlink ports")?;
        dump.iter().map(|payload| decode_port(payload)).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::netlink::attr::Attr;

    /// A port message as the kernel encodes it (`devlink_nl_port_fill`).
    pub(crate) fn port_message(device: &str, index: u32, flavour: u16, extra: Vec<Attr>) -> Vec<u8> {
        let (bus, dev) = device.split_once('/').unwrap();
        let mut attrs = vec![
            Attr::string(ATTR_BUS_NAME, bus),
            Attr::string(ATTR_DEV_NAME, dev),
            Attr::u32(ATTR_PORT_INDEX, index),
            Attr::u16(4, 2), // DEVLINK_ATTR_PORT_TYPE = eth
            Attr::u16(ATTR_PORT_FLAVOUR, flavour),
        ];
        attrs.extend(extra);
        genl_payload(CMD_PORT_NEW, DEVLINK_GENL_VERSION, &attrs)
    }

    pub(crate) fn netdev(name: &str, ifindex: u32) -> Vec<Attr> {
        vec![Attr::u32(ATTR_PORT_NETDEV_IFINDEX, ifindex), Attr::string(ATTR_PORT_NETDEV_NAME, name)]
    }

    pub(crate) fn vf(controller: u32, pf: u16, vf: u16) -> Vec<Attr> {
        vec![
            Attr::u32(ATTR_PORT_CONTROLLER_NUMBER, controller),
            Attr::u16(ATTR_PORT_PCI_PF_NUMBER, pf),
            Attr::u16(ATTR_PORT_PCI_VF_NUMBER, vf),
            Attr::u8(ATTR_PORT_EXTERNAL, u8::from(controller != 0)),
        ]
    }

    #[test]
    fn every_eswitch_flavour_decodes_to_its_identity() {
        let physical = port_message(
            "pci/0000:03:00.0",
            65535,
            FLAVOUR_PHYSICAL,
            [vec![Attr::u32(ATTR_PORT_NUMBER, 1)], netdev("p1", 4)].concat(),
        );
        let p = decode_port(&physical).unwrap();
        assert_eq!(p.device, "pci/0000:03:00.0");
        assert_eq!(p.handle(), "pci/0000:03:00.0/65535");
        assert_eq!(p.id.unwrap().to_string(), "p1");
        assert_eq!((p.netdev.as_deref(), p.ifindex), (Some("p1"), Some(4)));

        let host_pf = port_message(
            "pci/0000:03:00.0",
            65536,
            FLAVOUR_PCI_PF,
            vec![Attr::u32(ATTR_PORT_CONTROLLER_NUMBER, 1), Attr::u16(ATTR_PORT_PCI_PF_NUMBER, 0)],
        );
        let p = decode_port(&host_pf).unwrap();
        assert_eq!(p.id.unwrap().to_string(), "c1pf0hpf");
        assert_eq!((p.netdev, p.ifindex), (None, None));

        let vf3 = port_message("pci/0000:03:00.0", 65540, FLAVOUR_PCI_VF, [vf(0, 0, 3), netdev("eth7", 9)].concat());
        let p = decode_port(&vf3).unwrap();
        assert_eq!(p.id, Some(PortId::vf(0, 3)));
        assert_eq!(p.netdev.as_deref(), Some("eth7"), "the netdev name is carried, not used as identity");

        let external = port_message("pci/0000:03:00.1", 3, FLAVOUR_PCI_VF, vf(1, 1, 12));
        assert_eq!(decode_port(&external).unwrap().id.unwrap().to_string(), "c1pf1vf12");

        let sf = port_message(
            "pci/0000:03:00.0",
            98304,
            FLAVOUR_PCI_SF,
            vec![
                Attr::u32(ATTR_PORT_CONTROLLER_NUMBER, 0),
                Attr::u16(ATTR_PORT_PCI_PF_NUMBER, 0),
                Attr::u32(ATTR_PORT_PCI_SF_NUMBER, 88),
            ],
        );
        assert_eq!(decode_port(&sf).unwrap().id.unwrap().to_string(), "pf0sf88");

        // Kernels before 5.10 send no controller: controller 0.
        let old = port_message(
            "pci/0000:03:00.0",
            2,
            FLAVOUR_PCI_VF,
            vec![Attr::u16(ATTR_PORT_PCI_PF_NUMBER, 0), Attr::u16(ATTR_PORT_PCI_VF_NUMBER, 1)],
        );
        assert_eq!(decode_port(&old).unwrap().id, Some(PortId::vf(0, 1)));
    }

    #[test]
    fn ports_the_fabric_does_not_program_have_no_identity() {
        for flavour in [FLAVOUR_CPU, FLAVOUR_DSA, FLAVOUR_VIRTUAL, FLAVOUR_UNUSED, 42] {
            let p = decode_port(&port_message("mdio_bus/sw0", 1, flavour, netdev("lan1", 5))).unwrap();
            assert_eq!(p.id, None, "{}", flavour_name(flavour));
        }
        let split = port_message(
            "pci/0000:03:00.0",
            1,
            FLAVOUR_PHYSICAL,
            vec![Attr::u32(ATTR_PORT_NUMBER, 0), Attr::u32(ATTR_PORT_SPLIT_SUBPORT_NUMBER, 1)],
        );
        assert_eq!(decode_port(&split).unwrap().id, None);
    }

    #[test]
    fn malformed_port_messages_are_errors() {
        assert!(decode_port(&[5, 1]).is_err(), "shorter than the generic netlink header");
        let no_pf = port_message("pci/0000:03:00.0", 2, FLAVOUR_PCI_VF, vec![Attr::u16(ATTR_PORT_PCI_VF_NUMBER, 1)]);
        let e = decode_port(&no_pf).unwrap_err().to_string();
        assert!(e.contains("pci/0000:03:00.0/2") && e.contains("pcivf port without a PF number"), "{e}");
        let wide = port_message("pci/0000:03:00.0", 2, FLAVOUR_PHYSICAL, vec![Attr::u32(ATTR_PORT_NUMBER, 70000)]);
        assert!(decode_port(&wide).is_err(), "physical port number past u16");
        let narrow = port_message("pci/0000:03:00.0", 2, FLAVOUR_PCI_VF, vec![Attr::u8(ATTR_PORT_PCI_PF_NUMBER, 0)]);
        assert!(decode_port(&narrow).is_err(), "PF number of the wrong width");
        let no_index =
            genl_payload(CMD_PORT_NEW, 1, &[Attr::string(ATTR_BUS_NAME, "pci"), Attr::string(ATTR_DEV_NAME, "x")]);
        assert!(decode_port(&no_index).is_err());
    }

    #[test]
    fn dump_request_is_a_port_get() {
        assert_eq!(port_dump_request(), vec![CMD_PORT_GET, DEVLINK_GENL_VERSION, 0, 0]);
    }

    /// The real kernel: the family resolves and the dump completes (kernels without devlink refuse the
    /// family with ENOENT).
    #[test]
    fn kernel_dump() {
        match Devlink::open() {
            Ok(mut d) => {
                let ports = d.ports().unwrap();
                eprintln!("devlink reports {} port(s)", ports.len());
            }
            Err(e) => {
                eprintln!("skipped: devlink is not reachable here ({e})");
                assert!(matches!(e, FabricError::Kernel { errno: 2, .. } | FabricError::Socket { .. }), "{e}");
            }
        }
    }
}
