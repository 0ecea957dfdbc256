//! Server selection, pure and deterministic: Nginx's smooth weighted round robin and a
//! consistent-hash ring for `ip_hash`. A balancer works on member indexes of one upstream
//! and takes an `ok(index)` filter, so that callers skip servers that are down or were
//! already tried for this request.
//!
//! Why a ring (ketama) for `ip_hash`: it is what Nginx's `hash ... consistent` uses, so
//! operators know its behaviour; a server joining takes only its own share of clients, a
//! server leaving hands only its own clients over, spread over all the others (its virtual
//! nodes are scattered), and "the next distinct server on the ring" is a natural failover
//! order. Rendezvous hashing has the same properties but costs O(servers) per request;
//! Maglev is O(1) but moves a few extra clients on every change.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Virtual nodes per unit of weight on the `ip_hash` ring.
pub const POINTS_PER_WEIGHT: u32 = 160;

/// Chooses among a fixed set of members.
#[derive(Debug)]
pub enum Balancer {
    /// Smooth weighted round robin.
    RoundRobin(SmoothWrr),
    /// Consistent hashing of the client address.
    IpHash(Ring),
    /// Weighted power of two choices on in-flight requests.
    LeastRequest(LeastRequest),
}

impl Balancer {
    /// Picks a member for a client whose address hashes to `key`, among those for which
    /// `ok` holds; `load(member)` is its number of requests in flight.
    pub fn pick(
        &self,
        key: u64,
        ok: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u64,
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin(b) => b.pick(ok),
            Balancer::IpHash(b) => b.pick(key, ok),
            Balancer::LeastRequest(b) => b.pick(ok, load),
        }
    }
}

/// Envoy's LEAST_REQUEST: two members drawn at random, the one with fewer requests in
/// flight per unit of weight wins. O(1), and it avoids herding onto the single least-loaded
/// server that a full scan would cause when several proxies share a pool.
#[derive(Debug)]
pub struct LeastRequest {
    /// (member index, weight).
    members: Box<[(usize, u32)]>,
}

impl LeastRequest {
    /// A balancer over `(member index, weight)`.
    pub fn new(members: Vec<(usize, u32)>) -> LeastRequest {
        LeastRequest {
            members: members.into_boxed_slice(),
        }
    }

    /// The less loaded of two random members.
    pub fn pick(&self, ok: impl Fn(usize) -> bool, load: impl Fn(usize) -> u64) -> Option<usize> {
        let n = self.members.len();
        // (load + 1) / weight, compared without division.
        let better = |a: (usize, u32), b: (usize, u32)| {
            (load(a.0) + 1) * u64::from(b.1) <= (load(b.0) + 1) * u64::from(a.1)
        };
        if n >= 2 {
            let r = crate::timing::fast_random();
            let i = (r % n as u64) as usize;
            let mut j = ((r >> 32) % (n as u64 - 1)) as usize;
            if j >= i {
                j += 1;
            }
            let (a, b) = (self.members[i], self.members[j]);
            match (ok(a.0), ok(b.0)) {
                (true, true) => return Some(if better(a, b) { a.0 } else { b.0 }),
                (true, false) => return Some(a.0),
                (false, true) => return Some(b.0),
                (false, false) => {}
            }
        }
        // Few members available: the least loaded of those.
        self.members
            .iter()
            .copied()
            .filter(|m| ok(m.0))
            .reduce(|a, b| if better(a, b) { a } else { b })
            .map(|m| m.0)
    }
}

/// Nginx's smooth weighted round robin. The schedule for all members is computed once per
/// snapshot, so the common pick (every member available) is one atomic increment. When the
/// scheduled member is unavailable, Nginx's algorithm runs over the available members only
/// (under a short lock, never across an await).
#[derive(Debug)]
pub struct SmoothWrr {
    /// (member index, weight), in config order.
    members: Box<[(usize, u32)]>,
    schedule: Box<[u32]>,
    next: AtomicUsize,
    fallback: Mutex<Vec<i64>>,
}

