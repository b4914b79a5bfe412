//! The counters every limit is built from, below every layer: token buckets per key
//! ([`KeyedRate`]), places shared out per key ([`Shares`]) and counts per agent
//! ([`PerAgent`]). What each one limits, and the metrics of its refusals, belong to the layer
//! that uses it (`tunnel::admission`, `relay::limits`, `identity`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tunnel_proto::AgentId;

use crate::metrics::{Limit, count_rejection};

/// Source addresses tracked at most. When the map is full, addresses whose bucket has refilled
/// are forgotten (they would start full anyway); if most are still busy (a flood from many
/// addresses, which only spoofing makes cheap, and which Retry answers), the map is cleared:
/// the memory stays bounded and the cost stays amortised O(1) per handshake.
pub(crate) const MAX_TRACKED: usize = 65_536;

/// A token bucket's state: tokens left, as of `at`.
#[derive(Debug)]
pub(crate) struct Bucket {
    pub(crate) tokens: f64,
    pub(crate) at: Instant,
}

// === Per agent ===

type PerAgentCounts = Arc<Mutex<HashMap<AgentId, u32>>>;

/// Something counted per agent, capped at `max`; the map holds only agents with a count.
#[derive(Debug)]
pub(crate) struct PerAgent {
    max: u32,
    /// The `limit` label of refusals.
    limit: Limit,
    open: PerAgentCounts,
}

/// One thing counted against its agent; released when dropped.
#[derive(Debug)]
pub struct AgentPermit {
    agent: AgentId,
    open: PerAgentCounts,
}

impl PerAgent {
    pub(crate) fn new(limit: Limit, max: u32) -> PerAgent {
        PerAgent {
            max,
            limit,
            open: Arc::default(),
        }
    }

    /// How many `agent` holds now.
    pub(crate) fn count(&self, agent: &AgentId) -> u32 {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(agent).copied().unwrap_or(0)
    }

    /// A permit, or (counted as a refusal) how many `agent` holds already.
    pub(crate) fn acquire(&self, agent: &AgentId) -> Result<AgentPermit, u32> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(agent.clone()).or_default();
        if *n >= self.max {
            let held = *n;
            drop(open);
            count_rejection(self.limit);
            return Err(held);
        }
        *n += 1;
        Ok(AgentPermit {
            agent: agent.clone(),
            open: self.open.clone(),
        })
    }

    /// The cap.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }
}

impl Drop for AgentPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.agent);
            }
        }
    }
}

// === KeyedRate ===

/// A token bucket per key (a caller, say): `rate` per second refilled continuously, `burst`
/// at most, in a map of at most [`MAX_TRACKED`] keys (when full, keys whose bucket has
/// refilled are forgotten: they would start full anyway).
#[derive(Debug)]
pub struct KeyedRate<K> {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Clone> KeyedRate<K> {
    /// `per_minute` per key, with a burst of as many.
    pub fn per_minute(per_minute: u32) -> KeyedRate<K> {
        KeyedRate {
            per_second: f64::from(per_minute) / 60.0,
            burst: f64::from(per_minute.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token of `key`'s bucket; false when it has none.
    pub fn take(&self, key: &K, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(key) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if buckets.len() >= MAX_TRACKED {
                // Every key is busy: forget the lot rather than grow (each starts full again).
                buckets.clear();
            }
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

// === Shares ===

/// Places taken at once, at most `total` in all and `per_key` for one key (a source address,
/// say), so that one key cannot take every place.
#[derive(Debug)]
pub struct Shares<K: std::hash::Hash + Eq> {
    total: usize,
    per_key: usize,
    taken: Mutex<(usize, HashMap<K, usize>)>,
}

/// Why [`Shares::take`] gave no place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// Every place is taken.
    Total,
    /// The key has its share.
    Key,
}

impl<K: std::hash::Hash + Eq + Clone> Shares<K> {
    /// `total` places, `per_key` of them for one key at most.
    pub fn new(total: usize, per_key: usize) -> Arc<Shares<K>> {
        Arc::new(Shares {
            total,
            per_key,
            taken: Mutex::new((0, HashMap::new())),
        })
    }

    /// A place for `key`, held until the returned value is dropped.
    pub fn take(self: &Arc<Self>, key: &K) -> Result<Share<K>, Full> {
        let mut t = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if t.0 >= self.total {
            return Err(Full::Total);
        }
        let n = t.1.entry(key.clone()).or_default();
        if *n >= self.per_key {
            return Err(Full::Key);
        }
        *n += 1;
        t.0 += 1;
        Ok(Share {
            shares: self.clone(),
            key: key.clone(),
        })
    }

    /// Places taken now.
    pub fn taken(&self) -> usize {
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

/// A place of [`Shares`]; given back when dropped.
#[derive(Debug)]
pub struct Share<K: std::hash::Hash + Eq + Clone> {
    shares: Arc<Shares<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Share<K> {
    fn drop(&mut self) {
        let mut t = self.shares.taken.lock().unwrap_or_else(|e| e.into_inner());
        t.0 -= 1;
        if let Some(n) = t.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                t.1.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keyed_rates_give_each_key_its_burst_then_its_rate() {
        let rate = KeyedRate::per_minute(60);
        let t0 = Instant::now();
        for _ in 0..60 {
            assert!(rate.take(&"a", t0));
        }
        assert!(!rate.take(&"a", t0), "burst spent");
        assert!(rate.take(&"b", t0), "another key has its own");
        assert!(rate.take(&"a", t0 + Duration::from_secs(1)), "one a second");
        assert!(!rate.take(&"a", t0 + Duration::from_secs(1)));
    }

    #[test]
    fn shares_cap_each_key_and_the_total_and_come_back() {
        let shares = Shares::new(3, 2);
        let a1 = shares.take(&"a").unwrap();
        let _a2 = shares.take(&"a").unwrap();
        assert_eq!(shares.take(&"a").unwrap_err(), Full::Key);
        let _b = shares.take(&"b").unwrap();
        assert_eq!(shares.take(&"c").unwrap_err(), Full::Total);
        drop(a1);
        assert_eq!(shares.taken(), 2);
        shares.take(&"c").unwrap();
    }
}
