//! `max_connections_per_ip` (CONTRACT §8): open client connections counted per client
//! address, each held by a guard that the connection drops when it closes.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use super::{SHARDS, lock, shard_index};

/// Open client connections per client address, for `max_connections_per_ip`. Memory is
/// bounded by the open connections: an address's entry goes when its last one closes.
///
/// The limit is given with each connection (it comes from the snapshot the connection was
/// accepted under, so a reload changes it for new connections); connections accepted
/// while there was no limit are not counted.
#[derive(Debug)]
pub struct ConnectionsPerIp {
    hasher: RandomState,
    shards: Box<[Mutex<OpenCounts>]>,
}

/// Open connections by address; an address is present only while it has some.
type OpenCounts = HashTable<(IpAddr, usize)>;

/// One open connection counted against its address; dropping it closes the count.
#[derive(Debug)]
#[must_use = "the connection is counted only while the guard lives"]
pub struct IpGuard {
    /// `None` when there is no limit.
    held: Option<(Arc<ConnectionsPerIp>, IpAddr)>,
}

impl ConnectionsPerIp {
    /// An empty counter (its tables allocate nothing until used).
    pub fn new() -> ConnectionsPerIp {
        ConnectionsPerIp {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
        }
    }

    /// Counts a new connection from `ip`, or `None` if `ip` already has `max` open; with
    /// `max` 0 (no limit) nothing is counted and no table is touched. An IPv4-mapped IPv6
    /// address counts as the IPv4 one.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpGuard> {
        if max == 0 {
            return Some(IpGuard { held: None });
        }
        let ip = ip.to_canonical();
        let hash = self.hasher.hash_one(ip);
        let mut shard = lock(&self.shards[shard_index(hash, self.shards.len())]);
        match shard.entry(hash, |(k, _)| *k == ip, |(k, _)| self.hasher.hash_one(k)) {
            Entry::Occupied(mut e) => {
                let open = &mut e.get_mut().1;
                if *open >= max {
                    return None;
                }
                *open += 1;
            }
            Entry::Vacant(e) => {
                e.insert((ip, 1));
            }
        }
        drop(shard);
        Some(IpGuard {
            held: Some((Arc::clone(self), ip)),
        })
    }

    /// The number of addresses with open connections.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no address has an open connection (always, without a limit).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&self, ip: IpAddr) {
        let hash = self.hasher.hash_one(ip);
        let mut shard = lock(&self.shards[shard_index(hash, self.shards.len())]);
        if let Ok(mut e) = shard.find_entry(hash, |(k, _)| *k == ip) {
            let open = &mut e.get_mut().1;
            *open -= 1;
            if *open == 0 {
                e.remove();
            }
        }
    }
}

impl Default for ConnectionsPerIp {
    fn default() -> Self {
        ConnectionsPerIp::new()
    }
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        if let Some((counter, ip)) = self.held.take() {
            counter.release(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn connections_stop_at_the_max() {
        let limit = Arc::new(ConnectionsPerIp::new());
        let a = ip(1);
        let g1 = limit.try_acquire(a, 2).unwrap();
        let g2 = limit.try_acquire(a, 2).unwrap();
        assert!(limit.try_acquire(a, 2).is_none());
        // Another address has its own count.
        let other = limit.try_acquire(ip(2), 2).unwrap();
        assert_eq!(limit.len(), 2);
        drop(g1);
        let g3 = limit.try_acquire(a, 2).unwrap();
        assert!(limit.try_acquire(a, 2).is_none());
        drop((g2, g3, other));
        assert!(limit.is_empty());
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let limit = Arc::new(ConnectionsPerIp::new());
        let v4 = IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4));
        let mapped: IpAddr = "::ffff:1.2.3.4".parse().unwrap();
        let g = limit.try_acquire(mapped, 1).unwrap();
        assert!(limit.try_acquire(v4, 1).is_none());
        drop(g);
        let g = limit.try_acquire(v4, 1).unwrap();
        assert!(limit.try_acquire(mapped, 1).is_none());
        drop(g);
        assert!(limit.is_empty());
    }

    #[test]
    fn no_limit_counts_nothing() {
        let limit = Arc::new(ConnectionsPerIp::new());
        let guards: Vec<_> = (0..1000)
            .map(|_| limit.try_acquire(ip(1), 0).unwrap())
            .collect();
        assert!(limit.is_empty());
        drop(guards);
        assert!(limit.is_empty());
    }
}