impl SmoothWrr {
    /// A balancer over `(member index, weight)`; weights must be at least 1.
    pub fn new(members: Vec<(usize, u32)>) -> SmoothWrr {
        let schedule = smooth_schedule(&members);
        let n = members.len();
        SmoothWrr {
            members: members.into_boxed_slice(),
            schedule,
            next: AtomicUsize::new(0),
            fallback: Mutex::new(vec![0; n]),
        }
    }

    /// The next member.
    pub fn pick(&self, ok: impl Fn(usize) -> bool) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = self.schedule[n % self.schedule.len()] as usize;
        let member = self.members[slot].0;
        if ok(member) {
            return Some(member);
        }
        self.pick_among_available(&ok)
    }

    fn pick_among_available(&self, ok: &impl Fn(usize) -> bool) -> Option<usize> {
        let mut current = self.fallback.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (slot, &(member, weight)) in self.members.iter().enumerate() {
            if !ok(member) {
                continue;
            }
            current[slot] += i64::from(weight);
            total += i64::from(weight);
            if best.is_none_or(|b| current[slot] > current[b]) {
                best = Some(slot);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(self.members[b].0)
    }
}

/// One period of Nginx's smooth weighted round robin, as slots into `members`. Ties go to
/// the member listed first. Weights are reduced by their gcd first.
fn smooth_schedule(members: &[(usize, u32)]) -> Box<[u32]> {
    let g = members.iter().fold(0u32, |g, &(_, w)| gcd(g, w)).max(1);
    let weights: Vec<i64> = members.iter().map(|&(_, w)| i64::from(w / g)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out.into_boxed_slice()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A ketama-style ring: `POINTS_PER_WEIGHT × weight` points per member, placed by hashing
/// the member's `addr` as written, so every process with the same config builds the same
/// ring and maps every client the same way.
#[derive(Debug)]
pub struct Ring {
    /// (point, member index), sorted by point.
    points: Box<[(u64, u32)]>,
    members: Box<[usize]>,
}

impl Ring {
    /// A ring over `(member index, addr, weight)`.
    pub fn new(members: &[(usize, &str, u32)]) -> Ring {
        let mut points = Vec::new();
        for &(member, addr, weight) in members {
            for i in 0..POINTS_PER_WEIGHT * weight {
                let mut h = Fnv::new();
                h.write(addr.as_bytes());
                h.write(b"#");
                h.write(&i.to_le_bytes());
                points.push((mix64(h.finish()), member as u32));
            }
        }
        // Sort by point, then member, so that equal points (vanishingly rare) order the same
        // way in every process.
        points.sort_unstable();
        Ring {
            points: points.into_boxed_slice(),
            members: members.iter().map(|m| m.0).collect(),
        }
    }

    /// The first member at or after `key` on the ring (wrapping) for which `ok` holds.
    pub fn pick(&self, key: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() || !self.members.iter().any(|&m| ok(m)) {
            return None;
        }
        let start = self.points.partition_point(|&(p, _)| p < key);
        let n = self.points.len();
        let mut last = usize::MAX;
        for k in 0..n {
            let member = self.points[(start + k) % n].1 as usize;
            if member != last {
                if ok(member) {
                    return Some(member);
                }
                last = member;
            }
        }
        None
    }
}

/// The ring key of a client address, with every address of one prefix (`/32` and `/64`:
/// the address itself and its IPv6 /64) hashing alike. IPv4-mapped IPv6 addresses hash as
/// their IPv4 form.
pub fn client_key(ip: IpAddr) -> u64 {
    client_key_grouped(ip, 32, 64)
}

/// [`client_key`] with the prefix lengths of `hash_prefix_v4` and `hash_prefix_v6`.
pub fn client_key_grouped(ip: IpAddr, prefix_v4: u8, prefix_v6: u8) -> u64 {
    let mut h = Fnv::new();
    let v4 = |h: &mut Fnv, a: std::net::Ipv4Addr| {
        let bits = u32::from(a);
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_v4.min(32)))
            .unwrap_or(0);
        h.write(&(bits & mask).to_be_bytes());
    };
    match ip {
        IpAddr::V4(a) => v4(&mut h, a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => v4(&mut h, m),
            None => {
                let bits = u128::from(a);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_v6.min(128)))
                    .unwrap_or(0);
                h.write(&(bits & mask).to_be_bytes());
            }
        },
    }
    mix64(h.finish())
}

