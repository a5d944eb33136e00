//! The gRPC control API: `dpu.v1` services plus `grpc.health.v1` and server reflection, behind mTLS and the
//! role check. Protobuf types end here: handlers convert them to domain types with `TryFrom` and validate.

pub mod agent;
pub mod auth;
pub mod crypto;
pub mod fabric;
pub mod image;
pub mod incoming;
pub mod mesh;
pub mod storage;

use std::collections::BTreeSet;

use tonic::Status;

/// An AIP-134 update mask, checked against the fields a resource allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMask {
    /// `None` means every field (empty mask or `*`).
    paths: Option<BTreeSet<String>>,
}

impl FieldMask {
    /// Parses a mask; unknown paths are `InvalidArgument` naming the path.
    pub fn parse(mask: Option<prost_types::FieldMask>, allowed: &[&str]) -> Result<Self, Status> {
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() || paths.iter().any(|p| p == "*") {
            return Ok(Self { paths: None });
        }
        for path in &paths {
            if !allowed.contains(&path.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "update_mask: unknown field {path:?} (allowed: {})",
                    allowed.join(", ")
                )));
            }
        }
        Ok(Self { paths: Some(paths.into_iter().collect()) })
    }

    /// True when the update replaces `field`.
    pub fn covers(&self, field: &str) -> bool {
        self.paths.as_ref().is_none_or(|p| p.contains(field))
    }
}

/// Parses `collection/{id}` (or a bare id) into the id, validated; errors name `field`.
pub fn parse_name<'a>(name: &'a str, collection: &str, field: &str) -> Result<&'a str, Status> {
    let id = name.strip_prefix(collection).and_then(|r| r.strip_prefix('/')).unwrap_or(name);
    dpu_intent::validate_id(id).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    Ok(id)
}

/// The page size and token of an AIP-158 list request (0 = the store's default size; empty token = first page).
pub fn page(size: i32, token: &str) -> Result<(usize, Option<&str>), Status> {
    let size = usize::try_from(size).map_err(|_| Status::invalid_argument("page_size: must not be negative"))?;
    Ok((size, Some(token).filter(|t| !t.is_empty())))
}

/// A store generation as the API's `int64`.
pub fn generation(g: u64) -> i64 {
    i64::try_from(g).unwrap_or(i64::MAX)
}

/// A validation failure of a request, naming the field.
pub fn invalid(e: dpu_intent::Invalid) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Maps intent-store errors onto gRPC codes deliberately.
pub fn intent_status(e: dpu_intent::Error) -> Status {
    use dpu_intent::Error as E;
    let message = e.to_string();
    match e {
        E::NotFound { .. } => Status::not_found(message),
        E::AlreadyExists { .. } => Status::already_exists(message),
        E::InvalidId { .. } | E::InvalidPageToken { .. } => Status::invalid_argument(message),
        E::Conflict { .. } => Status::aborted(message),
        // An upgrade in progress: the new process takes writes in a moment.
        E::Released { .. } => Status::unavailable(message),
        _ => {
            tracing::error!(error = %message, "intent store failure");
            Status::unavailable(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_mask() {
        let all = FieldMask::parse(None, &["a", "b"]).unwrap();
        assert!(all.covers("a") && all.covers("b"));
        let star = FieldMask::parse(Some(prost_types::FieldMask { paths: vec!["*".into()] }), &["a"]).unwrap();
        assert!(star.covers("a"));
        let some = FieldMask::parse(Some(prost_types::FieldMask { paths: vec!["b".into()] }), &["a", "b"]).unwrap();
        assert!(!some.covers("a") && some.covers("b"));
        let err = FieldMask::parse(Some(prost_types::FieldMask { paths: vec!["c".into()] }), &["a"]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("\"c\""));
    }
}
