//! Protobuf ↔ domain conversions and domain error → gRPC status mapping; the only place both meet.

use std::collections::HashMap;

use prost_types::FieldMask;
use tonic::Status;

use super::pb::{snapshots as pb, types};
use crate::snapshot::{Error, Info, Kind, LabelEdit, Labels, Mount, Usage};

/// containerd sends an empty parent for "no parent".
pub fn parent(parent: String) -> Option<String> {
    (!parent.is_empty()).then_some(parent)
}

pub fn labels(labels: HashMap<String, String>) -> Labels {
    labels.into_iter().collect()
}

pub fn mounts(mounts: Vec<Mount>) -> Vec<types::Mount> {
    mounts
        .into_iter()
        .map(|m| types::Mount { r#type: m.fs_type, source: m.source, target: String::new(), options: m.options })
        .collect()
}

pub fn kind(kind: Kind) -> pb::Kind {
    match kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

pub fn info(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        kind: kind(info.kind).into(),
        created_at: Some(info.created.into()),
        updated_at: Some(info.updated.into()),
        labels: info.labels.into_iter().collect(),
    }
}

pub fn usage(usage: Usage) -> pb::UsageResponse {
    pb::UsageResponse {
        size: i64::try_from(usage.size).unwrap_or(i64::MAX),
        inodes: i64::try_from(usage.inodes).unwrap_or(i64::MAX),
    }
}

/// An `Update` request as the snapshot to change and the label edits its field mask asks for: `labels`
/// replaces them all, `labels.<key>` sets one from `info.labels` (or removes it when absent there), and an
/// empty mask means `labels`. Nothing but labels can change.
pub fn label_edits(info: Option<pb::Info>, mask: Option<FieldMask>) -> Result<(String, Vec<LabelEdit>), Status> {
    let info = info.ok_or_else(|| Status::invalid_argument("info is required"))?;
    if info.name.is_empty() {
        return Err(Status::invalid_argument("info.name must name the snapshot to update"));
    }
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    let mut requested = labels(info.labels);
    if paths.is_empty() {
        return Ok((info.name, vec![LabelEdit::ReplaceAll(requested)]));
    }
    let mut edits = Vec::with_capacity(paths.len());
    for path in paths {
        if path == "labels" {
            edits.push(LabelEdit::ReplaceAll(requested.clone()));
        } else if let Some(key) = path.strip_prefix("labels.") {
            if key.is_empty() {
                return Err(Status::invalid_argument(format!("field mask path {path:?} names no label")));
            }
            edits.push(LabelEdit::Set { key: key.to_owned(), value: requested.remove(key) });
        } else {
            return Err(Status::invalid_argument(format!(
                "cannot update {path:?} of snapshot {:?}: only labels can change",
                info.name
            )));
        }
    }
    Ok((info.name, edits))
}

/// The gRPC status for a domain error. Disk failures are `INTERNAL`, except a full disk
/// (`RESOURCE_EXHAUSTED`).
pub fn status(error: Error) -> Status {
    match error {
        Error::NotFound(m) => Status::not_found(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        Error::Io { context, source } if source.kind() == std::io::ErrorKind::StorageFull => {
            Status::resource_exhausted(format!("{context}: {source}"))
        }
        Error::Io { context, source } => Status::internal(format!("{context}: {source}")),
        e @ (Error::Corrupt(_) | Error::Internal(_)) => Status::internal(e.to_string()),
        Error::Unavailable(message) => Status::unavailable(message),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn pb_info(name: &str, labels: &[(&str, &str)]) -> Option<pb::Info> {
        Some(pb::Info {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        })
    }

    fn mask(paths: &[&str]) -> Option<FieldMask> {
        Some(FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() })
    }

    #[test]
    fn update_masks_become_label_edits() {
        let (name, edits) = label_edits(pb_info("s", &[("a", "1")]), None).unwrap();
        assert_eq!(name, "s");
        assert_eq!(edits, [LabelEdit::ReplaceAll(Labels::from([("a".into(), "1".into())]))]);
        let (_, edits) = label_edits(pb_info("s", &[("a", "1")]), mask(&[])).unwrap();
        assert_eq!(edits, [LabelEdit::ReplaceAll(Labels::from([("a".into(), "1".into())]))]);

        let (_, edits) = label_edits(pb_info("s", &[("a", "1"), ("b", "2")]), mask(&["labels.a", "labels.c"])).unwrap();
        assert_eq!(
            edits,
            [
                LabelEdit::Set { key: "a".into(), value: Some("1".into()) },
                LabelEdit::Set { key: "c".into(), value: None },
            ]
        );
        let (_, edits) = label_edits(pb_info("s", &[("x", "1")]), mask(&["labels"])).unwrap();
        assert_eq!(edits, [LabelEdit::ReplaceAll(Labels::from([("x".into(), "1".into())]))]);
    }

    #[test]
    fn other_update_paths_and_missing_info_are_invalid() {
        for (info, m) in [
            (pb_info("s", &[]), mask(&["parent"])),
            (pb_info("s", &[]), mask(&["labels", "kind"])),
            (pb_info("s", &[]), mask(&["labels."])),
            (pb_info("", &[]), None),
            (None, None),
        ] {
            let err = label_edits(info, m).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        }
    }

    #[test]
    fn info_and_errors_map_to_the_wire() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let wire = info(Info {
            name: "n".into(),
            parent: None,
            kind: Kind::Committed,
            created: t,
            updated: t,
            labels: Labels::from([("k".into(), "v".into())]),
        });
        assert_eq!(wire.parent, "");
        assert_eq!(wire.kind(), pb::Kind::Committed);
        assert_eq!(wire.created_at, Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5 }));
        assert_eq!(wire.labels["k"], "v");

        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert_eq!(status(Error::io("writing", full)).code(), tonic::Code::ResourceExhausted);
        assert_eq!(status(Error::NotFound("x".into())).code(), tonic::Code::NotFound);
        assert_eq!(status(Error::Corrupt("x".into())).code(), tonic::Code::Internal);
        assert_eq!(usage(Usage { size: u64::MAX, inodes: 3 }).size, i64::MAX);
    }
}
