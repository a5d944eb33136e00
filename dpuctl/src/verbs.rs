//! One grammar over every kind: `dpuctl VERB KIND [NAME] [FLAGS]` with the verbs get, list, describe, create,
//! update, delete and apply. Each verb of each kind runs the data path's own command (`dpuctl storage volume
//! create …`), so both spellings take the same flags and print the same way.

use std::fmt::Write as _;

/// A kind of object and where its verbs live among the data paths' commands.
#[derive(Debug)]
pub struct Kind {
    /// Accepted spellings: singular first (used in messages), plural, the API's collection.
    pub names: &'static [&'static str],
    /// The collection in resource names and in the change feed.
    pub collection: &'static str,
    /// The kind's objects live under a subsystem: NAME is SUBSYSTEM/ID, and a list needs the SUBSYSTEM.
    pub child_of_subsystem: bool,
    pub get: Option<&'static [&'static str]>,
    pub list: Option<&'static [&'static str]>,
    pub create: Option<&'static [&'static str]>,
    pub update: Option<&'static [&'static str]>,
    pub delete: Option<&'static [&'static str]>,
    /// What to use when a verb is not there, e.g. "dpuctl apply -f (a mesh spec)".
    pub otherwise: &'static str,
}

impl Kind {
    /// One object of its kind (the fabric and agent settings): no NAME, no list.
    pub fn singleton(&self) -> bool {
        self.list.is_none() && self.get.is_some()
    }
}

macro_rules! path {
    () => {
        None
    };
    ($($word:literal)+) => {
        Some(&[$($word),+])
    };
}

macro_rules! kind {
    ($names:expr, $collection:literal, child: $child:literal, get: [$($g:literal)*], list: [$($l:literal)*],
     create: [$($c:literal)*], update: [$($u:literal)*], delete: [$($d:literal)*], otherwise: $otherwise:expr) => {
        Kind {
            names: $names,
            collection: $collection,
            child_of_subsystem: $child,
            get: path!($($g)*),
            list: path!($($l)*),
            create: path!($($c)*),
            update: path!($($u)*),
            delete: path!($($d)*),
            otherwise: $otherwise,
        }
    };
}

const MESH_APPLY: &str = "mesh objects are created and updated from a spec file: dpuctl apply -f FILE";

