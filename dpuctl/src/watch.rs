//! `dpuctl watch`: the agent's change feed (AgentService.WatchEvents), one line per event, resumed after every
//! reconnection from the last cursor.

use std::future::Future;
use std::io::Write as _;
use std::time::Duration;

use dpu_proto::v1 as pb;
use dpu_proto::v1::agent_service_client::AgentServiceClient;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Only these collections (repeatable): volumes, subsystems, meshListeners, attachments, ipsecTunnels, ...
    #[arg(long = "kind")]
    kinds: Vec<String>,
    /// Go on after this cursor (the CURSOR of the last event seen) instead of from now.
    #[arg(long)]
    resume_after: Option<String>,
    /// Print each event's cursor.
    #[arg(long)]
    cursors: bool,
    /// Following a list just printed: no OPENED or BOOKMARK lines.
    #[arg(skip)]
    changes_only: bool,
}

impl WatchArgs {
    /// Every change of objects of `collection`, from now.
    pub fn of_kind(collection: &str) -> Self {
        Self { kinds: vec![collection.to_string()], resume_after: None, cursors: false, changes_only: true }
    }
}

/// The recent events of the object the feed calls `name` (what the agent still keeps), oldest first, as rows for
/// a table: time, event, generation, state, reason.
pub async fn history(channel: Channel, name: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let request = pb::WatchEventsRequest { names: vec![name.to_string()], replay: true, ..Default::default() };
    let mut stream = AgentServiceClient::new(channel).watch_events(request).await?.into_inner();
    let mut rows = Vec::new();
    while let Some(event) = stream.message().await? {
        match pb::WatchEventType::try_from(event.r#type).unwrap_or(pb::WatchEventType::Unspecified) {
            // The end of what the agent kept.
            pb::WatchEventType::Bookmark => break,
            pb::WatchEventType::Opened => {}
            _ => {
                let reason = event.status.as_ref().map_or(event.reason.clone(), |s| s.reason.clone());
                rows.push(json!({
                    "time": time(&event),
                    "event": event_type(&event),
                    "generation": event.generation,
                    "state": state(&event),
                    "reason": reason,
                }));
            }
        }
    }
    Ok(rows)
}

