//! The stop notice for connections waiting for a request.
//!
//! A `tokio::sync::Notify` shared by every connection takes its one lock on every
//! poll of a waiter (to swap the waker), and a keep-alive connection polls its
//! waiter on every request: a lock that all cores would take per request. Here
//! each connection enlists a waker slot once, in the registry of its thread, and
//! a wait only registers the task's waker in that slot and reads a flag.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use slab::Slab;

use crate::metrics::sharded::Slots;

/// Set once when the service stops; every enlisted connection is then woken.
#[derive(Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    /// Enlisted connections' wakers, one registry per thread slot.
    waiting: Slots<Mutex<Slab<Arc<AtomicWaker>>>>,
}

impl StopSignal {
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Marks the service stopped and wakes every enlisted connection.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        for registry in self.waiting.iter() {
            for (_, waker) in registry.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                waker.wake();
            }
        }
    }

    /// Enlists a connection for its whole life; dropping the watch leaves.
    pub fn watch(&self) -> StopWatch<'_> {
        let registry = self.waiting.local();
        let waker = Arc::new(AtomicWaker::new());
        let entry = registry.lock().unwrap_or_else(PoisonError::into_inner).insert(Arc::clone(&waker));
        StopWatch { signal: self, registry, entry, waker }
    }
}

/// One connection's enlistment in a [`StopSignal`].
pub struct StopWatch<'a> {
    signal: &'a StopSignal,
    /// The registry enlisted in: the thread that enlisted may not be the one that leaves.
    registry: &'a Mutex<Slab<Arc<AtomicWaker>>>,
    entry: usize,
    waker: Arc<AtomicWaker>,
}

impl StopWatch<'_> {
    pub fn is_stopped(&self) -> bool {
        self.signal.is_stopped()
    }

    /// Resolves once the service has stopped.
    pub async fn stopped(&self) {
        poll_fn(|cx| {
            // Registered before the flag is read, so a stop between the two still wakes us.
            self.waker.register(cx.waker());
            if self.signal.is_stopped() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

impl Drop for StopWatch<'_> {
    fn drop(&mut self) {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner).try_remove(self.entry);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_waiting_connection_wakes_when_the_service_stops() {
        let signal = Arc::new(StopSignal::default());
        let waiter = {
            let signal = Arc::clone(&signal);
            tokio::spawn(async move {
                let watch = signal.watch();
                watch.stopped().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the wait ended before the stop");
        signal.stop();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken by the stop").expect("no panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_enlisted_on_any_thread_wake_and_leave_no_entry() {
        let signal = Arc::new(StopSignal::default());
        let waiters: Vec<_> = (0..64)
            .map(|_| {
                let signal = Arc::clone(&signal);
                tokio::spawn(async move {
                    let watch = signal.watch();
                    tokio::task::yield_now().await;
                    watch.stopped().await;
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        signal.stop();
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken by the stop").expect("no panic");
        }
        let left: usize = signal.waiting.iter().map(|registry| registry.lock().unwrap().len()).sum();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn a_connection_enlisted_after_the_stop_sees_it_at_once() {
        let signal = StopSignal::default();
        signal.stop();
        let watch = signal.watch();
        tokio::time::timeout(Duration::from_secs(1), watch.stopped()).await.expect("already stopped");
    }
}
