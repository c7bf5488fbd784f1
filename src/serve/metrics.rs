//! Prometheus telemetry: the autoscaling hooks.
//!
//! Label-bound handles for each loaded model are resolved once ([`ModelMetrics`]), so the hot
//! path touches atomics, not the registry's label maps.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{
    Counter, CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets, 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Busy seconds per (model, version) at the previous scrape, and when it was.
type Scrape = (Instant, HashMap<(String, String), f64>);

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    queue_seconds: HistogramVec,
    compute_seconds: HistogramVec,
    batch_size: HistogramVec,
    in_flight: IntGauge,
    queue_depth: IntGaugeVec,
    cancelled: IntCounterVec,
    rejected: IntCounterVec,
    busy_seconds: CounterVec,
    instances: IntGaugeVec,
    busy_ratio: GaugeVec,
    last_scrape: Mutex<Scrape>,
}

/// Handles bound to one model version's labels.
#[derive(Clone)]
pub struct ModelMetrics {
    /// Seconds from enqueue to the start of compute.
    pub queue_seconds: Histogram,
    /// Seconds in `Session::infer` per batch.
    pub compute_seconds: Histogram,
    /// Rows per executed batch.
    pub batch_size: Histogram,
    /// Requests waiting in the batch queue.
    pub queue_depth: IntGauge,
    /// Requests dropped because their client went away before compute.
    pub cancelled: IntCounter,
    /// Seconds instances spent computing.
    pub busy_seconds: Counter,
    /// Instances (sessions) of the model.
    pub instances: IntGauge,
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
        .expect("valid histogram")
}

impl Metrics {
    /// Creates and registers every metric, process RSS and CPU included.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "kiln_requests_total",
                "Requests answered, by model, version, protocol and HTTP status",
            ),
            &["model", "version", "protocol", "status"],
        )
        .expect("valid counter");
        let request_seconds = histogram(
            "kiln_request_duration_seconds",
            "End-to-end request time, body read to response built",
            &["model", "version", "protocol"],
            LATENCY_BUCKETS,
        );
        let queue_seconds = histogram(
            "kiln_queue_duration_seconds",
            "Time a request waited in the batch queue",
            &["model", "version"],
            LATENCY_BUCKETS,
        );
        let compute_seconds = histogram(
            "kiln_compute_duration_seconds",
            "Time of one Session::infer call (one batch)",
            &["model", "version"],
            LATENCY_BUCKETS,
        );
        let batch_size =
            histogram("kiln_batch_size", "Rows per executed batch", &["model", "version"], BATCH_BUCKETS);
        let in_flight = IntGauge::new("kiln_in_flight_requests", "Requests admitted and not yet answered")
            .expect("valid gauge");
        let queue_depth = IntGaugeVec::new(
            Opts::new("kiln_queue_depth", "Requests waiting in the batch queue"),
            &["model", "version"],
        )
        .expect("valid gauge");
        let cancelled = IntCounterVec::new(
            Opts::new("kiln_cancelled_total", "Requests dropped before compute because the client went away"),
            &["model", "version"],
        )
        .expect("valid counter");
        let rejected = IntCounterVec::new(
            Opts::new("kiln_rejected_total", "Requests refused by admission control, by reason"),
            &["reason"],
        )
        .expect("valid counter");
        let busy_seconds = CounterVec::new(
            Opts::new("kiln_instance_busy_seconds_total", "Seconds instances spent in Session::infer"),
            &["model", "version"],
        )
        .expect("valid counter");
        let instances = IntGaugeVec::new(
            Opts::new("kiln_instances", "Instances (sessions on their own threads) per model version"),
            &["model", "version"],
        )
        .expect("valid gauge");
        let busy_ratio = GaugeVec::new(
            Opts::new(
                "kiln_instance_busy_ratio",
                "Fraction of instance time spent computing since the previous scrape (0..1)",
            ),
            &["model", "version"],
        )
        .expect("valid gauge");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(queue_seconds.clone()),
            Box::new(compute_seconds.clone()),
            Box::new(batch_size.clone()),
            Box::new(in_flight.clone()),
            Box::new(queue_depth.clone()),
            Box::new(cancelled.clone()),
            Box::new(rejected.clone()),
            Box::new(busy_seconds.clone()),
            Box::new(instances.clone()),
            Box::new(busy_ratio.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            request_seconds,
            queue_seconds,
            compute_seconds,
            batch_size,
            in_flight,
            queue_depth,
            cancelled,
            rejected,
            busy_seconds,
            instances,
            busy_ratio,
            last_scrape: Mutex::new((Instant::now(), HashMap::new())),
        }
    }

    /// Handles for one model version.
    pub fn model(&self, model: &str, version: &str) -> ModelMetrics {
        let l = [model, version];
        ModelMetrics {
            queue_seconds: self.queue_seconds.with_label_values(&l),
            compute_seconds: self.compute_seconds.with_label_values(&l),
            batch_size: self.batch_size.with_label_values(&l),
            queue_depth: self.queue_depth.with_label_values(&l),
            cancelled: self.cancelled.with_label_values(&l),
            busy_seconds: self.busy_seconds.with_label_values(&l),
            instances: self.instances.with_label_values(&l),
        }
    }

    /// Counts an answered request and its end-to-end time.
    pub fn observe_request(
        &self,
        model: &str,
        version: &str,
        protocol: &str,
        status: u16,
        elapsed: Duration,
    ) {
        let text;
        let status = match status {
            200 => "200",
            400 => "400",
            404 => "404",
            429 => "429",
            503 => "503",
            other => {
                text = other.to_string();
                &text
            }
        };
        self.requests.with_label_values(&[model, version, protocol, status]).inc();
        if !model.is_empty() {
            self.request_seconds
                .with_label_values(&[model, version, protocol])
                .observe(elapsed.as_secs_f64());
        }
    }

    /// Counts a request refused by admission control.
    pub fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &IntGauge {
        &self.in_flight
    }

    /// Renders the text exposition format, refreshing the busy ratios first.
    pub fn render(&self) -> Vec<u8> {
        self.refresh_busy_ratio();
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        fpga_metrics(&mut out);
        out
    }

    fn refresh_busy_ratio(&self) {
        let Ok(mut last) = self.last_scrape.lock() else { return };
        let now = Instant::now();
        let wall = now.duration_since(last.0).as_secs_f64();
        if wall <= 0.0 {
            return;
        }
        for family in prometheus::core::Collector::collect(&self.busy_seconds) {
            for m in family.get_metric() {
                let labels: Vec<&str> = m.get_label().iter().map(|l| l.value()).collect();
                let [model, version] = labels[..] else { continue };
                let busy = m.get_counter().get_value();
                let key = (model.to_string(), version.to_string());
                let before = last.1.insert(key, busy).unwrap_or(0.0);
                let instances = self.instances.with_label_values(&[model, version]).get().max(1) as f64;
                let ratio = ((busy - before) / (wall * instances)).clamp(0.0, 1.0);
                self.busy_ratio.with_label_values(&[model, version]).set(ratio);
            }
        }
        last.0 = now;
    }
}