/// FNV-1a, 64 bit: stable across processes and versions (unlike `DefaultHasher`).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A 64-bit finalizer (murmur3 fmix64) to spread FNV's output over the whole ring.
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    fn names(seq: &[usize]) -> String {
        seq.iter().map(|&i| (b'a' + i as u8) as char).collect()
    }

    fn rr(weights: &[u32]) -> SmoothWrr {
        SmoothWrr::new(weights.iter().copied().enumerate().collect())
    }

    #[test]
    fn least_request_prefers_the_less_loaded() {
        let b = LeastRequest::new(vec![(0, 1), (1, 1), (2, 1)]);
        let loads = [10u64, 0, 10];
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[b.pick(|_| true, |i| loads[i]).unwrap()] += 1;
        }
        // Member 1 wins every draw it is part of: 2/3 of draws.
        assert!(counts[1] > 1800, "{counts:?}");
        assert_eq!(b.pick(|i| i == 2, |i| loads[i]), Some(2));
        assert_eq!(b.pick(|_| false, |i| loads[i]), None);
    }

    #[test]
    fn least_request_weighs_load_by_weight() {
        let b = LeastRequest::new(vec![(0, 1), (1, 4)]);
        // 3 in flight on a weight-4 server beats 1 on a weight-1 server.
        let loads = [1u64, 3];
        for _ in 0..100 {
            assert_eq!(b.pick(|_| true, |i| loads[i]), Some(1));
        }
    }

    #[test]
    fn smooth_wrr_matches_nginx() {
        let b = rr(&[5, 1, 1]);
        let seq: Vec<usize> = (0..7).map(|_| b.pick(|_| true).unwrap()).collect();
        assert_eq!(names(&seq), "aabacaa");
        let b = rr(&[1, 2, 1]);
        let seq: Vec<usize> = (0..8).map(|_| b.pick(|_| true).unwrap()).collect();
        assert_eq!(names(&seq), "bacbbacb");
        let b = rr(&[1, 1, 1]);
        let seq: Vec<usize> = (0..6).map(|_| b.pick(|_| true).unwrap()).collect();
        assert_eq!(names(&seq), "abcabc");
    }

    #[test]
    fn smooth_wrr_never_bursts() {
        // Weight 2 of 4: never twice in a row within a period; weight 1 servers alternate.
        let b = rr(&[1, 2, 1]);
        let seq: Vec<usize> = (0..4).map(|_| b.pick(|_| true).unwrap()).collect();
        let mut counts = [0; 3];
        for &s in &seq {
            counts[s] += 1;
        }
        assert_eq!(counts, [1, 2, 1]);
        assert_ne!(seq[0], seq[1]);
    }

    #[test]
    fn smooth_wrr_ratios_hold_with_a_member_down() {
        let b = rr(&[3, 2, 1]);
        let mut counts = [0; 3];
        for _ in 0..6000 {
            counts[b.pick(|i| i != 1).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        // 3:1 among the remaining two.
        assert!((4400..=4600).contains(&counts[0]), "{counts:?}");
        assert_eq!(b.pick(|_| false), None);
    }

    #[test]
    fn smooth_wrr_weight_ratios() {
        let b = rr(&[1, 2, 3]);
        let mut counts = [0; 3];
        for _ in 0..600 {
            counts[b.pick(|_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 200, 300]);
    }

    fn ring(n: usize) -> (Ring, Vec<String>) {
        let addrs: Vec<String> = (0..n).map(|i| format!("10.0.0.{}:13000", i + 1)).collect();
        let members: Vec<(usize, &str, u32)> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (i, a.as_str(), 1))
            .collect();
        (Ring::new(&members), addrs)
    }

    fn clients() -> Vec<u64> {
        (0..10_000u32)
            .map(|i| client_key(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919))))
            .collect()
    }

    #[test]
    fn ring_adding_a_fourth_server_moves_about_a_quarter() {
        let (three, _) = ring(3);
        let (four, _) = ring(4);
        let keys = clients();
        let moved = keys
            .iter()
            .filter(|&&k| three.pick(k, |_| true) != four.pick(k, |_| true))
            .count();
        // Everything that moved went to the new server.
        for &k in &keys {
            let (a, b) = (three.pick(k, |_| true), four.pick(k, |_| true));
            if a != b {
                assert_eq!(b, Some(3));
            }
        }
        println!("ip_hash: adding a 4th server to 3 moved {moved} of 10000 client IPs");
        assert!(moved <= 3000, "moved {moved} of 10000");
        assert!(moved >= 2000, "moved {moved} of 10000");
    }

    #[test]
    fn ring_removing_a_server_moves_only_its_clients_and_spreads_them() {
        let n = 10;
        let (all, _) = ring(n);
        let keys = clients();
        let dead = 4;
        let mut gained: HashMap<usize, usize> = HashMap::new();
        let mut orphans = 0;
        for &k in &keys {
            let before = all.pick(k, |_| true).unwrap();
            let after = all.pick(k, |i| i != dead).unwrap();
            if before == dead {
                orphans += 1;
                *gained.entry(after).or_default() += 1;
            } else {
                assert_eq!(before, after, "a client of a live server moved");
            }
        }
        let fair = orphans as f64 / (n - 1) as f64;
        println!(
            "ip_hash: removing 1 of {n} servers moved only its {orphans} clients; largest share taken by one server: {} (fair share {fair:.0})",
            gained.values().max().unwrap_or(&0)
        );
        assert_eq!(
            gained.len(),
            n - 1,
            "every other server takes some: {gained:?}"
        );
        for (&s, &g) in &gained {
            assert!((g as f64) <= 2.0 * fair, "server {s} took {g} of {orphans}");
        }
    }

    #[test]
    fn ring_is_deterministic_and_weighted() {
        let a = Ring::new(&[(0, "x:1", 1), (1, "y:1", 3)]);
        let b = Ring::new(&[(0, "x:1", 1), (1, "y:1", 3)]);
        let keys = clients();
        let mut counts = [0; 2];
        for &k in &keys {
            let p = a.pick(k, |_| true).unwrap();
            assert_eq!(Some(p), b.pick(k, |_| true));
            counts[p] += 1;
        }
        let share = counts[1] as f64 / keys.len() as f64;
        assert!((0.68..0.82).contains(&share), "{counts:?}");
    }

    #[test]
    fn client_keys_group_by_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_ne!(client_key(ip("192.0.2.7")), client_key(ip("192.0.2.8")));
        assert_eq!(
            client_key_grouped(ip("192.0.2.7"), 24, 64),
            client_key_grouped(ip("192.0.2.200"), 24, 64)
        );
        assert_ne!(
            client_key_grouped(ip("192.0.2.7"), 24, 64),
            client_key_grouped(ip("192.0.3.7"), 24, 64)
        );
        assert_eq!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            client_key_grouped(ip("10.1.1.1"), 0, 0),
            client_key_grouped(ip("9.9.9.9"), 0, 0)
        );
    }

    #[test]
    fn client_key_treats_mapped_v4_as_v4() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), client_key(mapped));
    }
}
