//! Poll mode `in_flight`: workers poll while an HTTP request is in flight, within the window after traffic, and
//! park between requests.

mod poll_support;

use std::time::Duration;

use dpu_proxy::poll::{Policy, start};
use poll_support::{Client, WINDOW, counting, echo, parks, runtime};
use prometheus_client::metrics::counter::Counter;

#[test]
fn workers_poll_only_while_a_request_is_in_flight() {
    let runtime = runtime();
    let handle = runtime.handle().clone();
    let awake = Counter::<f64>::default();
    runtime.block_on(async { start(Policy::InFlight, WINDOW, counting(&awake)) }).unwrap();
    let address = echo(&runtime);
    let mut client = Client::connect(address);

    // Traffic without a request in flight: the workers keep parking, one wake-up per message.
    client.pings(5);
    let before = parks(&handle);
    client.pings(10);
    // (At least one park per message; a message's park may fall either side of a reading.)
    assert!(parks(&handle) >= before + 8, "without a request in flight every message wakes a parked worker");
    assert_eq!(awake.get(), 0.0, "and no poller woke up");

    // A request in flight: its traffic is served by polling workers.
    client.send(b"open");
    client.pings(5);
    let before = parks(&handle);
    client.pings(20);
    assert_eq!(parks(&handle), before, "a worker parked while a request was in flight");

    // The request ends: back to parking.
    client.send(b"shut");
    client.pings(2);
    let before = parks(&handle);
    client.pings(10);
    assert!(parks(&handle) >= before + 8, "after the request every message wakes a parked worker again");
    let spent = awake.get();
    assert!(spent > 0.0, "the request's spell was accounted");

    // A request in flight but nothing moving: polling stops once the window has passed.
    client.send(b"open");
    std::thread::sleep(Duration::from_millis(200));
    let before = parks(&handle);
    std::thread::sleep(WINDOW + Duration::from_millis(500));
    assert!(parks(&handle) > before, "the workers parked once the window passed, the request still open");
    let windows = 2.0 * WINDOW.as_secs_f64();
    let stalled = awake.get() - spent;
    // Each poller counts from its own wake-up, the second slightly after the first stamped the traffic.
    assert!(
        stalled >= 0.9 * windows && stalled < 2.0 * windows,
        "{stalled} s awake for a stalled request, for {windows} s of windows"
    );
    client.send(b"shut");
}
