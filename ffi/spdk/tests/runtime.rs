//! The bridge, a Rust bdev and an SPDK malloc bdev, against a real SPDK started once for this test binary
//! (no hugepages, no PCI).

use std::sync::{Arc, Mutex, OnceLock};

use dpu_spdk::bdev::{self, BdevIo, BlockDevice, DescOp, DmaBuf, IoType};
use dpu_spdk::{Completion, Options, Spdk};

fn spdk() -> &'static Spdk {
    static SPDK: OnceLock<Spdk> = OnceLock::new();
    SPDK.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dpu-spdk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("spdk.json");
        std::fs::write(
            &config,
            r#"{"subsystems":[{"subsystem":"bdev","config":[
                {"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":2048,"block_size":512}}]}]}"#,
        )
        .expect("write config");
        let options = Options {
            name: "dpu-spdk-test".into(),
            mem_size_mib: 512,
            json_config: Some(config),
            ..Default::default()
        };
        Spdk::start(&options).expect("SPDK starts without hugepages")
    })
}

/// A Rust bdev over memory that counts what it serves.
#[derive(Debug)]
struct Memory {
    data: Mutex<Vec<u8>>,
    served: Mutex<Vec<IoType>>,
}

impl BlockDevice for Memory {
    fn block_size(&self) -> u32 {
        512
    }
    fn num_blocks(&self) -> u64 {
        64
    }
    fn supports(&self, io: IoType) -> bool {
        matches!(io, IoType::Read | IoType::Write | IoType::Flush)
    }
    fn submit(&self, mut io: BdevIo) {
        self.served.lock().unwrap().push(io.kind());
        let start = io.offset_blocks() as usize * 512;
        let len = io.num_blocks() as usize * 512;
        let ok = {
            let mut data = self.data.lock().unwrap();
            match io.kind() {
                IoType::Read => io.scatter(&data[start..start + len]) == len,
                IoType::Write => io.gather(&mut data[start..start + len]) == len,
                _ => true,
            }
        };
        // Complete from another thread, as a tokio-backed device does.
        std::thread::spawn(move || io.complete(ok));
    }
}

/// Writes `pattern` over two blocks at `lba` of the bdev `name`, reads them back.
async fn write_read(name: &'static str, lba: u64, pattern: u8) -> Result<Vec<u8>, String> {
    spdk()
        .run_async(move |on, done: Completion<Result<Vec<u8>, String>>| {
            let desc = match bdev::Desc::open(on, name, true) {
                Ok(d) => d,
                Err(e) => return done.complete(Err(e.to_string())),
            };
            let mut buf = DmaBuf::zeroed(1024).expect("dma");
            buf.as_mut_slice().fill(pattern);
            let desc = Arc::new(desc);
            let reader = desc.clone();
            desc.write(on, lba, buf, move |on, _, ok| {
                if !ok {
                    return done.complete(Err("write failed".into()));
                }
                let back = DmaBuf::zeroed(1024).expect("dma");
                let closer = reader.clone();
                reader.read(on, lba, back, move |on, buf, ok| {
                    if let Ok(desc) = Arc::try_unwrap(closer) {
                        desc.close(on);
                    }
                    done.complete(if ok { Ok(buf.as_slice().to_vec()) } else { Err("read failed".into()) })
                });
            });
        })
        .await
        .expect("SPDK running")
}

/// SPDK runs once per process and must be stopped before the process exits: one test, its parts in order.
#[tokio::test]
async fn spdk_runtime() {
    bridge_runs_closures_on_the_application_thread().await;
    malloc_bdev_from_the_json_config_round_trips().await;
    rust_bdev_serves_spdk_io_and_unregisters().await;
    spdk().stop();
    let err = spdk().run(|_| ()).await.expect_err("stopped");
    assert!(matches!(err, dpu_spdk::Error::Stopped), "{err}");
}

async fn bridge_runs_closures_on_the_application_thread() {
    let spdk = spdk();
    let name = spdk.run(|_| std::thread::current().name().map(str::to_owned)).await.expect("run");
    assert_eq!(name.as_deref(), Some("spdk-reactor"));
    let caller = std::thread::current().id();
    let other = spdk.run_blocking(move |_| std::thread::current().id() != caller).expect("run_blocking");
    assert!(other);
}

async fn malloc_bdev_from_the_json_config_round_trips() {
    let data = write_read("Malloc0", 10, 0x5a).await.expect("I/O on Malloc0");
    assert!(data.iter().all(|&b| b == 0x5a));
    let err = write_read("NoSuchBdev", 0, 1).await.expect_err("missing bdev");
    assert!(err.contains("spdk_bdev_open_ext"), "{err}");
}

async fn rust_bdev_serves_spdk_io_and_unregisters() {
    let device = Arc::new(Memory { data: Mutex::new(vec![0; 64 * 512]), served: Mutex::new(Vec::new()) });
    let dev: Arc<dyn BlockDevice> = device.clone();
    let registered = spdk()
        .run(move |on| bdev::register(on, "RustMem0", "dpu memory", Some([7; 16]), dev))
        .await
        .expect("run")
        .expect("register");
    assert_eq!(registered.name(), "RustMem0");

    let data = write_read("RustMem0", 3, 0xc3).await.expect("I/O on the Rust bdev");
    assert!(data.iter().all(|&b| b == 0xc3));
    assert!(device.data.lock().unwrap()[3 * 512..5 * 512].iter().all(|&b| b == 0xc3));
    assert!(device.data.lock().unwrap()[..3 * 512].iter().all(|&b| b == 0));
    // SPDK's examine reads the new bdev first (partition tables); our write and read come last.
    assert!(device.served.lock().unwrap().ends_with(&[IoType::Write, IoType::Read]), "{:?}", device.served);

    // Unmap is not supported by this device: SPDK says so, and the descriptor reports it.
    let unmap = spdk()
        .run(|on| {
            let desc = bdev::Desc::open(on, "RustMem0", false).expect("open");
            let supported = desc.supports(on, DescOp::Unmap);
            desc.close(on);
            supported
        })
        .await
        .expect("run");
    assert!(!unmap);

    spdk().run_async(move |on, done| registered.unregister(on, done)).await.expect("run").expect("unregister");
    let err = write_read("RustMem0", 0, 1).await.expect_err("gone");
    assert!(err.contains("spdk_bdev_open_ext"), "{err}");
}
