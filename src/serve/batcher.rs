//! Dynamic batching and the instance pool of one model version.
//!
//! Requests wait in one bounded queue. Each instance (a session on its own OS thread) takes work
//! as soon as it is idle, so the next batch always goes to an instance with nothing outstanding:
//! least-outstanding dispatch without a dispatcher thread in the way. An instance that takes a
//! request merges compatible queued requests (same trailing dimensions) along axis 0 up to the
//! maximum batch size, waiting at most the maximum queue delay for more to arrive; a request larger
//! than the maximum batch runs alone. Results are split back per request. Requests whose client
//! went away (the reply channel is closed) are dropped before they cost compute.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_runtime_core::{Error, NamedTensor, Session, Tensor};
use tokio::sync::oneshot;

use super::metrics::ModelMetrics;
use super::stats::Stats;

/// Batching limits of one model version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSettings {
    /// Largest merged batch in rows; 0 disables merging (the model has no dynamic batch axis).
    pub max_batch_size: usize,
    /// Longest an instance waits for more requests to fill a batch.
    pub max_queue_delay: Duration,
    /// Most requests waiting; beyond it, submissions are refused.
    pub max_queue: usize,
}

/// The result of one request: its outputs and where its time went.
#[derive(Debug)]
pub struct Done {
    /// Outputs, in model order.
    pub outputs: Vec<NamedTensor>,
    /// Time spent queued.
    pub queue: Duration,
    /// Time of the batch's `infer` call.
    pub compute: Duration,
    /// Rows in the batch this request ran in.
    pub batch_rows: usize,
}

/// A request waiting for an instance.
pub struct Job {
    inputs: Vec<NamedTensor>,
    rows: usize,
    signature: u64,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Done, Error>>,
}

impl Job {
    /// A job for inputs already checked against the model and ordered as its inputs are.
    /// `batchable` says whether axis 0 may be merged with other requests.
    pub fn new(inputs: Vec<NamedTensor>, batchable: bool) -> (Self, oneshot::Receiver<Result<Done, Error>>) {
        let (reply, rx) = oneshot::channel();
        let rows = if batchable {
            inputs.first().and_then(|i| i.tensor.shape().first().copied()).unwrap_or(0)
        } else {
            0
        };
        let mut h = DefaultHasher::new();
        for i in &inputs {
            i.tensor.datatype().hash(&mut h);
            i.tensor.shape().get(1..).hash(&mut h);
        }
        (Job { inputs, rows, signature: h.finish(), enqueued: Instant::now(), reply }, rx)
    }
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The queue holds `max_queue` requests.
    QueueFull(usize),
    /// The model is being unloaded or the server is stopping.
    Closed,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Instances blocked on the condition variable (a submit only signals when there are any).
    sleepers: usize,
}

/// How long one idle instance polls the queue before it sleeps. Waking a sleeping thread costs
/// tens of microseconds on a VM, more than a small model's compute; one polling instance takes
/// the next request without that cost, and stops after this long without work.
const SPIN: Duration = Duration::from_micros(100);

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Jobs queued, readable without the lock by the spinning instance.
    pending: AtomicUsize,
    /// True while one instance spins; the others sleep.
    spinning: AtomicBool,
    settings: BatchSettings,
    metrics: ModelMetrics,
    stats: Arc<Stats>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A worker never panics while holding the lock (infer runs outside it), so poisoning
        // would only follow a bug; keep serving with the data as it is.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The queue and instance threads of one model version.
