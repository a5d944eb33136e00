//! How results are printed: tables with headers for lists, `key  value` lines for one object, or the same data as
//! JSON or YAML (`-o`); colours only on a terminal; sizes in binary units; the exit codes a script can rely on.

use std::fmt::Write as _;
use std::io::IsTerminal as _;

use serde_json::Value;

/// `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tables for lists, aligned fields for one object.
    Table,
    /// Tables with every field.
    Wide,
    Json,
    Yaml,
}

/// Exit codes: what a script can branch on.
pub mod exit {
    /// The agent answered with an error the codes below do not name, or the output could not be written.
    pub const FAILURE: u8 = 1;
    /// Bad arguments (clap's own code), an unknown kind, a verb the kind does not have.
    pub const USAGE: u8 = 2;
    /// NOT_FOUND.
    pub const NOT_FOUND: u8 = 3;
    /// ALREADY_EXISTS, or ABORTED (the object changed since it was read: expected generation).
    pub const CONFLICT: u8 = 4;
    /// FAILED_PRECONDITION: refused in the agent's current state (the reason names what is missing or in use).
    pub const PRECONDITION: u8 = 5;
    /// PERMISSION_DENIED or UNAUTHENTICATED: the role or certificate does not allow it.
    pub const DENIED: u8 = 6;
    /// The agent could not be reached, or UNAVAILABLE / DEADLINE_EXCEEDED: try again.
    pub const UNAVAILABLE: u8 = 7;
    /// INVALID_ARGUMENT or OUT_OF_RANGE: the request is wrong (the message names the field).
    pub const INVALID: u8 = 8;

    /// The exit code of a gRPC status.
    pub fn of(code: tonic::Code) -> u8 {
        use tonic::Code as C;
        match code {
            C::NotFound => NOT_FOUND,
            C::AlreadyExists | C::Aborted => CONFLICT,
            C::FailedPrecondition => PRECONDITION,
            C::PermissionDenied | C::Unauthenticated => DENIED,
            C::Unavailable | C::DeadlineExceeded => UNAVAILABLE,
            C::InvalidArgument | C::OutOfRange => INVALID,
            _ => FAILURE,
        }
    }

    /// The text for `--help`.
    pub const HELP: &str = "Exit codes: 0 success, 1 other failure, 2 bad arguments, 3 not found, 4 already exists or \
                            changed meanwhile, 5 refused in the current state (failed precondition), 6 permission \
                            denied, 7 agent unreachable or unavailable (retry), 8 invalid argument.";
}

/// Renders `value` as `format` asks.
pub fn render(value: &Value, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
        Format::Yaml => yaml(value),
        Format::Table | Format::Wide => match list_rows(value) {
            Some((_, rows)) => list_table(rows, format == Format::Wide, Colors::detect()),
            None => object_table(value),
        },
    }
}

/// The rows of a list answer: an object whose only array holds objects (`{"volumes": [...], ...}`).
fn list_rows(value: &Value) -> Option<(&str, &[Value])> {
    if let Value::Array(rows) = value {
        return rows.iter().all(Value::is_object).then_some(("", rows.as_slice()));
    }
    let map = value.as_object()?;
    let mut arrays = map.iter().filter(|(_, v)| v.is_array());
    let (key, rows) = arrays.next()?;
    let rows = rows.as_array()?;
    if arrays.next().is_some() || !rows.iter().all(Value::is_object) {
        return None;
    }
    // Other fields of a list answer are paging or totals, not objects: a list only when nothing else is an object.
    map.values().all(|v| !v.is_object()).then_some((key.as_str(), rows.as_slice()))
}

/// ANSI colours for states, on a terminal without NO_COLOR only.
#[derive(Debug, Clone, Copy)]
pub struct Colors(bool);

