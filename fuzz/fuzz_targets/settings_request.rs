//! Bytes from the network decoded as an `UpdateAgentSettingsRequest` and converted to the domain type: must
//! either validate or be rejected with a message, never panic; anything accepted must pass validation again.
#![no_main]

use dpu_agent::settings::AgentSettings;
use dpu_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = pb::UpdateAgentSettingsRequest::decode(data) else { return };
    let _ = dpu_agent::api::FieldMask::parse(request.update_mask, &["log_filter", "labels"]);
    if let Some(settings) = request.settings {
        if let Ok(domain) = AgentSettings::try_from(settings) {
            assert!(domain.validate().is_ok());
        }
    }
});
