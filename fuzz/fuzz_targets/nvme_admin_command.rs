//! Arbitrary 64-byte submission queue entries through a controller's admin and fabrics property handlers, on
//! both an I/O controller with a namespace and a discovery controller: every command must complete with a
//! status (or be held as an event request), never panic.
#![no_main]

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use dpu_nvme::spec::Sqe;
use dpu_storage::bdev::MallocVolume;
use dpu_storage::target::{Controller, Namespace, Subsystem, Target};
use libfuzzer_sys::fuzz_target;
use zerocopy::FromBytes;

fn controllers() -> &'static (Arc<Controller>, Arc<Controller>) {
    static CONTROLLERS: OnceLock<(Arc<Controller>, Arc<Controller>)> = OnceLock::new();
    CONTROLLERS.get_or_init(|| {
        let target = Target::new();
        let subsystem = Arc::new(Subsystem::new("s", "nqn.2026-11.io.dpu-agent:fuzz", "FUZZ", "fuzz"));
        subsystem.set_hosts(true, &BTreeSet::new());
        let volume = Arc::new(MallocVolume::new(512, 2048));
        let stats = target.stats().for_volume("v");
        subsystem.set_namespaces(vec![Arc::new(Namespace { nsid: 1, volume_id: "v".into(), volume, uuid: [7; 16], stats })]);
        target.registry().insert(subsystem.clone());
        let local = "127.0.0.1:4420".parse().unwrap();
        let host = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000000".to_owned();
        let (io, _) = Controller::new(1, host.clone(), [0; 16], Some(subsystem), target.clone(), local, 0);
        let (discovery, _) = Controller::new(2, host, [0; 16], None, target, local, 0);
        (io, discovery)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok((sqe, _)) = Sqe::read_from_prefix(data) else { return };
    let (io, discovery) = controllers();
    for controller in [io, discovery] {
        if sqe.is_fabrics() {
            let _ = controller.property(&sqe);
        } else {
            let _ = controller.admin(&sqe);
        }
    }
});