impl Colors {
    pub fn detect() -> Self {
        Self(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
    }

    fn state(self, state: &str, width: usize) -> String {
        let padded = format!("{state:<width$}");
        let code = match state {
            "ready" | "listening" | "up" => "32",
            "pending" | "draining" => "33",
            "error" | "down" => "31",
            _ => return padded,
        };
        if self.0 { format!("\x1b[{code}m{padded}\x1b[0m") } else { padded }
    }
}

/// A name without its collection: `volumes/db` → `db`, `subsystems/img/namespaces/n1` → `img/namespaces/n1`.
fn short_name(name: &str) -> &str {
    name.split_once('/').map_or(name, |(_, rest)| rest)
}

/// Cell text of a field: sizes in binary units, lists joined, nested objects as `k=v`.
fn cell(key: &str, value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) if is_size(key) => n.as_u64().map_or_else(|| n.to_string(), human_bytes),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(|v| cell(key, v)).collect::<Vec<_>>().join(","),
        Value::Object(map) => map
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| format!("{k}={}", cell(k, v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

fn is_size(key: &str) -> bool {
    key.ends_with("_bytes") || key == "size" || key == "bytes"
}

/// `1536` → `1.5 KiB`; whole numbers print without decimals.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A table with a header: NAME, STATE, the row's plain fields (every field when `wide`), REASON last.
fn list_table(rows: &[Value], wide: bool, colors: Colors) -> String {
    list_table_at(rows, wide, colors, time::OffsetDateTime::now_utc())
}

/// How long ago `created` (RFC 3339) was at `now`, as a person reads it: 45s, 12m, 5h, 3d.
fn age(created: &str, now: time::OffsetDateTime) -> String {
    let Ok(then) = time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339) else {
        return "-".into();
    };
    let s = (now - then).whole_seconds().max(0);
    if s < 120 {
        format!("{s}s")
    } else if s < 7200 {
        format!("{}m", s / 60)
    } else if s < 172_800 {
        format!("{}h", s / 3600)
    } else {
        format!("{}d", s / 86_400)
    }
}

fn list_table_at(rows: &[Value], wide: bool, colors: Colors, now: time::OffsetDateTime) -> String {
    if rows.is_empty() {
        return "No resources.\n".into();
    }
    // A row's spec (mesh objects) is one level down: its fields are the row's.
    let lifted: Vec<Value> = rows
        .iter()
        .map(|row| match (row.as_object(), row.get("spec").and_then(Value::as_object)) {
            (Some(map), Some(spec)) => {
                let mut flat = map.clone();
                flat.remove("spec");
                for (k, v) in spec {
                    flat.entry(k.clone()).or_insert_with(|| v.clone());
                }
                Value::Object(flat)
            }
            _ => row.clone(),
        })
        .collect();
    let rows = lifted.as_slice();
    // The row's name: its resource name, else the object it describes (stats rows).
    let name_key = ["name", "id", "volume", "image", "port", "tunnel", "listener", "cluster"]
        .into_iter()
        .find(|k| rows.iter().all(|r| r.get(k).is_some_and(Value::is_string)))
        .unwrap_or("name");
    let hidden = |k: &str| k == name_key || matches!(k, "status" | "state" | "reason");
    // Columns in the rows' (alphabetical) field order; default view: scalars and short lists, no generation.
    let mut fields: Vec<String> = Vec::new();
    for row in rows {
        for (k, v) in row.as_object().into_iter().flatten() {
            let long_list = v.as_array().is_some_and(|a| a.len() > 4 && a.iter().all(Value::is_number));
            let plain = !v.is_object() && !long_list && k != "generation";
            if !hidden(k) && (wide || plain) && !fields.contains(k) {
                fields.push(k.clone());
            }
        }
    }
    let name_of = |row: &Value| {
        row.get(name_key).and_then(Value::as_str).map_or_else(|| "-".into(), |n| short_name(n).to_string())
    };
    let state_of = |row: &Value| {
        row.pointer("/status/state").or_else(|| row.get("state")).and_then(Value::as_str).unwrap_or("-").to_string()
    };
    let reason_of = |row: &Value| {
        row.pointer("/status/reason").or_else(|| row.get("reason")).and_then(Value::as_str).unwrap_or("").to_string()
    };
    let has_state = rows.iter().any(|r| r.pointer("/status/state").or_else(|| r.get("state")).is_some());
    let has_reason = rows.iter().any(|r| !reason_of(r).is_empty());
    let created_of = |row: &Value| row.pointer("/status/create_time").and_then(Value::as_str).map(str::to_owned);
    let has_age = rows.iter().any(|r| created_of(r).is_some());
    let mut header =
        vec![if name_key == "name" || name_key == "id" { "NAME".to_string() } else { name_key.to_uppercase() }];
    if has_state {
        header.push("STATE".into());
    }
    if has_age {
        header.push("AGE".into());
    }
    header.extend(fields.iter().map(|f| f.strip_suffix("_bytes").unwrap_or(f).to_uppercase()));
    let mut table: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let mut cells = vec![name_of(row)];
            if has_state {
                cells.push(state_of(row));
            }
            if has_age {
                cells.push(created_of(row).map_or_else(|| "-".into(), |c| age(&c, now)));
            }
            cells.extend(fields.iter().map(|f| match row.get(f) {
                None => "-".into(),
                // A list of objects (endpoints, routes, ...) counts in a table; -o wide/yaml/json show them.
                Some(Value::Array(items)) if !wide && !items.is_empty() && items.iter().all(Value::is_object) => {
                    items.len().to_string()
                }
                Some(v) => cell(f, v),
            }));
            cells
        })
        .collect();
    table.insert(0, header);
    let widths: Vec<usize> =
        (0..table[0].len()).map(|i| table.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (n, row) in table.iter().enumerate() {
        let mut line = String::new();
        for (i, text) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            if has_state && i == 1 && n > 0 {
                line.push_str(&colors.state(text, widths[i]));
            } else {
                let _ = write!(line, "{text:<w$}", w = widths[i]);
            }
        }
        if has_reason {
            // In full, however long: the reason is what an operator acts on.
            line.push_str("  ");
            line.push_str(&if n == 0 { "REASON".to_string() } else { reason_of(&rows[n - 1]) });
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One object as aligned `key  value` lines; nested objects indented under their key.
fn object_table(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) => write_object(&mut out, map, 0),
        other => out = format!("{}\n", cell("", other)),
    }
    out
}

fn write_object(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    let width = map.keys().map(String::len).max().unwrap_or(0);
    // The name first and the status last; the rest alphabetically.
    let rank = |k: &str| match k {
        "name" => 0,
        "status" => 2,
        _ => 1,
    };
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by_key(|(k, _)| rank(k));
    for (key, v) in entries {
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                let _ = writeln!(out, "{:indent$}{key}:", "");
                write_object(out, inner, indent + 2);
            }
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
                let _ = writeln!(out, "{:indent$}{key}:", "");
                let table = list_table(items, false, Colors(false));
                for line in table.lines() {
                    let _ = writeln!(out, "{:indent$}  {line}", "");
                }
            }
            _ => {
                let _ = writeln!(out, "{:indent$}{key:<width$}  {}", "", cell(key, v));
            }
        }
    }
}