pub struct Batcher {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Batcher {
    /// Starts one thread per session.
    pub fn start(
        label: &str,
        sessions: Vec<Box<dyn Session>>,
        settings: BatchSettings,
        metrics: ModelMetrics,
        stats: Arc<Stats>,
    ) -> std::io::Result<Self> {
        metrics.instances.set(sessions.len() as i64);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closed: false, sleepers: 0 }),
            ready: Condvar::new(),
            pending: AtomicUsize::new(0),
            spinning: AtomicBool::new(false),
            settings,
            metrics,
            stats,
        });
        let mut workers = Vec::with_capacity(sessions.len());
        for (i, session) in sessions.into_iter().enumerate() {
            let shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("{label}#{i}"))
                .spawn(move || worker(&shared, session))?;
            workers.push(handle);
        }
        Ok(Batcher { shared, workers: Mutex::new(workers) })
    }

    /// Queues a job.
    pub fn submit(&self, job: Job) -> Result<(), Rejected> {
        let mut q = self.shared.lock();
        if q.closed {
            return Err(Rejected::Closed);
        }
        if q.jobs.len() >= self.shared.settings.max_queue {
            return Err(Rejected::QueueFull(q.jobs.len()));
        }
        q.jobs.push_back(job);
        self.shared.pending.store(q.jobs.len(), Ordering::Release);
        self.shared.metrics.queue_depth.set(q.jobs.len() as i64);
        let wake = q.sleepers > 0;
        drop(q);
        if wake {
            self.shared.ready.notify_one();
        }
        Ok(())
    }

    /// Requests waiting.
    pub fn queued(&self) -> usize {
        self.shared.lock().jobs.len()
    }

    /// Stops accepting jobs; instances finish what is queued, then exit.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
    }

    /// Closes and waits for the instance threads to finish (blocking).
    pub fn shutdown(&self) {
        self.close();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.close();
    }
}

/// Takes the next batch: the oldest live job plus compatible ones, waiting up to the queue delay
/// for more. Returns `None` when the queue is closed and empty.
/// Polls for work for up to [`SPIN`] when no other instance is already doing so.
fn spin_for_work(shared: &Shared) {
    if shared.spinning.swap(true, Ordering::AcqRel) {
        return;
    }
    let until = Instant::now() + SPIN;
    while shared.pending.load(Ordering::Acquire) == 0 && Instant::now() < until {
        // Yield rather than busy-wait: on a small machine the HTTP threads need this core,
        // and a yielding poller still sees new work within microseconds (measured: c=16
        // throughput 27k req/s busy-spinning, 36k yielding, 35k not polling at all; c=1 p50
        // 103 µs, 82 µs, 102 µs).
        std::thread::yield_now();
    }
    shared.spinning.store(false, Ordering::Release);
}

