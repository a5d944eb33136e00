//! Load balancing over a cluster's endpoints: smooth weighted round robin (nginx), power-of-two-choices least
//! request, a ketama hash ring, and weighted random.
//!
//! A [`Balancer`] is built from the endpoint list of one cluster configuration and rebuilt on every update; the
//! live state it consults (availability, load) comes through [`Members`] at pick time.

use std::net::SocketAddr;
use std::sync::Mutex;

use crate::model::{HashOn, LbPolicy};

/// Virtual nodes per unit of weight on the hash ring.
const VNODES_PER_WEIGHT: usize = 100;
/// Upper bound on ring entries, so a huge cluster does not cost megabytes of ring.
const MAX_RING_ENTRIES: usize = 1 << 17;
/// Weighted-random draws that may land on unavailable endpoints before falling back to a scan of the available
/// ones.
const RANDOM_DRAWS: usize = 8;

/// Live view of a cluster's endpoints, indexed like the list the balancer was built from.
pub(crate) trait Members {
    fn len(&self) -> usize;
    fn weight(&self, i: usize) -> u32;
    /// May take new requests: admin healthy, actively healthy, not ejected, not excluded by the caller.
    fn available(&self, i: usize) -> bool;
    /// Outstanding work: `(active requests + 1) × latency estimate`. The balancer divides by the weight.
    fn load(&self, i: usize) -> f64;
}

/// A compiled load-balancing policy.
#[derive(Debug)]
pub(crate) struct Balancer {
    kind: Kind,
    /// Running sum of weights, for weighted random draws by binary search.
    cumulative: Vec<u64>,
}

#[derive(Debug)]
enum Kind {
    RoundRobin { current: Mutex<Vec<i64>> },
    LeastRequest,
    RingHash { hash_on: HashOn, ring: Vec<(u64, u32)> },
    Random,
}

impl Balancer {
    /// `endpoints`: address and weight of each endpoint, in member order.
    pub(crate) fn new(policy: &LbPolicy, endpoints: &[(SocketAddr, u32)]) -> Balancer {
        let mut total = 0u64;
        let cumulative = endpoints
            .iter()
            .map(|(_, w)| {
                total += u64::from(*w);
                total
            })
            .collect();
        let kind = match policy {
            LbPolicy::RoundRobin => Kind::RoundRobin { current: Mutex::new(vec![0; endpoints.len()]) },
            LbPolicy::LeastRequest => Kind::LeastRequest,
            LbPolicy::RingHash { hash_on } => Kind::RingHash { hash_on: hash_on.clone(), ring: build_ring(endpoints) },
            LbPolicy::Random => Kind::Random,
        };
        Balancer { kind, cumulative }
    }

    /// What a ring-hash balancer hashes on; `None` for the other policies.
    pub(crate) fn hash_on(&self) -> Option<&HashOn> {
        match &self.kind {
            Kind::RingHash { hash_on, .. } => Some(hash_on),
            _ => None,
        }
    }

    /// Picks an available member. `key` is the request's hash key (ring hash only; without one the ring falls back
    /// to a weighted random pick).
    pub(crate) fn pick(&self, members: &impl Members, key: Option<u64>) -> Option<usize> {
        if members.len() == 0 {
            return None;
        }
        match &self.kind {
            Kind::RoundRobin { current } => {
                let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
                smooth_round_robin(&mut current, members)
            }
            Kind::LeastRequest => self.least_request(members),
            Kind::RingHash { ring, .. } => match key {
                Some(key) => ring_lookup(ring, key, members),
                None => self.weighted_random(members),
            },
            Kind::Random => self.weighted_random(members),
        }
    }