/// JSON data as YAML (block style; strings quoted when YAML would read them as something else).
pub fn yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => yaml_map(&mut out, map, 0),
        Value::Array(items) if !items.is_empty() => yaml_seq(&mut out, items, 0),
        other => {
            out.push_str(&yaml_scalar(other));
            out.push('\n');
        }
    }
    out
}

fn yaml_map(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    for (k, v) in map {
        let key = yaml_string(k);
        match v {
            Value::Object(m) if !m.is_empty() => {
                let _ = writeln!(out, "{:indent$}{key}:", "");
                yaml_map(out, m, indent + 2);
            }
            Value::Array(items) if !items.is_empty() => {
                let _ = writeln!(out, "{:indent$}{key}:", "");
                yaml_seq(out, items, indent);
            }
            other => {
                let _ = writeln!(out, "{:indent$}{key}: {}", "", yaml_scalar(other));
            }
        }
    }
}

fn yaml_seq(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        match item {
            Value::Object(m) if !m.is_empty() => {
                // The first key on the dash's line, the rest under it.
                let mut nested = String::new();
                yaml_map(&mut nested, m, indent + 2);
                let _ = write!(out, "{:indent$}- {}", "", &nested[indent + 2..]);
            }
            Value::Array(inner) if !inner.is_empty() => {
                let _ = writeln!(out, "{:indent$}-", "");
                yaml_seq(out, inner, indent + 2);
            }
            other => {
                let _ = writeln!(out, "{:indent$}- {}", "", yaml_scalar(other));
            }
        }
    }
}

