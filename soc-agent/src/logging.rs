//! `tracing` setup: pretty or JSON lines on stderr, with a filter that can be replaced at run time (the
//! `log_filter` agent setting).

use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

/// Changes the active log filter.
#[derive(Debug)]
pub struct LogControl {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    active: Mutex<String>,
}

impl LogControl {
    /// Installs the global subscriber. `RUST_LOG`, when set, overrides `level` at start.
    pub fn init(format: LogFormat, level: &str) -> Result<Self, String> {
        let level = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| level.to_owned());
        let filter: EnvFilter = level.parse().map_err(|e| format!("log filter {level:?}: {e}"))?;
        let (filter, handle) = reload::Layer::new(filter);
        let registry = tracing_subscriber::registry().with(filter);
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let installed = match format {
            LogFormat::Pretty => registry.with(fmt.with_target(true)).try_init(),
            LogFormat::Json => registry.with(fmt.json().flatten_event(true).with_current_span(true)).try_init(),
        };
        installed.map_err(|e| format!("installing the log subscriber: {e}"))?;
        Ok(Self { handle: Some(handle), active: Mutex::new(level) })
    }

    /// A control that changes nothing, for tests that do not own the global subscriber.
    pub fn detached(level: &str) -> Self {
        Self { handle: None, active: Mutex::new(level.to_owned()) }
    }

    /// The filter directive in force.
    pub fn active(&self) -> String {
        self.active.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Replaces the filter. Returns false when `directive` was already active (nothing changed).
    pub fn apply(&self, directive: &str) -> Result<bool, String> {
        let mut active = self.active.lock().map_err(|_| "log control lock poisoned".to_owned())?;
        if *active == directive {
            return Ok(false);
        }
        let filter: EnvFilter = directive.parse().map_err(|e| format!("log filter {directive:?}: {e}"))?;
        if let Some(handle) = &self.handle {
            handle.reload(filter).map_err(|e| format!("reloading the log filter: {e}"))?;
        }
        directive.clone_into(&mut active);
        Ok(true)
    }
}
