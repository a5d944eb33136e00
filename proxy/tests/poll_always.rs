//! Poll mode `always`: within the window after traffic, ready sockets are served by workers that never park.

mod poll_support;

use dpu_proxy::poll::{Policy, StartError, start};
use poll_support::{Client, WINDOW, counting, echo, parks, runtime};
use prometheus_client::metrics::counter::Counter;

#[test]
fn traffic_is_served_without_parking_until_the_window_passes() {
    let runtime = runtime();
    let handle = runtime.handle().clone();
    let awake = Counter::<f64>::default();
    let workers = runtime.block_on(async { start(Policy::Always, WINDOW, counting(&awake)) }).unwrap();
    assert_eq!(workers, 2);
    let again = runtime.block_on(async { start(Policy::InFlight, WINDOW, counting(&awake)) });
    assert_eq!(again, Err(StartError::AlreadyStarted));
    let address = echo(&runtime);

    // Nothing has moved yet: the pollers sleep from the start.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(awake.get(), 0.0, "no awake time accrues before any traffic");

    for spell in 1..=2u32 {
        let mut client = Client::connect(address);
        // The first traffic wakes a parked worker, which wakes the pollers; they spread over the workers (a worker
        // holding two lets the other steal one) within a few messages.
        client.pings(5);
        // From then on, without polling, every message would wake a parked worker.
        let before = parks(&handle);
        client.pings(20);
        assert_eq!(parks(&handle), before, "spell {spell}: a worker parked between messages");

        // After the window the pollers sleep, the workers park, and the spell is accounted: two workers for
        // about the window each, plus the traffic.
        std::thread::sleep(WINDOW + std::time::Duration::from_millis(500));
        assert!(parks(&handle) > before, "spell {spell}: the workers parked after the window");
        let spent = awake.get();
        let windows = 2.0 * WINDOW.as_secs_f64() * f64::from(spell);
        assert!(
            spent >= 0.9 * windows && spent < 2.0 * windows,
            "spell {spell}: {spent} s awake, for {windows} s of windows"
        );
    }
}