    /// Weighted random: a few draws over all members by cumulative weight, then a weighted draw over the available
    /// ones only (so a mostly ejected cluster still picks fairly among what is left).
    fn weighted_random(&self, members: &impl Members) -> Option<usize> {
        let total = *self.cumulative.last()?;
        if total == 0 || self.cumulative.len() != members.len() {
            return None;
        }
        for _ in 0..RANDOM_DRAWS {
            let r = fastrand::u64(0..total);
            let i = self.cumulative.partition_point(|&c| c <= r);
            if members.available(i) {
                return Some(i);
            }
        }
        let available_total: u64 =
            (0..members.len()).filter(|&i| members.available(i)).map(|i| u64::from(members.weight(i))).sum();
        if available_total == 0 {
            return None;
        }
        let mut r = fastrand::u64(0..available_total);
        for i in (0..members.len()).filter(|&i| members.available(i)) {
            let w = u64::from(members.weight(i));
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }

    /// Power of two choices: two weighted random picks, the one with the lower `load / weight` wins.
    fn least_request(&self, members: &impl Members) -> Option<usize> {
        let a = self.weighted_random(members)?;
        let mut b = a;
        for _ in 0..RANDOM_DRAWS {
            b = self.weighted_random(members)?;
            if b != a {
                break;
            }
        }
        if a == b {
            return Some(a);
        }
        let cost = |i: usize| members.load(i) / f64::from(members.weight(i).max(1));
        Some(if cost(b) < cost(a) { b } else { a })
    }
}

/// nginx's smooth weighted round robin: every available member gains its weight, the richest is picked and pays
/// the total. Over a cycle each member is picked in proportion to its weight, interleaved rather than in bursts.
fn smooth_round_robin(current: &mut [i64], members: &impl Members) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for i in 0..current.len().min(members.len()) {
        if !members.available(i) {
            continue;
        }
        let w = i64::from(members.weight(i));
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let best = best?;
    current[best] -= total;
    Some(best)
}

/// Ring entries `(hash, member index)`, sorted. Points are placed by hashing `"{address}_{n}"`, so they depend only
/// on the endpoint address and weight: adding or removing one endpoint moves about `1/n` of the keys.
fn build_ring(endpoints: &[(SocketAddr, u32)]) -> Vec<(u64, u32)> {
    let total_weight: usize = endpoints.iter().map(|(_, w)| *w as usize).sum();
    if total_weight == 0 {
        return Vec::new();
    }
    let per_weight = (MAX_RING_ENTRIES / total_weight).clamp(1, VNODES_PER_WEIGHT);
    let mut ring = Vec::with_capacity(total_weight * per_weight);
    for (i, (addr, weight)) in endpoints.iter().enumerate() {
        let label = addr.to_string();
        for n in 0..(*weight as usize * per_weight) {
            let point = hash_bytes(format!("{label}_{n}").as_bytes());
            ring.push((point, i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// The first ring point at or after `key` (wrapping) whose member is available.
fn ring_lookup(ring: &[(u64, u32)], key: u64, members: &impl Members) -> Option<usize> {
    if ring.is_empty() {
        return None;
    }
    let start = ring.partition_point(|&(h, _)| h < key);
    (0..ring.len())
        .map(|k| ring[(start + k) % ring.len()].1 as usize)
        .find(|&i| i < members.len() && members.available(i))
}

/// 64-bit FNV-1a with a murmur3 finaliser: stable across builds and releases (the ring must map keys the same way
/// in every proxy instance), and well mixed even for inputs differing in one character.
pub(crate) fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Fake {
        weights: Vec<u32>,
        down: Vec<bool>,
        load: Vec<f64>,
    }

    impl Fake {
        fn new(weights: &[u32]) -> Fake {
            Fake { weights: weights.to_vec(), down: vec![false; weights.len()], load: vec![1.0; weights.len()] }
        }
        fn endpoints(&self) -> Vec<(SocketAddr, u32)> {
            self.weights.iter().enumerate().map(|(i, &w)| (addr(i), w)).collect()
        }
    }

    impl Members for Fake {
        fn len(&self) -> usize {
            self.weights.len()
        }
        fn weight(&self, i: usize) -> u32 {
            self.weights[i]
        }
        fn available(&self, i: usize) -> bool {
            !self.down[i]
        }
        fn load(&self, i: usize) -> f64 {
            self.load[i]
        }
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080))
    }

    fn counts(balancer: &Balancer, members: &Fake, picks: usize, key: impl Fn(usize) -> Option<u64>) -> Vec<usize> {
        let mut counts = vec![0; members.len()];
        for n in 0..picks {
            counts[balancer.pick(members, key(n)).expect("a pick")] += 1;
        }
        counts
    }

    fn assert_shares(counts: &[usize], weights: &[u32], tolerance: f64) {
        let total: usize = counts.iter().sum();
        let weight_total: u32 = weights.iter().sum();
        for (i, (&c, &w)) in counts.iter().zip(weights).enumerate() {
            let expected = f64::from(w) / f64::from(weight_total);
            let got = c as f64 / total as f64;
            assert!((got - expected).abs() <= tolerance, "member {i}: share {got:.3}, expected {expected:.3}");
        }
    }

    #[test]
    fn round_robin_is_exact_and_smooth() {
        let members = Fake::new(&[5, 1, 1]);
        let balancer = Balancer::new(&LbPolicy::RoundRobin, &members.endpoints());
        let seq: Vec<usize> = (0..7).map(|_| balancer.pick(&members, None).unwrap()).collect();
        // nginx's example: weights 5,1,1 give a a b a c a a (interleaved, not aaaaabc).
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        let c = counts(&balancer, &members, 7000, |_| None);
        assert_eq!(c, vec![5000, 1000, 1000]);
    }

    #[test]
    fn round_robin_skips_unavailable() {
        let mut members = Fake::new(&[1, 2, 3]);
        members.down[2] = true;
        let balancer = Balancer::new(&LbPolicy::RoundRobin, &members.endpoints());
        assert_eq!(counts(&balancer, &members, 300, |_| None), vec![100, 200, 0]);
        members.down = vec![true; 3];
        assert_eq!(balancer.pick(&members, None), None);
    }

    #[test]
    fn random_follows_weights() {
        let weights = [1, 2, 3, 4];
        let members = Fake::new(&weights);
        let balancer = Balancer::new(&LbPolicy::Random, &members.endpoints());
        assert_shares(&counts(&balancer, &members, 40_000, |_| None), &weights, 0.02);
    }

    #[test]
    fn random_with_most_members_down_stays_fair() {
        let mut members = Fake::new(&[1; 100]);
        for i in 2..100 {
            members.down[i] = true;
        }
        let balancer = Balancer::new(&LbPolicy::Random, &members.endpoints());
        let c = counts(&balancer, &members, 10_000, |_| None);
        assert_eq!(c[0] + c[1], 10_000);
        assert!((4_000..=6_000).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn least_request_follows_weights_when_idle() {
        let weights = [1, 3];
        let members = Fake::new(&weights);
        let balancer = Balancer::new(&LbPolicy::LeastRequest, &members.endpoints());
        // Equal load: per-weight cost favours the heavier endpoint, so it gets at least its weighted share.
        let c = counts(&balancer, &members, 10_000, |_| None);
        assert!(c[1] > 7_500, "{c:?}");
    }

    #[test]
    fn least_request_prefers_the_less_loaded() {
        let mut members = Fake::new(&[1; 4]);
        members.load = vec![50.0, 1.0, 50.0, 50.0];
        let balancer = Balancer::new(&LbPolicy::LeastRequest, &members.endpoints());
        let c = counts(&balancer, &members, 10_000, |_| None);
        // Member 1 wins every comparison it is part of: it appears in about 1 - (3/4)² of the draws, plus the
        // draws where it is picked twice.
        assert!(c[1] > 4_000, "{c:?}");
        for i in [0, 2, 3] {
            assert!(c[i] < c[1] / 2, "{c:?}");
        }
        // A single available member is always chosen.
        members.down = vec![true, true, false, true];
        assert_eq!(balancer.pick(&members, None), Some(2));
    }

    #[test]
    fn ring_hash_is_consistent_and_weighted() {
        let weights = [1, 1, 2];
        let members = Fake::new(&weights);
        let policy = LbPolicy::RingHash { hash_on: HashOn::SourceIp };
        let balancer = Balancer::new(&policy, &members.endpoints());
        let key = |n: usize| Some(hash_bytes(format!("client-{n}").as_bytes()));
        for n in 0..100 {
            assert_eq!(balancer.pick(&members, key(n)), balancer.pick(&members, key(n)));
        }
        assert_shares(&counts(&balancer, &members, 20_000, key), &weights, 0.05);
    }

    #[test]
    fn ring_hash_moves_about_one_nth_of_keys_when_an_endpoint_joins() {
        let policy = LbPolicy::RingHash { hash_on: HashOn::Header { name: "x-user".into() } };
        let before = Fake::new(&[1; 10]);
        let after = Fake::new(&[1; 11]);
        let ring_before = Balancer::new(&policy, &before.endpoints());
        let ring_after = Balancer::new(&policy, &after.endpoints());
        let keys = 20_000;
        let mut moved = 0;
        let mut moved_to_new = 0;
        for n in 0..keys {
            let key = Some(hash_bytes(format!("user-{n}").as_bytes()));
            let a = ring_before.pick(&before, key).unwrap();
            let b = ring_after.pick(&after, key).unwrap();
            if a != b {
                moved += 1;
                if b == 10 {
                    moved_to_new += 1;
                }
            }
        }
        let share = f64::from(moved) / f64::from(keys);
        assert!((0.05..=0.14).contains(&share), "moved {share:.3} of keys, expected about 1/11");
        assert_eq!(moved, moved_to_new, "keys only move to the new endpoint");
    }

    #[test]
    fn ring_hash_walks_past_unavailable_endpoints() {
        let mut members = Fake::new(&[1; 5]);
        let policy = LbPolicy::RingHash { hash_on: HashOn::SourceIp };
        let balancer = Balancer::new(&policy, &members.endpoints());
        let keys: Vec<u64> = (0..2000).map(|n| hash_bytes(format!("k{n}").as_bytes())).collect();
        let first: Vec<usize> = keys.iter().map(|&k| balancer.pick(&members, Some(k)).unwrap()).collect();
        members.down[3] = true;
        let mut per: HashMap<usize, usize> = HashMap::new();
        for (&k, &was) in keys.iter().zip(&first) {
            let now = balancer.pick(&members, Some(k)).unwrap();
            assert_ne!(now, 3);
            if was != 3 {
                assert_eq!(now, was, "keys of healthy endpoints stay put");
            } else {
                *per.entry(now).or_default() += 1;
            }
        }
        // The displaced keys spread over the others rather than landing on one neighbour.
        assert!(per.len() >= 3, "{per:?}");
        members.down = vec![true; 5];
        assert_eq!(balancer.pick(&members, Some(keys[0])), None);
    }

    #[test]
    fn ring_size_is_bounded() {
        let ring_len = |n: usize, weight: u32| {
            let endpoints: Vec<(SocketAddr, u32)> = (0..n).map(|i| (addr(i), weight)).collect();
            match Balancer::new(&LbPolicy::RingHash { hash_on: HashOn::SourceIp }, &endpoints).kind {
                Kind::RingHash { ring, .. } => ring.len(),
                other => panic!("ring hash policy built {other:?}"),
            }
        };
        assert_eq!(ring_len(10, 1), 10 * VNODES_PER_WEIGHT);
        assert_eq!(ring_len(100, 16), MAX_RING_ENTRIES / 1600 * 1600);
        // At least one point per weight unit, however large the cluster.
        assert_eq!(ring_len(2000, 128), 2000 * 128);
    }
}
