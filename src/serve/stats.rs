//! Per-model-version statistics in the shape of Triton's statistics extension
//! (`GET /v2/models/{m}/stats`), which perf_analyzer reads for its server-side breakdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// A count and a cumulative duration.
#[derive(Debug, Default)]
pub struct Tally {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Tally {
    /// Adds one event of duration `d`.
    pub fn record(&self, d: Duration) {
        self.record_n(1, d);
    }

    /// Adds `n` events, each of duration `d`.
    pub fn record_n(&self, n: u64, d: Duration) {
        self.count.fetch_add(n, Ordering::Relaxed);
        self.ns.fetch_add(n.saturating_mul(d.as_nanos() as u64), Ordering::Relaxed);
    }

    fn json(&self) -> Value {
        json!({"count": self.count.load(Ordering::Relaxed), "ns": self.ns.load(Ordering::Relaxed)})
    }
}

/// Counters of one model version.
#[derive(Debug, Default)]
pub struct Stats {
    /// Successful requests, end to end.
    pub success: Tally,
    /// Failed requests, end to end.
    pub fail: Tally,
    /// Time in the batch queue.
    pub queue: Tally,
    /// Decoding inputs.
    pub compute_input: Tally,
    /// `Session::infer`, attributed to each request of the batch.
    pub compute_infer: Tally,
    /// Encoding outputs.
    pub compute_output: Tally,
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    last_inference_ms: AtomicU64,
}

impl Stats {
    /// Records one executed batch of `requests` requests.
    pub fn record_execution(&self, requests: usize, compute: Duration, ok: bool) {
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.compute_infer.record_n(requests as u64, compute);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.last_inference_ms.store(now, Ordering::Relaxed);
    }

    /// Records `rows` inferences (batch rows) of a successful request.
    pub fn record_inferences(&self, rows: usize) {
        self.inference_count.fetch_add(rows.max(1) as u64, Ordering::Relaxed);
    }

    /// Triton's `model_stats` entry.
    pub fn json(&self, name: &str, version: &str) -> Value {
        json!({
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms.load(Ordering::Relaxed),
            "inference_count": self.inference_count.load(Ordering::Relaxed),
            "execution_count": self.execution_count.load(Ordering::Relaxed),
            "inference_stats": {
                "success": self.success.json(),
                "fail": self.fail.json(),
                "queue": self.queue.json(),
                "compute_input": self.compute_input.json(),
                "compute_infer": self.compute_infer.json(),
                "compute_output": self.compute_output.json(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [],
        })
    }
}