pub static KINDS: &[Kind] = &[
    kind!(&["volume", "volumes", "vol"], "volumes", child: false,
        get: ["storage" "volume" "get"], list: ["storage" "volume" "list"], create: ["storage" "volume" "create"],
        update: [], delete: ["storage" "volume" "delete"], otherwise: "a volume's spec is fixed: delete it and create it again"),
    kind!(&["subsystem", "subsystems", "subsys"], "subsystems", child: false,
        get: ["storage" "subsystem" "get"], list: ["storage" "subsystem" "list"],
        create: ["storage" "subsystem" "create"], update: [], delete: ["storage" "subsystem" "delete"],
        otherwise: "a subsystem's hosts and identity are fixed: delete it and create it again"),
    kind!(&["namespace", "namespaces", "ns"], "namespaces", child: true,
        get: ["storage" "namespace" "get"], list: ["storage" "namespace" "list"],
        create: ["storage" "namespace" "create"], update: [], delete: ["storage" "namespace" "delete"],
        otherwise: "a namespace is fixed: delete it and create it again"),
    kind!(&["nvme-listener", "nvme-listeners", "listeners"], "listeners", child: true,
        get: ["storage" "listener" "get"], list: ["storage" "listener" "list"],
        create: ["storage" "listener" "create"], update: [], delete: ["storage" "listener" "delete"],
        otherwise: "a listener is fixed: delete it and create it again"),
    kind!(&["image", "images", "img"], "images", child: false,
        get: ["image" "get"], list: ["image" "list"], create: ["image" "create"], update: [],
        delete: ["image" "delete"], otherwise: "an image follows its reference: delete it and create it again"),
    kind!(&["registry-credential", "registry-credentials", "registryCredentials"], "registryCredentials", child: false,
        get: ["image" "credential" "get"], list: ["image" "credential" "list"],
        create: ["image" "credential" "create"], update: [], delete: ["image" "credential" "delete"],
        otherwise: "credentials are write-only: create them again under another name"),
    kind!(&["crypto-key", "crypto-keys", "cryptoKeys", "key", "keys"], "cryptoKeys", child: false,
        get: ["crypto" "key" "get"], list: ["crypto" "key" "list"], create: ["crypto" "key" "create"], update: [],
        delete: ["crypto" "key" "delete"], otherwise: "keys are write-only: create a new key and rekey its users"),
    kind!(&["ipsec-tunnel", "ipsec-tunnels", "ipsecTunnels", "tunnel", "tunnels"], "ipsecTunnels", child: false,
        get: ["crypto" "tunnel" "get"], list: ["crypto" "tunnel" "list"], create: ["crypto" "tunnel" "create"],
        update: ["crypto" "tunnel" "update"], delete: ["crypto" "tunnel" "delete"], otherwise: ""),
    kind!(&["attachment", "attachments", "att"], "attachments", child: false,
        get: ["fabric" "show"], list: ["fabric" "list"], create: ["fabric" "attach"], update: [],
        delete: ["fabric" "detach"], otherwise: "an attachment is fixed: detach it and attach it again"),
    kind!(&["service", "services", "svc"], "services", child: false,
        get: ["fabric" "service-get"], list: ["fabric" "service-list"], create: ["fabric" "service-create"],
        update: ["fabric" "service-update"], delete: ["fabric" "service-delete"], otherwise: ""),
    kind!(&["port", "ports"], "ports", child: false,
        get: [], list: ["fabric" "ports"], create: [], update: [], delete: [],
        otherwise: "ports are the eSwitch's: they are listed, not changed"),
    kind!(&["fabric", "fabrics"], "fabrics", child: false,
        get: ["fabric" "get"], list: [], create: [], update: ["fabric" "set"], delete: [],
        otherwise: "the fabric settings are one object: dpuctl get fabric / dpuctl update fabric --uplink …"),
    kind!(&["settings", "setting"], "settings", child: false,
        get: ["settings" "get"], list: [], create: [], update: ["settings" "set"], delete: [],
        otherwise: "the agent settings are one object: dpuctl get settings / dpuctl update settings --log-filter …"),
    kind!(&["mesh-workload", "mesh-workloads", "meshWorkloads", "workload", "workloads"], "meshWorkloads", child: false,
        get: ["mesh" "get" "workload"], list: ["mesh" "list" "workload"], create: [], update: [],
        delete: ["mesh" "delete" "workload"], otherwise: MESH_APPLY),
    kind!(&["mesh-certificate", "mesh-certificates", "meshCertificates", "certificate", "certificates"],
        "meshCertificates", child: false,
        get: ["mesh" "get" "certificate"], list: ["mesh" "list" "certificate"], create: [], update: [],
        delete: ["mesh" "delete" "certificate"], otherwise: MESH_APPLY),
    kind!(&["mesh-cluster", "mesh-clusters", "meshClusters", "cluster", "clusters"], "meshClusters", child: false,
        get: ["mesh" "get" "cluster"], list: ["mesh" "list" "cluster"], create: [], update: [],
        delete: ["mesh" "delete" "cluster"], otherwise: MESH_APPLY),
    kind!(&["mesh-route-table", "mesh-route-tables", "meshRouteTables", "route-table", "route-tables"],
        "meshRouteTables", child: false,
        get: ["mesh" "get" "route-table"], list: ["mesh" "list" "route-table"], create: [], update: [],
        delete: ["mesh" "delete" "route-table"], otherwise: MESH_APPLY),
    kind!(&["mesh-listener", "mesh-listeners", "meshListeners"], "meshListeners", child: false,
        get: ["mesh" "get" "listener"], list: ["mesh" "list" "listener"], create: [], update: [],
        delete: ["mesh" "delete" "listener"], otherwise: MESH_APPLY),
    kind!(&["mesh-policy", "mesh-policies", "meshPolicies", "policy", "policies"], "meshPolicies", child: false,
        get: ["mesh" "get" "policy"], list: ["mesh" "list" "policy"], create: [], update: [],
        delete: ["mesh" "delete" "policy"], otherwise: MESH_APPLY),
];

/// The kind spelled `name`, or an error listing the kinds.
pub fn kind(name: &str) -> Result<&'static Kind, String> {
    KINDS.iter().find(|k| k.names.iter().any(|n| n.eq_ignore_ascii_case(name))).ok_or_else(|| {
        let mut known = String::new();
        for k in KINDS {
            let _ = write!(known, "{}{}", if known.is_empty() { "" } else { ", " }, k.names[0]);
        }
        format!("{name:?} is not a kind; the kinds are: {known}")
    })
}

/// The verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Create,
    Update,
    Delete,
}

impl Verb {
    fn word(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Delete => "delete",
        }
    }
}

