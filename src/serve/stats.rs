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

/// Where one request's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestTimes {
    /// End to end, as the server saw it.
    pub total: Duration,
    /// Waiting in the batch queue.
    pub queue: Duration,
    /// Decoding the inputs.
    pub input: Duration,
    /// The `infer` call of the batch the request ran in.
    pub infer: Duration,
    /// Encoding the outputs.
    pub output: Duration,
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
    /// Records one executed batch (the per-request times come with each request's success).
    pub fn record_execution(&self) {
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.last_inference_ms.store(now, Ordering::Relaxed);
    }

    /// Records one successful request and every stage of it at once, as Triton does: the stage
    /// counts then always agree, whenever they are read (perf_analyzer refuses statistics whose
    /// compute counts differ, which they would if each stage counted when it finished while
    /// requests are in flight).
    pub fn record_success(&self, t: RequestTimes) {
        self.success.record(t.total);
        self.queue.record(t.queue);
        self.compute_input.record(t.input);
        self.compute_infer.record(t.infer);
        self.compute_output.record(t.output);
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
