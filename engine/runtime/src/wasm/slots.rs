//! Instance slots: the pooling allocator reserves room for a fixed number of live instances in
//! the whole process, and instantiating one more fails. Every live instance (busy in a call, or
//! idle in a stage's pool) holds a [`Slot`]; a call that finds none free waits for one, bounded
//! by its stage's deadline, instead of failing.
//!
//! Idle instances hold slots too, so a waiter first takes one back from some stage's idle pool,
//! and an instance that finishes while someone waits frees its slot instead of idling. Without
//! that, stages with warm instances could starve another stage for good.
//!
//! It owns the count and the waiting; it does not own the instances (see `plugin`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A stage's pool of idle instances, as the slots see it.
pub(crate) trait IdlePool: Send + Sync {
    /// Drops one idle instance (freeing its slot); false when there was none.
    fn evict_one(&self) -> bool;
}

/// The right to keep one instance alive; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// No slot became free before the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy {
    /// How many instances the process allows.
    pub(crate) capacity: usize,
}

/// The process-wide instance slots.
pub(crate) struct Slots {
    permits: Arc<Semaphore>,
    capacity: usize,
    /// Calls waiting for a slot right now.
    waiting: AtomicUsize,
    /// Every stage's idle pool, so a waiter can reclaim an idle instance's slot.
    pools: Mutex<Vec<Weak<dyn IdlePool>>>,
}

impl Slots {
    /// Room for `capacity` live instances.
    pub(crate) fn new(capacity: usize) -> Slots {
        Slots {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            waiting: AtomicUsize::new(0),
            pools: Mutex::default(),
        }
    }

    /// Lets waiters reclaim the slots of `pool`'s idle instances.
    pub(crate) fn register(&self, pool: Weak<dyn IdlePool>) {
        if let Ok(mut pools) = self.pools.lock() {
            pools.retain(|p| p.strong_count() > 0);
            pools.push(pool);
        }
    }

    /// Whether a call is waiting for a slot: a healthy instance that finished should then free
    /// its slot rather than idle.
    ///
    /// A pool calls this while holding its own lock, and a waiter counts itself before it looks
    /// into the pools (taking their locks), so an instance cannot slip into an idle pool unseen
    /// after a waiter has looked.
    pub(crate) fn contended(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// A slot, waiting until `deadline` at most.
    ///
    /// # Errors
    /// [`Busy`] when every slot stayed taken until the deadline.
    pub(crate) async fn acquire(&self, deadline: Instant) -> Result<Slot, Busy> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(Slot { _permit: permit });
        }
        let _waiting = Waiting::new(&self.waiting);
        self.evict_one_idle();
        let wait = self.permits.clone().acquire_owned();
        match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), wait).await {
            Ok(Ok(permit)) => Ok(Slot { _permit: permit }),
            // The semaphore is never closed, so an error here is the deadline.
            Ok(Err(_)) | Err(_) => Err(Busy {
                capacity: self.capacity,
            }),
        }
    }

    /// How many slots are free right now (for tests and metrics).
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.permits.available_permits()
    }

    fn evict_one_idle(&self) {
        let pools: Vec<Arc<dyn IdlePool>> = match self.pools.lock() {
            Ok(pools) => pools.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => return,
        };
        for pool in pools {
            if pool.evict_one() {
                return;
            }
        }
    }
}

/// Counts a waiter for as long as it waits (also when its call is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A pool of `n` idle "instances" (slots).
    struct Pool(Mutex<Vec<Slot>>);

    impl IdlePool for Pool {
        fn evict_one(&self) -> bool {
            let slot = self.0.lock().unwrap().pop();
            slot.is_some()
        }
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn a_waiter_gets_the_slot_a_finished_call_frees() {
        let slots = Arc::new(Slots::new(1));
        let held = slots.acquire(soon(10)).await.unwrap();
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(soon(5_000)).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(slots.contended());
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert!(!slots.contended());
        assert_eq!(slots.available(), 1);
    }

    #[tokio::test]
    async fn waiting_is_bounded_by_the_deadline() {
        let slots = Slots::new(1);
        let _held = slots.acquire(soon(10)).await.unwrap();
        let t0 = Instant::now();
        assert_eq!(
            slots.acquire(soon(30)).await.err(),
            Some(Busy { capacity: 1 })
        );
        assert!(t0.elapsed() >= Duration::from_millis(25));
        assert!(!slots.contended(), "a waiter that gave up is not counted");
    }

    #[tokio::test]
    async fn a_waiter_reclaims_an_idle_instance_of_another_stage() {
        let slots = Slots::new(2);
        let pool = Arc::new(Pool(Mutex::default()));
        for _ in 0..2 {
            let slot = slots.acquire(soon(10)).await.unwrap();
            pool.0.lock().unwrap().push(slot);
        }
        let as_idle: Arc<dyn IdlePool> = pool.clone();
        slots.register(Arc::downgrade(&as_idle));
        assert!(slots.acquire(soon(1_000)).await.is_ok());
        assert_eq!(pool.0.lock().unwrap().len(), 1);
    }
}
