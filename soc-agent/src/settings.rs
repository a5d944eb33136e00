//! Agent settings: the agent's own run-time intent (log filter, operator labels), a singleton resource that
//! follows the same path as every data-path object — validated domain type, persisted intent, reconciler.

use std::collections::BTreeMap;
use std::sync::Arc;

use dpu_intent::reconcile::{ObjectKey, ObjectState, ObjectStatus, Pass, ReconcileError, Reconciler};
use dpu_intent::{Resource, Store};
use serde::{Deserialize, Serialize};

use crate::logging::LogControl;

/// Id of the one settings object in its collection.
pub const SETTINGS_ID: &str = "agent";
/// Name of the settings reconciler on the status board.
pub const SETTINGS_SUBSYSTEM: &str = "settings";

/// Validated settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSettings {
    /// Overrides the config file's log level while set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_filter: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Resource for AgentSettings {
    const KIND: &'static str = "settings";
}

/// A settings value rejected at the API edge, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSettings {
    pub field: String,
    pub message: String,
}

const MAX_LABELS: usize = 64;
const MAX_LABEL_VALUE: usize = 256;

impl AgentSettings {
    /// Checks every field; the error names the first offending one.
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        let invalid = |field: String, message: String| Err(InvalidSettings { field, message });
        if let Some(filter) = &self.log_filter
            && let Err(e) = filter.parse::<tracing_subscriber::EnvFilter>()
        {
            return invalid("settings.log_filter".into(), format!("{filter:?} is not a valid filter: {e}"));
        }
        if self.labels.len() > MAX_LABELS {
            return invalid("settings.labels".into(), format!("at most {MAX_LABELS} labels"));
        }
        for (key, value) in &self.labels {
            let key_ok = (1..=63).contains(&key.len())
                && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
            if !key_ok {
                return invalid(
                    format!("settings.labels[{key:?}]"),
                    "keys are 1-63 characters of lowercase letters, digits, '.', '_', '-', '/'".into(),
                );
            }
            if value.len() > MAX_LABEL_VALUE {
                return invalid(
                    format!("settings.labels[{key:?}]"),
                    format!("values are at most {MAX_LABEL_VALUE} bytes"),
                );
            }
        }
        Ok(())
    }
}

/// Applies the persisted settings to the running process.
#[derive(Debug)]
pub struct SettingsReconciler {
    log: Arc<LogControl>,
    /// The config file's log level, in force when no override is set.
    base_log_filter: String,
}

impl SettingsReconciler {
    pub fn new(log: Arc<LogControl>, base_log_filter: String) -> Self {
        Self { log, base_log_filter }
    }
}

impl Reconciler for SettingsReconciler {
    fn name(&self) -> &'static str {
        SETTINGS_SUBSYSTEM
    }

    async fn reconcile(&self, store: &Store) -> Result<Pass, ReconcileError> {
        let stored = match store.get::<AgentSettings>(SETTINGS_ID) {
            Ok(stored) => Some(stored),
            Err(dpu_intent::Error::NotFound { .. }) => None,
            Err(e) => return Err(ReconcileError::Store(e)),
        };
        let wanted =
            stored.as_ref().and_then(|s| s.spec.log_filter.clone()).unwrap_or_else(|| self.base_log_filter.clone());
        let observed_generation = stored.as_ref().map_or(0, |s| s.meta.generation);
        let (changes, state, reason) = match self.log.apply(&wanted) {
            Ok(changed) => {
                if changed {
                    tracing::info!(filter = %wanted, "log filter applied");
                }
                (usize::from(changed), ObjectState::Ready, String::new())
            }
            Err(reason) => (0, ObjectState::Error, reason),
        };
        let status = ObjectStatus { state, reason, observed_generation };
        let statuses = match stored {
            Some(_) => vec![(ObjectKey::of::<AgentSettings>(SETTINGS_ID), status)],
            None => Vec::new(),
        };
        Ok(Pass { changes, statuses })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let mut s = AgentSettings { log_filter: Some("info,[[".into()), ..Default::default() };
        assert_eq!(s.validate().unwrap_err().field, "settings.log_filter");
        s.log_filter = Some("debug,h2=info".into());
        s.validate().unwrap();
        s.labels.insert("Rack".into(), "1".into());
        assert_eq!(s.validate().unwrap_err().field, "settings.labels[\"Rack\"]");
        s.labels.clear();
        s.labels.insert("rack".into(), "x".repeat(257));
        assert!(s.validate().is_err());
    }

    #[tokio::test]
    async fn reconciler_applies_override_and_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(LogControl::detached("info"));
        let reconciler = SettingsReconciler::new(log.clone(), "info".into());

        // Nothing stored and the base already active: nothing to do.
        let pass = reconciler.reconcile(&store).await.unwrap();
        assert_eq!((pass.changes, pass.statuses.len()), (0, 0));

        let settings = AgentSettings { log_filter: Some("debug".into()), ..Default::default() };
        store.create(SETTINGS_ID, settings).unwrap();
        let pass = reconciler.reconcile(&store).await.unwrap();
        assert_eq!(pass.changes, 1);
        assert_eq!(log.active(), "debug");
        // Idempotent: a second pass changes nothing.
        assert_eq!(reconciler.reconcile(&store).await.unwrap().changes, 0);

        store.delete::<AgentSettings>(SETTINGS_ID, false).unwrap();
        assert_eq!(reconciler.reconcile(&store).await.unwrap().changes, 1);
        assert_eq!(log.active(), "info");
    }
}