fn next_batch(shared: &Shared) -> Option<Vec<Job>> {
    let settings = shared.settings;
    if shared.pending.load(Ordering::Acquire) == 0 {
        spin_for_work(shared);
    }
    let mut q = shared.lock();
    let first = loop {
        match q.jobs.pop_front() {
            Some(job) if job.reply.is_closed() => {
                shared.metrics.cancelled.inc();
                continue;
            }
            Some(job) => break job,
            None if q.closed => return None,
            None => {
                q.sleepers += 1;
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                q.sleepers -= 1;
            }
        }
    };
    let mut rows = first.rows;
    let deadline = first.enqueued + settings.max_queue_delay;
    let signature = first.signature;
    let mut batch = vec![first];
    if settings.max_batch_size > 0 && rows > 0 {
        loop {
            let mut i = 0;
            while i < q.jobs.len() && rows < settings.max_batch_size {
                let job = &q.jobs[i];
                if job.reply.is_closed() {
                    q.jobs.remove(i);
                    shared.metrics.cancelled.inc();
                } else if job.signature == signature
                    && job.rows > 0
                    && rows + job.rows <= settings.max_batch_size
                {
                    rows += job.rows;
                    batch.extend(q.jobs.remove(i));
                } else {
                    i += 1;
                }
            }
            let now = Instant::now();
            if rows >= settings.max_batch_size || now >= deadline || q.closed {
                break;
            }
            q.sleepers += 1;
            q = shared.ready.wait_timeout(q, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            q.sleepers -= 1;
        }
    }
    shared.pending.store(q.jobs.len(), Ordering::Release);
    shared.metrics.queue_depth.set(q.jobs.len() as i64);
    Some(batch)
}

fn worker(shared: &Shared, session: Box<dyn Session>) {
    while let Some(batch) = next_batch(shared) {
        run_batch(shared, session.as_ref(), batch);
    }
}

fn run_batch(shared: &Shared, session: &dyn Session, mut batch: Vec<Job>) {
    let started = Instant::now();
    for job in &batch {
        let waited = started.duration_since(job.enqueued);
        shared.metrics.queue_seconds.observe(waited.as_secs_f64());
    }
    let rows: Vec<usize> = batch.iter().map(|j| j.rows).collect();
    let total_rows: usize = rows.iter().sum();
    let inputs = if batch.len() == 1 {
        std::mem::take(&mut batch[0].inputs)
    } else {
        match merge(&mut batch) {
            Ok(inputs) => inputs,
            Err(e) => return fail_all(batch, &e),
        }
    };
    // A panicking engine must fail its requests, not take the instance thread down with it.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| session.infer(inputs)))
        .unwrap_or_else(|_| Err(Error::Inference("the backend panicked while scoring this batch".into())));
    let compute = started.elapsed();
    shared.metrics.compute_seconds.observe(compute.as_secs_f64());
    shared.metrics.busy_seconds.inc_by(compute.as_secs_f64());
    shared.metrics.batch_size.observe(total_rows.max(1) as f64);
    shared.stats.record_execution();
    let outputs = match result {
        Ok(outputs) => outputs,
        Err(e) => return fail_all(batch, &e),
    };
    if batch.len() == 1 {
        let job = batch.pop().expect("one job");
        let queue = started.duration_since(job.enqueued);
        let _ = job.reply.send(Ok(Done { outputs, queue, compute, batch_rows: total_rows }));
        return;
    }
    match split(outputs, &rows) {
        Ok(per_job) => {
            for (job, outputs) in batch.into_iter().zip(per_job) {
                let queue = started.duration_since(job.enqueued);
                let _ = job.reply.send(Ok(Done { outputs, queue, compute, batch_rows: total_rows }));
            }
        }
        Err(e) => fail_all(batch, &e),
    }
}

fn fail_all(batch: Vec<Job>, e: &Error) {
    for job in batch {
        let _ = job.reply.send(Err(clone_error(e)));
    }
}

fn clone_error(e: &Error) -> Error {
    match e {
        Error::InvalidInput(m) => Error::InvalidInput(m.clone()),
        other => Error::Inference(other.to_string()),
    }
}

/// Concatenates each input across the jobs along axis 0.
fn merge(batch: &mut [Job]) -> Result<Vec<NamedTensor>, Error> {
    let n_inputs = batch[0].inputs.len();
    let mut merged = Vec::with_capacity(n_inputs);
    for i in 0..n_inputs {
        let parts: Vec<Tensor> = batch.iter().map(|j| j.inputs[i].tensor.clone()).collect();
        merged.push(NamedTensor::new(batch[0].inputs[i].name.clone(), Tensor::concat(&parts)?));
    }
    Ok(merged)
}

/// Splits every output along axis 0 into the jobs' row counts.
fn split(outputs: Vec<NamedTensor>, rows: &[usize]) -> Result<Vec<Vec<NamedTensor>>, Error> {
    let mut per_job: Vec<Vec<NamedTensor>> = rows.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for out in outputs {
        let pieces = out.tensor.split(rows).map_err(|e| {
            Error::Inference(format!("output \"{}\" cannot be split back into requests: {e}", out.name))
        })?;
        for (job, piece) in per_job.iter_mut().zip(pieces) {
            job.push(NamedTensor::new(out.name.clone(), piece));
        }
    }
    Ok(per_job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime_core::{DataType, ModelMetadata, TensorSpec};
    use std::sync::atomic::AtomicUsize;

    /// Doubles its input and records the batch sizes it saw.
    struct Doubler {
        meta: ModelMetadata,
        seen: Arc<Mutex<Vec<usize>>>,
        delay: Duration,
        calls: Arc<AtomicUsize>,
    }

    impl Session for Doubler {
        fn metadata(&self) -> &ModelMetadata {
            &self.meta
        }
        fn max_batch_size(&self) -> usize {
            8
        }
        fn infer(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, Error> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            let t = &inputs[0].tensor;
            self.seen.lock().unwrap().push(t.shape()[0]);
            let v: Vec<f32> = t.to_vec::<f32>()?.into_iter().map(|x| x * 2.0).collect();
            Ok(vec![NamedTensor::new("y", Tensor::from_vec(t.shape().to_vec(), v)?)])
        }
    }

    type Probe = (Box<dyn Session>, Arc<Mutex<Vec<usize>>>, Arc<AtomicUsize>);

    fn doubler(delay: Duration) -> Probe {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let spec = |n: &str| TensorSpec { name: n.into(), datatype: DataType::Fp32, shape: vec![-1, 2] };
        let meta = ModelMetadata { inputs: vec![spec("x")], outputs: vec![spec("y")] };
        (Box::new(Doubler { meta, seen: seen.clone(), delay, calls: calls.clone() }), seen, calls)
    }

    fn job(rows: usize, start: f32) -> (Job, oneshot::Receiver<Result<Done, Error>>) {
        let v: Vec<f32> = (0..rows * 2).map(|i| start + i as f32).collect();
        Job::new(vec![NamedTensor::new("x", Tensor::from_vec(vec![rows, 2], v).unwrap())], true)
    }

    fn metrics() -> (ModelMetrics, Arc<Stats>) {
        (super::super::metrics::Metrics::new().model("m", "1"), Arc::new(Stats::default()))
    }

    #[test]
    fn queued_requests_are_merged_and_split_back() {
        let (session, seen, _) = doubler(Duration::from_millis(0));
        let (m, s) = metrics();
        let settings =
            BatchSettings { max_batch_size: 8, max_queue_delay: Duration::from_millis(200), max_queue: 16 };
        let b = Batcher::start("t", vec![session], settings, m, s).unwrap();
        let rxs: Vec<_> = (0..3)
            .map(|i| {
                let (j, rx) = job(2, i as f32 * 100.0);
                b.submit(j).unwrap();
                rx
            })
            .collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let done = rx.blocking_recv().unwrap().unwrap();
            let want: Vec<f32> = (0..4).map(|k| 2.0 * (i as f32 * 100.0 + k as f32)).collect();
            assert_eq!(done.outputs[0].tensor.to_vec::<f32>().unwrap(), want);
            assert_eq!(done.outputs[0].tensor.shape(), &[2, 2]);
        }
        assert_eq!(*seen.lock().unwrap(), vec![6], "three requests of 2 rows ran as one batch of 6");
        b.shutdown();
    }

    #[test]
    fn oversized_requests_run_alone_and_batches_respect_the_limit() {
        let (session, seen, _) = doubler(Duration::from_millis(0));
        let (m, s) = metrics();
        let settings =
            BatchSettings { max_batch_size: 4, max_queue_delay: Duration::from_millis(100), max_queue: 16 };
        let b = Batcher::start("t", vec![session], settings, m, s).unwrap();
        let mut rxs = Vec::new();
        for rows in [10, 3, 3] {
            let (j, rx) = job(rows, 0.0);
            b.submit(j).unwrap();
            rxs.push(rx);
        }
        for rx in rxs {
            rx.blocking_recv().unwrap().unwrap();
        }
        assert_eq!(*seen.lock().unwrap(), vec![10, 3, 3]);
        b.shutdown();
    }

    #[test]
    fn cancelled_requests_cost_no_compute_and_full_queue_is_refused() {
        let (session, _, calls) = doubler(Duration::from_millis(50));
        let (m, s) = metrics();
        let settings = BatchSettings { max_batch_size: 0, max_queue_delay: Duration::ZERO, max_queue: 2 };
        let b = Batcher::start("t", vec![session], settings, m.clone(), s).unwrap();
        let (j1, rx1) = job(1, 0.0);
        b.submit(j1).unwrap();
        std::thread::sleep(Duration::from_millis(10)); // the instance is now busy with j1
        let (j2, rx2) = job(1, 0.0);
        let (j3, rx3) = job(1, 0.0);
        b.submit(j2).unwrap();
        b.submit(j3).unwrap();
        let (j4, _rx4) = job(1, 0.0);
        assert_eq!(b.submit(j4), Err(Rejected::QueueFull(2)));
        drop(rx2); // client gone
        rx1.blocking_recv().unwrap().unwrap();
        rx3.blocking_recv().unwrap().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the cancelled request never reached the session");
        assert_eq!(m.cancelled.get(), 1);
        b.shutdown();
    }

    #[test]
    fn shutdown_finishes_queued_work() {
        let (session, _, calls) = doubler(Duration::from_millis(5));
        let (m, s) = metrics();
        let settings = BatchSettings { max_batch_size: 0, max_queue_delay: Duration::ZERO, max_queue: 64 };
        let b = Batcher::start("t", vec![session], settings, m, s).unwrap();
        let rxs: Vec<_> = (0..20)
            .map(|_| {
                let (j, rx) = job(1, 1.0);
                b.submit(j).unwrap();
                rx
            })
            .collect();
        b.shutdown();
        for rx in rxs {
            assert!(rx.blocking_recv().unwrap().is_ok());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 20);
        let (j, _rx) = job(1, 0.0);
        assert_eq!(b.submit(j), Err(Rejected::Closed));
    }
}
