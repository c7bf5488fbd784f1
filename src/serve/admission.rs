//! Admission control: a bounded number of requests in flight, and the draining switch.
//!
//! A request holds a [`Permit`] from before its body is read until its response is built, so
//! memory is bounded by `max_in_flight × max_body_bytes` whatever the load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::error::ApiError;

/// Shared admission state of the server.
#[derive(Debug)]
pub struct Admission {
    in_flight: AtomicUsize,
    max_in_flight: usize,
    draining: AtomicBool,
    idle: Notify,
}

/// Proof of admission; releases its slot when dropped.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.admission.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.admission.idle.notify_waiters();
        }
    }
}

impl Admission {
    /// Admission with room for `max_in_flight` requests.
    pub fn new(max_in_flight: usize) -> Arc<Self> {
        Arc::new(Admission {
            in_flight: AtomicUsize::new(0),
            max_in_flight,
            draining: AtomicBool::new(false),
            idle: Notify::new(),
        })
    }

    /// Admits a request, or says why not: 503 while draining, 429 when full.
    pub fn admit(self: &Arc<Self>) -> Result<Permit, ApiError> {
        if self.is_draining() {
            return Err(ApiError::Unavailable("server is shutting down; retry on another replica".into()));
        }
        let mut current = self.in_flight.load(Ordering::Relaxed);
        loop {
            if current >= self.max_in_flight {
                return Err(ApiError::TooManyRequests(format!(
                    "{current} requests in flight, the limit (--max-in-flight) is {}",
                    self.max_in_flight
                )));
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(Permit { admission: Arc::clone(self) }),
                Err(actual) => current = actual,
            }
        }
    }

    /// Requests currently admitted.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Starts draining: new requests are refused, readiness reports 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Resolves when no request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_draining() {
        let a = Admission::new(2);
        let p1 = a.admit().unwrap();
        let _p2 = a.admit().unwrap();
        assert!(matches!(a.admit(), Err(ApiError::TooManyRequests(_))));
        drop(p1);
        let _p3 = a.admit().unwrap();
        a.start_draining();
        assert!(matches!(a.admit(), Err(ApiError::Unavailable(_))));
        assert_eq!(a.in_flight(), 2);
    }
}
