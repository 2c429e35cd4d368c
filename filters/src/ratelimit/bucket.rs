//! Per-key buckets of one rule: GCRA state plus the FIFO of requests waiting on it, in a table
//! bounded by least-recently-used eviction.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

use lru::LruCache;
use tokio::sync::Notify;

use super::gate::Tat;

/// Which bucket of a rule a request counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum BucketKey {
    /// The rule is not keyed: one bucket for everyone.
    All,
    /// Keyed by client IP.
    Ip(IpAddr),
    /// Keyed by a header's value.
    Value(Box<[u8]>),
    /// Keyed, but the request carries no key (no client address, no such header): those share
    /// one bucket rather than escaping the limit.
    Missing,
}

/// A request waiting in one or more queues. Its ticket orders it against every other waiter.
#[derive(Debug)]
pub(crate) struct Waiter {
    pub(crate) ticket: u64,
    /// Woken when a waiter ahead leaves without consuming, so the plan can be redone sooner.
    pub(crate) notify: Notify,
}

/// One bucket.
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    pub(crate) tat: Tat,
    /// Waiters that found this bucket short of capacity, sorted by ticket.
    pub(crate) queue: VecDeque<Arc<Waiter>>,
}

impl Bucket {
    /// Waiters with a smaller ticket than `ticket` (all of them for a newcomer without one).
    pub(crate) fn ahead_of(&self, ticket: Option<u64>) -> usize {
        match ticket {
            None => self.queue.len(),
            Some(t) => self.queue.partition_point(|w| w.ticket < t),
        }
    }

    /// Queues `w` in ticket order unless it is queued already.
    pub(crate) fn enqueue(&mut self, w: &Arc<Waiter>) {
        let at = self.queue.partition_point(|q| q.ticket < w.ticket);
        if self.queue.get(at).is_none_or(|q| q.ticket != w.ticket) {
            self.queue.insert(at, w.clone());
        }
    }

    /// Takes `w` out of the queue. When it leaves without consuming (`wake`), everyone behind
    /// it has less to wait for and is woken to plan again.
    pub(crate) fn dequeue(&mut self, ticket: u64, wake: bool) {
        let at = self.queue.partition_point(|q| q.ticket < ticket);
        if self.queue.get(at).is_some_and(|q| q.ticket == ticket) {
            self.queue.remove(at);
            if wake {
                for w in self.queue.iter().skip(at) {
                    w.notify.notify_one();
                }
            }
        }
    }
}

/// The buckets of one rule.
pub(crate) struct Buckets {
    map: LruCache<BucketKey, Bucket>,
    max_keys: usize,
}

impl Buckets {
    pub(crate) fn new(max_keys: usize) -> Buckets {
        Buckets {
            map: LruCache::unbounded(),
            max_keys: max_keys.max(1),
        }
    }

    /// The bucket for `key`, created fresh if absent, marked most recently used. At the cap the
    /// least recently used bucket nobody waits on is forgotten; buckets with waiters are never
    /// dropped (their waiters would lose their place), so the table may briefly exceed the cap.
    pub(crate) fn get(&mut self, key: &BucketKey) -> &mut Bucket {
        if !self.map.contains(key) && self.map.len() >= self.max_keys {
            let idle = self
                .map
                .iter()
                .rev()
                .find(|(_, b)| b.queue.is_empty())
                .map(|(k, _)| k.clone());
            if let Some(k) = idle {
                self.map.pop(&k);
            }
        }
        self.map.get_or_insert_mut_ref(key, Bucket::default)
    }

    /// The bucket for `key` if it exists, without touching its recency.
    pub(crate) fn peek(&mut self, key: &BucketKey) -> Option<&mut Bucket> {
        self.map.peek_mut(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}