fn yaml_scalar(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => yaml_string(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A string as a YAML scalar: plain when YAML reads it back as the same string, else double-quoted (JSON's
/// escapes are valid YAML).
fn yaml_string(s: &str) -> String {
    let reserved = matches!(
        s.to_ascii_lowercase().as_str(),
        "" | "~" | "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | ".nan" | ".inf" | "-.inf"
    );
    let numeric = s.parse::<f64>().is_ok() || s.starts_with("0x") || s.starts_with("0o");
    let special = s.starts_with(|c: char| "-?:,[]{}#&*!|>'\"%@` ".contains(c))
        || s.ends_with(' ')
        || s.contains(": ")
        || s.contains(" #")
        || s.chars().any(|c| c.is_control());
    if reserved || numeric || special { serde_json::to_string(s).unwrap_or_default() } else { s.to_string() }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn volumes() -> Value {
        json!({ "volumes": [
            { "name": "volumes/db", "size_bytes": 67108864u64, "block_size": 512, "backend": { "file": "/d/db.img" },
              "generation": 2, "status": { "state": "ready", "reason": "", "observed_generation": 2 } },
            { "name": "volumes/bad", "size_bytes": 1536u64, "block_size": 4096, "backend": { "file": "/nope" },
              "generation": 1, "status": { "state": "error", "reason": "opening /nope: No such file or directory", "observed_generation": 1 } },
        ]})
    }

    #[test]
    fn lists_are_tables_with_a_header_sizes_and_full_reasons() {
        let text = render(&volumes(), Format::Table);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME  STATE  BLOCK_SIZE  SIZE     REASON", "{text}");
        assert_eq!(lines[1], "db    ready  512         64 MiB", "{text}");
        assert_eq!(lines[2], "bad   error  4096        1.5 KiB  opening /nope: No such file or directory", "{text}");
        let wide = render(&volumes(), Format::Wide);
        assert!(wide.lines().next().unwrap().contains("BACKEND") && wide.contains("file=/d/db.img"), "{wide}");
        assert_eq!(render(&json!({ "volumes": [] }), Format::Table), "No resources.\n");
    }

    #[test]
    fn ages_count_from_the_creation_time() {
        let now = time::OffsetDateTime::parse("2026-01-03T12:00:00Z", &time::format_description::well_known::Rfc3339)
            .unwrap();
        assert_eq!(age("2026-01-03T11:59:15Z", now), "45s");
        assert_eq!(age("2026-01-03T11:48:00Z", now), "12m");
        assert_eq!(age("2026-01-03T07:00:00Z", now), "5h");
        assert_eq!(age("2025-12-31T11:00:00Z", now), "3d");
        assert_eq!(age("2026-01-03T12:00:09Z", now), "0s", "a clock behind the agent's");
        assert_eq!(age("yesterday", now), "-");
        let rows = json!([
            { "name": "volumes/a", "status": { "state": "ready", "create_time": "2026-01-03T11:00:00Z" } },
            { "name": "namespaces/x/1", "status": { "state": "ready" } },
        ]);
        let text = list_table_at(rows.as_array().unwrap(), false, Colors(false), now);
        assert_eq!(text, "NAME  STATE  AGE\na     ready  60m\nx/1   ready  -\n", "{text}");
    }

    #[test]
    fn one_object_prints_as_fields_and_the_machine_formats_round_trip() {
        let one = &volumes()["volumes"][1];
        let text = render(one, Format::Table);
        assert!(text.starts_with("name        volumes/bad\n"), "{text}");
        assert!(text.contains("size_bytes  1.5 KiB"), "{text}");
        assert!(text.ends_with("status:\n  observed_generation  1\n  reason               opening /nope: No such file or directory\n  state                error\n"), "{text}");
        let json_text = render(one, Format::Json);
        assert_eq!(serde_json::from_str::<Value>(&json_text).unwrap(), *one);
        let y = yaml(&json!({ "a": "true", "b": [1, { "c": "x: y", "d": null }], "e": "plain text", "f": "" }));
        assert_eq!(y, "a: \"true\"\nb:\n- 1\n- c: \"x: y\"\n  d: null\ne: plain text\nf: \"\"\n");
    }

    #[test]
    fn sizes_and_exit_codes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(3 * (1 << 20) / 2), "1.5 MiB");
        assert_eq!(exit::of(tonic::Code::NotFound), exit::NOT_FOUND);
        assert_eq!(exit::of(tonic::Code::Unavailable), exit::UNAVAILABLE);
        assert_eq!(exit::of(tonic::Code::Internal), exit::FAILURE);
    }
}
