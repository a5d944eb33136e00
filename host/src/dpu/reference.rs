//! Image references as the host names them and as the DPU reaches them, and the names derived from them: the
//! converted image's reference and the agent's image id.

use std::collections::BTreeMap;
use std::fmt;

/// A registry reference split into its parts: `[host/]repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host (with port), when the reference names one.
    pub host: Option<String>,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: &'static str,
}

impl Reference {
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let fail = |reason| ReferenceError { reference: text.to_owned(), reason };
        if text.is_empty() || text.len() > 4096 {
            return Err(fail("must hold 1 to 4096 characters"));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(fail("contains white space or control characters"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                let (algorithm, hex) = digest.split_once(':').ok_or_else(|| fail("the digest has no algorithm"))?;
                if algorithm.is_empty() || hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(fail("the digest is not ALGORITHM:HEX"));
                }
                (rest, Some(digest.to_owned()))
            }
            None => (text, None),
        };
        // A host is the first component when it looks like one (a dot, a port or localhost), as Docker decides.
        let (host, path) = match rest.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => (Some(first.to_owned()), path),
            _ => (None, rest),
        };
        // A tag follows the last ':' of the path (a ':' before it would belong to the host).
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repository, tag)) if !tag.contains('/') => (repository, Some(tag.to_owned())),
            _ => (path, None),
        };
        if repository.is_empty() || repository.split('/').any(str::is_empty) {
            return Err(fail("the repository is empty or has an empty component"));
        }
        if tag.as_deref().is_some_and(|t| t.is_empty() || t.len() > 128) {
            return Err(fail("the tag must hold 1 to 128 characters"));
        }
        Ok(Self { host, repository: repository.to_owned(), tag, digest })
    }

    /// `host/repository`, or the repository alone.
    pub fn name(&self) -> String {
        match &self.host {
            Some(host) => format!("{host}/{}", self.repository),
            None => self.repository.clone(),
        }
    }

    /// The reference with its host replaced by the first rule of `rewrites` that names it (host → host).
    pub fn rewritten(&self, rewrites: &BTreeMap<String, String>) -> Self {
        let mut out = self.clone();
        if let Some(to) = self.host.as_ref().and_then(|host| rewrites.get(host)) {
            out.host = Some(to.clone());
        }
        out
    }

    /// Where the lazily loadable form of this image lives: the same repository, tagged with the source's tag
    /// (or its digest, `sha256-<hex>`, when pinned by digest) followed by `suffix`.
    pub fn converted(&self, suffix: &str) -> Result<Self, ReferenceError> {
        let base = match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.replace(':', "-"),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_owned(),
        };
        let tag = format!("{base}{suffix}");
        if tag.len() > 128 {
            return Err(ReferenceError {
                reference: self.to_string(),
                reason: "the converted image's tag would be longer than 128 characters",
            });
        }
        Ok(Self { host: self.host.clone(), repository: self.repository.clone(), tag: Some(tag), digest: None })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// The agent's image id for a converted reference: `ctrd-` and 16 hex digits of the reference's SHA-256, a
/// valid resource id that the same reference always maps to.
pub fn image_id(converted: &Reference) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, converted.to_string().as_bytes());
    let hex: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{IMAGE_ID_PREFIX}{hex}")
}

/// Every image id this snapshotter creates on the agent starts with this.
pub const IMAGE_ID_PREFIX: &str = "ctrd-";

/// The hex part of a layer digest (`sha256:<64 hex>`), used to name the layer's mount directory.
pub fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Reference {
        Reference::parse(text).unwrap()
    }

    #[test]
    fn parts_of_references() {
        let r = parse("10.0.2.2:5000/library/app:1");
        assert_eq!(r.host.as_deref(), Some("10.0.2.2:5000"));
        assert_eq!((r.repository.as_str(), r.tag.as_deref(), r.digest.as_deref()), ("library/app", Some("1"), None));
        assert_eq!(r.to_string(), "10.0.2.2:5000/library/app:1");

        let r = parse("localhost/app");
        assert_eq!((r.host.as_deref(), r.tag.as_deref()), (Some("localhost"), None));
        let r = parse("library/app:2");
        assert_eq!((r.host, r.repository.as_str()), (None, "library/app"));
        let hex = "a".repeat(64);
        let r = parse(&format!("reg.example/app:1@sha256:{hex}"));
        assert_eq!(r.digest, Some(format!("sha256:{hex}")));
        assert_eq!(r.to_string(), format!("reg.example/app:1@sha256:{hex}"));
    }

    #[test]
    fn bad_references_are_refused() {
        for bad in ["", "reg.example/", "reg.example//app", "app:", "app@sha256", "app@sha256:xyz", "a b"] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn converted_names_and_rewrites() {
        let rewrites = BTreeMap::from([("10.0.2.2:5000".to_owned(), "127.0.0.1:5000".to_owned())]);
        let dpu = parse("10.0.2.2:5000/app:1").rewritten(&rewrites);
        assert_eq!(dpu.to_string(), "127.0.0.1:5000/app:1");
        assert_eq!(dpu.converted("-lazy").unwrap().to_string(), "127.0.0.1:5000/app:1-lazy");
        assert_eq!(parse("reg.example/app").rewritten(&rewrites).to_string(), "reg.example/app");
        assert_eq!(parse("reg.example/app").converted("-lazy").unwrap().to_string(), "reg.example/app:latest-lazy");

        let hex = "b".repeat(64);
        let pinned = parse(&format!("reg.example/app:1@sha256:{hex}")).converted("-lazy").unwrap();
        assert_eq!(pinned.to_string(), format!("reg.example/app:sha256-{hex}-lazy"));
        assert!(parse(&format!("reg.example/app@sha256:{hex}")).converted(&"x".repeat(60)).is_err());
    }

    #[test]
    fn image_ids_are_valid_and_stable() {
        let a = image_id(&parse("reg.example/app:1-lazy"));
        assert_eq!(a, image_id(&parse("reg.example/app:1-lazy")));
        assert_ne!(a, image_id(&parse("reg.example/app:2-lazy")));
        assert_eq!(a.len(), IMAGE_ID_PREFIX.len() + 16);
        assert!(a.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    }

    #[test]
    fn digest_hex_takes_sha256_only() {
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(digest_hex(&format!("sha256:{hex}")), Some(hex.as_str()));
        assert_eq!(digest_hex("sha256:ABC"), None);
        assert_eq!(digest_hex(&format!("sha512:{hex}")), None);
        assert_eq!(digest_hex(&format!("sha256:{}", hex.to_uppercase())), None);
    }
}
