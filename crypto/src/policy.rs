//! Where crypto work runs. Every object that encrypts carries a [`Policy`]; [`place`] turns it and what the
//! machine offers into a [`Placement`] the object reports — hardware or software, which engine, and why — or
//! refuses it, naming what is missing. Nothing falls back silently.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CryptoError;

/// What an object asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// An offload engine, or refuse.
    RequireHardware,
    /// An offload engine where there is one; otherwise the agent's cores, and the status says why.
    #[default]
    PreferHardware,
    /// The agent's cores, even where an offload engine exists.
    Software,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequireHardware => "require-hardware",
            Self::PreferHardware => "prefer-hardware",
            Self::Software => "software",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = CryptoError;

    fn from_str(s: &str) -> Result<Self, CryptoError> {
        match s.replace('_', "-").as_str() {
            "require-hardware" => Ok(Self::RequireHardware),
            "prefer-hardware" => Ok(Self::PreferHardware),
            "software" => Ok(Self::Software),
            _ => Err(CryptoError::UnknownPolicy(s.chars().take(64).collect())),
        }
    }
}

/// What a policy resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// An offload engine does the work.
    pub hardware: bool,
    /// The engine: the offload engine's name, or the software implementation's.
    pub engine: String,
    /// Why this placement, in words.
    pub reason: String,
}

/// Places work under `policy`. `hardware` names the offload engine that can do it here (`None`: none can, and
/// `missing` says why); `software_engine` names what runs on the agent's cores.
pub fn place(
    policy: Policy,
    hardware: Option<&str>,
    missing: &str,
    software_engine: &str,
) -> Result<Placement, CryptoError> {
    let software = |reason: String| Placement { hardware: false, engine: software_engine.to_owned(), reason };
    match (policy, hardware) {
        (Policy::Software, _) => Ok(software("software requested by policy".into())),
        (Policy::RequireHardware | Policy::PreferHardware, Some(engine)) => {
            Ok(Placement { hardware: true, engine: engine.to_owned(), reason: "offload engine available".into() })
        }
        (Policy::PreferHardware, None) => Ok(software(format!("hardware preferred but unavailable: {missing}"))),
        (Policy::RequireHardware, None) => Err(CryptoError::HardwareRequired(format!(
            "the policy requires hardware, and none is available: {missing}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_with_and_without_hardware() {
        let with = |p| place(p, Some("mlx5"), "n/a", "armv8-aes");
        let without = |p| place(p, None, "no engine", "armv8-aes");
        assert_eq!(with(Policy::RequireHardware).unwrap().engine, "mlx5");
        assert!(with(Policy::PreferHardware).unwrap().hardware);
        let sw = with(Policy::Software).unwrap();
        assert!(!sw.hardware && sw.engine == "armv8-aes" && sw.reason.contains("requested"));
        let e = without(Policy::RequireHardware).unwrap_err();
        assert!(matches!(e, CryptoError::HardwareRequired(_)) && e.to_string().contains("no engine"), "{e}");
        let fallback = without(Policy::PreferHardware).unwrap();
        assert!(!fallback.hardware && fallback.reason.contains("unavailable: no engine"));
        assert!(!without(Policy::Software).unwrap().hardware);
    }

    #[test]
    fn names() {
        for p in [Policy::RequireHardware, Policy::PreferHardware, Policy::Software] {
            assert_eq!(p.as_str().parse::<Policy>().unwrap(), p);
            assert_eq!(p.as_str().replace('-', "_").parse::<Policy>().unwrap(), p);
        }
        let e = "fast".parse::<Policy>().unwrap_err().to_string();
        assert!(e.contains("prefer-hardware"), "{e}");
        assert_eq!(Policy::default(), Policy::PreferHardware);
    }
}