/// The data path command (without the program name) that does `verb` on `kind` with `args` (NAME first, then
/// flags).
pub fn command_line(verb: Verb, kind: &Kind, args: &[String]) -> Result<Vec<String>, String> {
    let path = match verb {
        Verb::Get => kind.get,
        Verb::List => kind.list,
        Verb::Create => kind.create,
        Verb::Update => kind.update,
        Verb::Delete => kind.delete,
    };
    let Some(path) = path else {
        let what = kind.names[0];
        return Err(match kind.otherwise {
            "" => format!("{what} has no {}", verb.word()),
            otherwise => format!("{what} has no {}: {otherwise}", verb.word()),
        });
    };
    let mut line: Vec<String> = path.iter().map(|w| (*w).to_string()).collect();
    let mut rest = args.iter().peekable();
    if kind.singleton()
        && let Some(name) = rest.next_if(|a| !a.starts_with('-'))
        && !kind.names.contains(&name.as_str())
    {
        return Err(format!("{} is one object and takes no NAME (got {name:?})", kind.names[0]));
    }
    if kind.child_of_subsystem {
        // SUBSYSTEM/ID (or SUBSYSTEM ID) → SUBSYSTEM ID; a list takes the SUBSYSTEM alone.
        match rest.next() {
            Some(first) if verb != Verb::List && !first.starts_with('-') => match first.split_once('/') {
                Some((subsystem, id)) => line.extend([subsystem.to_string(), id.to_string()]),
                None => line.push(first.clone()),
            },
            Some(first) => line.push(first.clone()),
            None if verb == Verb::List => {
                return Err(format!("listing {} needs the SUBSYSTEM they belong to", kind.names[1]));
            }
            None => {}
        }
    }
    line.extend(rest.cloned());
    Ok(line)
}

/// The name the change feed gives an object of `kind` named `name` (`SUBSYSTEM/ID` for namespaces and listeners).
pub fn feed_name(kind: &Kind, name: &str) -> String {
    let id = name.strip_prefix(kind.collection).and_then(|n| n.strip_prefix('/')).unwrap_or(name);
    format!("{}/{id}", kind.collection)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(verb: Verb, kind_name: &str, args: &[&str]) -> Result<Vec<String>, String> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
        command_line(verb, kind(kind_name)?, &args)
    }

    #[test]
    fn every_verb_maps_onto_the_data_path_command() {
        assert_eq!(line(Verb::Get, "volumes", &["db"]).unwrap(), ["storage", "volume", "get", "db"]);
        assert_eq!(
            line(Verb::Create, "vol", &["db", "--malloc", "--size", "1MiB"]).unwrap(),
            ["storage", "volume", "create", "db", "--malloc", "--size", "1MiB"]
        );
        assert_eq!(line(Verb::Get, "ns", &["img/n1"]).unwrap(), ["storage", "namespace", "get", "img", "n1"]);
        assert_eq!(line(Verb::List, "namespaces", &["img"]).unwrap(), ["storage", "namespace", "list", "img"]);
        assert!(line(Verb::List, "namespaces", &[]).unwrap_err().contains("SUBSYSTEM"));
        assert_eq!(line(Verb::Delete, "meshClusters", &["web"]).unwrap(), ["mesh", "delete", "cluster", "web"]);
        assert_eq!(line(Verb::Update, "tunnel", &["east"]).unwrap(), ["crypto", "tunnel", "update", "east"]);
        assert!(line(Verb::Create, "mesh-cluster", &["web"]).unwrap_err().contains("apply -f"));
        assert!(line(Verb::Get, "gizmo", &[]).unwrap_err().contains("volume, subsystem"));
        assert_eq!(feed_name(kind("ns").unwrap(), "img/n1"), "namespaces/img/n1");
        assert_eq!(feed_name(kind("volume").unwrap(), "volumes/db"), "volumes/db");
    }

    #[test]
    fn every_command_line_parses() {
        use clap::Parser as _;
        for k in KINDS {
            for verb in [Verb::Get, Verb::List, Verb::Delete] {
                let args = if k.child_of_subsystem { vec!["sub/x".to_string()] } else { vec!["x".to_string()] };
                let args = if (verb == Verb::List && !k.child_of_subsystem) || k.singleton() { vec![] } else { args };
                let Ok(words) = command_line(verb, k, &args) else { continue };
                let argv = std::iter::once("dpuctl".to_string()).chain(words.iter().cloned());
                if let Err(e) = crate::Cli::try_parse_from(argv) {
                    panic!("{} {}: dpuctl {}: {e}", verb.word(), k.names[0], words.join(" "));
                }
            }
        }
    }
}