/// Follows the feed until interrupted. A broken stream is opened again after the last cursor seen, every second
/// while the agent is away.
pub async fn watch<F, Fut>(channel: Channel, reconnect: F, args: &WatchArgs, json: bool) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<Channel>>,
{
    let mut cursor = args.resume_after.clone().unwrap_or_default();
    let mut channel = Some(channel);
    let mut header = !json;
    loop {
        let ch = match channel.take() {
            Some(ch) => ch,
            None => match reconnect().await {
                Ok(ch) => ch,
                Err(e) => {
                    eprintln!("dpuctl: watch: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let request =
            pb::WatchEventsRequest { kinds: args.kinds.clone(), resume_after: cursor.clone(), ..Default::default() };
        let mut stream = match AgentServiceClient::new(ch).watch_events(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                anyhow::bail!("{}", status.message())
            }
            Err(status) => {
                eprintln!("dpuctl: watch: {}; retrying", status.message());
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let event = match stream.message().await {
                Ok(Some(event)) => event,
                Ok(None) => {
                    eprintln!("dpuctl: watch: the agent ended the stream; resuming");
                    break;
                }
                Err(status) => {
                    eprintln!("dpuctl: watch: the stream ended: {}; resuming", status.message());
                    break;
                }
            };
            cursor.clone_from(&event.cursor);
            let bookkeeping = matches!(
                pb::WatchEventType::try_from(event.r#type),
                Ok(pb::WatchEventType::Opened | pb::WatchEventType::Bookmark)
            );
            if args.changes_only && bookkeeping {
                continue;
            }
            let line = if json {
                serde_json::to_string(&event_json(&event))? + "\n"
            } else {
                let mut line = String::new();
                if std::mem::take(&mut header) {
                    line += &row(["TIME", "EVENT", "NAME", "GEN", "STATE", "REASON"], args.cursors.then_some("CURSOR"));
                }
                line + &event_row(&event, args.cursors)
            };
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
                // A reader that went away (`| head`) ends the watch.
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(e.into());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn event_type(event: &pb::WatchEvent) -> &'static str {
    match pb::WatchEventType::try_from(event.r#type).unwrap_or(pb::WatchEventType::Unspecified) {
        pb::WatchEventType::Opened => "OPENED",
        pb::WatchEventType::Created => "CREATED",
        pb::WatchEventType::Updated => "UPDATED",
        pb::WatchEventType::Deleted => "DELETED",
        pb::WatchEventType::Status => "STATUS",
        pb::WatchEventType::Relist => "RELIST",
        pb::WatchEventType::Bookmark => "BOOKMARK",
        pb::WatchEventType::Unspecified => "UNKNOWN",
    }
}

fn state(event: &pb::WatchEvent) -> &'static str {
    event.status.as_ref().map_or("", |s| {
        match pb::ResourceState::try_from(s.state).unwrap_or(pb::ResourceState::Unspecified) {
            pb::ResourceState::Pending => "pending",
            pb::ResourceState::Ready => "ready",
            pb::ResourceState::Error => "error",
            pb::ResourceState::Unspecified => "",
        }
    })
}

fn time(event: &pb::WatchEvent) -> String {
    event.time.as_ref().map_or_else(
        || "-".to_string(),
        |t| {
            let secs = t.seconds.rem_euclid(86_400);
            format!("{:02}:{:02}:{:02}.{:03}", secs / 3600, secs / 60 % 60, secs % 60, t.nanos / 1_000_000)
        },
    )
}

fn row<'a>(cells: [&'a str; 6], cursor: Option<&'a str>) -> String {
    let [time, kind, name, generation, state, reason] = cells;
    let mut line = format!("{time:<12}  {kind:<8}  {name:<40}  {generation:>4}  {state:<8}  {reason}");
    if let Some(cursor) = cursor {
        line = format!("{line}  {cursor}");
    }
    line.trim_end().to_string() + "\n"
}

fn event_row(event: &pb::WatchEvent, cursors: bool) -> String {
    let time = time(event);
    let generation = if event.name.is_empty() { String::new() } else { event.generation.to_string() };
    let reason = match (event.status.as_ref(), event.reason.as_str()) {
        (Some(status), _) => status.reason.clone(),
        (None, "") if event.name.is_empty() => format!("revision {}", event.revision),
        (None, reason) => reason.to_string(),
    };
    let name = if event.name.is_empty() { "-" } else { &event.name };
    row([&time, event_type(event), name, &generation, state(event), &reason], cursors.then_some(event.cursor.as_str()))
}

fn event_json(event: &pb::WatchEvent) -> serde_json::Value {
    json!({
        "type": event_type(event),
        "cursor": event.cursor,
        "name": event.name,
        "generation": event.generation,
        "revision": event.revision,
        "state": state(event),
        "reason": event.status.as_ref().map_or(event.reason.as_str(), |s| s.reason.as_str()),
        "subsystem": event.subsystem,
        "time": event.time.as_ref().map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_print_as_rows_under_a_header() {
        let header = row(["TIME", "EVENT", "NAME", "GEN", "STATE", "REASON"], None);
        assert!(header.starts_with("TIME") && header.contains("REASON"));
        let event = pb::WatchEvent {
            r#type: pb::WatchEventType::Status.into(),
            name: "volumes/db".into(),
            generation: 3,
            status: Some(pb::ResourceStatus {
                state: pb::ResourceState::Error.into(),
                reason: "opening /data/db.img: No such file or directory".into(),
                observed_generation: 3,
                ..pb::ResourceStatus::default()
            }),
            time: Some(prost_types::Timestamp { seconds: 3600 + 120 + 5, nanos: 7_000_000 }),
            cursor: "a-1-2".into(),
            ..pb::WatchEvent::default()
        };
        let line = event_row(&event, true);
        assert!(line.starts_with("01:02:05.007  STATUS    volumes/db"), "{line}");
        assert!(line.contains("   3  error     opening /data/db.img: No such file or directory  a-1-2"), "{line}");
        let opened = pb::WatchEvent { r#type: pb::WatchEventType::Opened.into(), revision: 9, ..Default::default() };
        assert!(event_row(&opened, false).contains("OPENED    -"), "{}", event_row(&opened, false));
        assert_eq!(event_json(&event)["state"], "error");
    }
}