/// Accelerator counters (modelled cycles, MAC utilisation, DMA bytes), when the FPGA path has run.
fn fpga_metrics(out: &mut Vec<u8>) {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let t = kiln_fpga::runtime::telemetry();
    let (cycles, macs, tiles) = (t.cycles.load(Relaxed), t.macs.load(Relaxed), t.tiles.load(Relaxed));
    if tiles == 0 && t.failures.load(Relaxed) == 0 {
        return;
    }
    let peak = (kiln_fpga::numerics::ARRAY_ROWS * kiln_fpga::numerics::ARRAY_COLS) as f64;
    let utilisation = if cycles == 0 { 0.0 } else { macs as f64 / (peak * cycles as f64) };
    let mut text = String::new();
    for (name, kind, help, value) in [
        (
            "kiln_fpga_cycles_total",
            "counter",
            "Modelled compute-unit cycles of completed accelerator commands (250 MHz model clock)",
            cycles as f64,
        ),
        ("kiln_fpga_macs_total", "counter", "MACs performed on the accelerator", macs as f64),
        ("kiln_fpga_tiles_total", "counter", "GEMM tiles (accelerator commands) completed", tiles as f64),
        (
            "kiln_fpga_dma_bytes_total",
            "counter",
            "Bytes moved by DMA between host and device",
            t.dma_bytes.load(Relaxed) as f64,
        ),
        (
            "kiln_fpga_failures_total",
            "counter",
            "Accelerator commands that failed or timed out",
            t.failures.load(Relaxed) as f64,
        ),
        (
            "kiln_fpga_mac_utilization",
            "gauge",
            "MACs / (64 PEs x modelled cycles): compute-unit utilisation against the array's peak",
            utilisation,
        ),
    ] {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    out.extend_from_slice(text.as_bytes());
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
