//! Execution behaviour of `kiln serve` under load: overload, drain, cancellation, timeouts,
//! dynamic batching, the repository extension, metrics and logs. The `slow` fixture's cost is set
//! by the request (a Loop of `iterations` steps), so slow requests are deterministic.
//! Every load loop is bounded in count and time.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::server::{Server, http, try_http};
use common::*;
use serde_json::{Value, json};

fn slow_body(iterations: i64) -> String {
    json!({"inputs": [
        {"name": "x", "shape": [1, 256], "datatype": "FP32", "data": vec![0.01; 256]},
        {"name": "iterations", "shape": [1, 1], "datatype": "INT64", "data": [iterations]}
    ]})
    .to_string()
}

fn slow_server(extra: &[&str]) -> Server {
    let model = format!("slow={}", fixture("slow").join("model.onnx").display());
    let mut args = vec!["--model", &model, "--backend", "ort", "--max-batch-size", "0"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Iterations that make one slow request take roughly `ms` on this machine.
fn iterations_for(server: &Server, ms: u64) -> i64 {
    let t = Instant::now();
    assert_eq!(server.post_json("/v2/models/slow/infer", &slow_body(2000)).status, 200);
    let per_iter = t.elapsed().as_secs_f64() / 2000.0;
    ((ms as f64 / 1e3) / per_iter).clamp(200.0, 200_000.0) as i64
}

#[test]
fn overload_answers_429_with_retry_after() {
    let server = slow_server(&["--instances", "1", "--max-in-flight", "2", "--max-queue", "64"]);
    let n = iterations_for(&server, 80);
    let addr = server.addr;
    let statuses: Vec<(u16, Option<String>, String)> = thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| {
                let body = slow_body(n);
                s.spawn(move || {
                    let r = http(
                        addr,
                        "POST",
                        "/v2/models/slow/infer",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    );
                    (r.status, r.header("retry-after").map(str::to_string), r.text())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|s| s.0 == 200).count();
    let busy: Vec<_> = statuses.iter().filter(|s| s.0 == 429).collect();
    assert_eq!(ok + busy.len(), 10, "only 200 and 429: {statuses:?}");
    assert!(ok >= 2 && !busy.is_empty(), "{statuses:?}");
    for (_, retry, body) in &busy {
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(body.contains("--max-in-flight"), "{body}");
    }
    assert!(server.metric("kiln_rejected_total{reason=\"overload\"}").unwrap() >= busy.len() as f64);

    // The per-model queue bound answers 429 too.
    let server = slow_server(&["--instances", "1", "--max-in-flight", "50", "--max-queue", "1"]);
    let addr = server.addr;
    let statuses: Vec<(u16, String)> = thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let body = slow_body(n);
                s.spawn(move || {
                    thread::sleep(Duration::from_millis(5 * i));
                    let r = http(
                        addr,
                        "POST",
                        "/v2/models/slow/infer",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    );
                    (r.status, r.text())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().any(|(s, b)| *s == 429 && b.contains("--max-queue")), "{statuses:?}");
    assert!(statuses.iter().all(|(s, _)| *s == 200 || *s == 429), "{statuses:?}");
}

#[derive(Debug)]
enum Outcome {
    Ok,
    Refused,
    NoConnection,
    Lost(String),
}

#[test]
fn drain_under_load_loses_no_accepted_request() {
    let mut server = slow_server(&["--instances", "1", "--grace-period", "20s"]);
    let n = iterations_for(&server, 40);
    let addr = server.addr;
    let signalled: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let results: Arc<Mutex<Vec<(Instant, Outcome)>>> = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (results, body) = (Arc::clone(&results), slow_body(n));
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                for _ in 0..200 {
                    if Instant::now() > deadline {
                        break;
                    }
                    let sent = Instant::now();
                    let outcome = match try_http(
                        addr,
                        "POST",
                        "/v2/models/slow/infer",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    ) {
                        Ok(r) if r.status == 200 => Outcome::Ok,
                        Ok(r) if r.status == 503 => Outcome::Refused,
                        Ok(r) => Outcome::Lost(format!("{} {}", r.status, r.text())),
                        // Refused, or reset by the kernel because the listener closed with the
                        // connection still in its backlog (never accepted by the server).
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::ConnectionRefused
                                    | std::io::ErrorKind::ConnectionReset
                                    | std::io::ErrorKind::UnexpectedEof
                            ) =>
                        {
                            Outcome::NoConnection
                        }
                        Err(e) => Outcome::Lost(e.to_string()),
                    };
                    let stop = !matches!(outcome, Outcome::Ok);
                    results.lock().unwrap().push((sent, outcome));
                    if stop {
                        break;
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(400));
    *signalled.lock().unwrap() = Some(Instant::now());
    server.terminate();
    // Readiness flips at once, while admitted requests are still finishing.
    let t = Instant::now();
    let ready = loop {
        match try_http(addr, "GET", "/v2/health/ready", &[], b"") {
            Ok(r) if r.status == 503 => break Some(t.elapsed()),
            Ok(_) if t.elapsed() < Duration::from_secs(2) => thread::sleep(Duration::from_millis(2)),
            _ => break None,
        }
    };
    for c in clients {
        c.join().unwrap();
    }
    let code = server.wait_exit(Duration::from_secs(30));
    let log = server.log_text();
    assert_eq!(code, Some(0), "exit code; log:\n{log}");
    let ready = ready.expect("readiness never answered 503 during the drain");
    assert!(ready < Duration::from_millis(500), "readiness took {ready:?} to turn 503");
    assert!(log.contains("draining") && log.contains("drained; exiting"), "{log}");
    let signal_at = signalled.lock().unwrap().unwrap();
    let results = results.lock().unwrap();
    let ok = results.iter().filter(|(_, o)| matches!(o, Outcome::Ok)).count();
    assert!(ok >= 4, "some requests completed before the signal: {results:?}");
    for (sent, outcome) in results.iter() {
        match outcome {
            Outcome::Lost(why) => panic!("a request was lost during the drain: {why}"),
            Outcome::Refused | Outcome::NoConnection => {
                assert!(*sent >= signal_at, "a request sent before SIGTERM was refused: {outcome:?}")
            }
            Outcome::Ok => {}
        }
    }
}

#[test]
fn requests_whose_client_left_are_dropped_before_compute() {
    let server = slow_server(&["--instances", "1"]);
    let n = iterations_for(&server, 300);
    let computed_before = server.metric("kiln_batch_size_count{model=\"slow\",version=\"1\"}").unwrap();
    let addr = server.addr;
    let busy = thread::spawn(move || {
        http(
            addr,
            "POST",
            "/v2/models/slow/infer",
            &[("Content-Type", "application/json")],
            slow_body(n).as_bytes(),
        )
        .status
    });
    thread::sleep(Duration::from_millis(50));
    // Queue a request behind it, then hang up before it can run.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let body = slow_body(n);
        write!(s, "POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(busy.join().unwrap(), 200);
    // Give the instance a moment to pop and skip the abandoned request.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metric("kiln_cancelled_total{model=\"slow\",version=\"1\"}").unwrap_or(0.0) < 1.0
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.metric("kiln_cancelled_total{model=\"slow\",version=\"1\"}"), Some(1.0));
    let computed = server.metric("kiln_batch_size_count{model=\"slow\",version=\"1\"}").unwrap();
    assert_eq!(computed - computed_before, 1.0, "only the first request reached the model");
}

#[test]
fn slow_requests_time_out_with_504() {
    let server = slow_server(&["--instances", "1", "--request-timeout", "100ms"]);
    let n = iterations_for(&server, 600);
    let r = server.post_json("/v2/models/slow/infer", &slow_body(n));
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("within 100 ms"));
    // Compute already under way cannot be interrupted; once the instance is free, service resumes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = server.post_json("/v2/models/slow/infer", &slow_body(3)).status;
        if status == 200 {
            break;
        }
        assert_eq!(status, 504);
        assert!(Instant::now() < deadline, "the server did not recover after a timeout");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn concurrent_requests_are_batched_and_answered_correctly() {
    let model = format!("mlp={}", fixture("mlp").join("model.onnx").display());
    let server = Server::start(&[
        "--model",
        &model,
        "--instances",
        "1",
        "--max-queue-delay-us",
        "100000",
        "--max-batch-size",
        "8",
    ]);
    let input = read_json(fixture("mlp").join("input.json"));
    let expected = read_json(fixture("mlp").join("expected.json"));
    let rows = flatten(&input["inputs"][0]["data"]);
    let want = flatten(&expected["outputs"][0]["data"]);
    let addr = server.addr;
    thread::scope(|s| {
        for i in 0..8usize {
            let (rows, want) = (&rows, &want);
            s.spawn(move || {
                let r = i % 4;
                let body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": rows[r * 64..(r + 1) * 64]}]});
                let resp = http(addr, "POST", "/v2/models/mlp/infer", &[("Content-Type", "application/json")], body.to_string().as_bytes());
                assert_eq!(resp.status, 200, "{}", resp.text());
                let got = resp.json()["outputs"].clone();
                let want_row = json!([{"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": want[r * 10..(r + 1) * 10]}]);
                compare_outputs(&got, &want_row).unwrap();
            });
        }
    });
    let batches = server.metric("kiln_batch_size_count{model=\"mlp\",version=\"1\"}").unwrap();
    let rows_run = server.metric("kiln_batch_size_sum{model=\"mlp\",version=\"1\"}").unwrap();
    assert_eq!(rows_run, 8.0);
    assert!(batches < 8.0, "8 concurrent requests ran in {batches} batches: nothing was merged");
}

#[test]
fn repository_extension_loads_and_unloads() {
    let repo = tempfile::tempdir().unwrap();
    for v in ["1", "2"] {
        std::fs::create_dir_all(repo.path().join("mlp").join(v)).unwrap();
        std::fs::copy(fixture("mlp").join("model.onnx"), repo.path().join("mlp").join(v).join("model.onnx"))
            .unwrap();
    }
    std::fs::write(repo.path().join("mlp/config.toml"), "instances = 1\nmax_batch_size = 4\n").unwrap();
    let server = Server::start(&["--model-repository", repo.path().to_str().unwrap()]);
    let index = server.post_json("/v2/repository/index", "{}").json();
    assert_eq!(
        index,
        json!([{"name": "mlp", "version": "1", "state": "READY"}, {"name": "mlp", "version": "2", "state": "READY"}])
    );
    assert_eq!(server.get("/v2/models/mlp").json()["versions"], json!(["1", "2"]));
    assert_eq!(server.get("/v2/models/mlp/config").json()["max_batch_size"], 4);
    let body = std::fs::read_to_string(fixture("mlp").join("input.json")).unwrap();
    assert_eq!(server.post_json("/v2/models/mlp/versions/1/infer", &body).status, 200);
    let r = server.post_json("/v2/models/mlp/infer", &body);
    assert_eq!(r.json()["model_version"], "2", "no version = the highest");

    assert_eq!(server.post_json("/v2/repository/models/mlp/unload", "{}").status, 200);
    let r = server.post_json("/v2/models/mlp/infer", &body);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(server.get("/v2/models/mlp/ready").status, 503);
    assert_eq!(server.post_json("/v2/repository/index", "{}").json()[0]["state"], "UNAVAILABLE");

    // A new version appears on disk; load picks it up.
    std::fs::create_dir_all(repo.path().join("mlp/3")).unwrap();
    std::fs::copy(fixture("mlp").join("model.onnx"), repo.path().join("mlp/3/model.onnx")).unwrap();
    assert_eq!(server.post_json("/v2/repository/models/mlp/load", "{}").status, 200);
    assert_eq!(server.post_json("/v2/models/mlp/infer", &body).json()["model_version"], "3");
    assert_eq!(server.post_json("/v2/repository/models/nope/load", "{}").status, 404);
    assert_eq!(server.get("/v2/health/ready").status, 200);
}

#[test]
fn metrics_cover_requests_stages_and_the_process() {
    let model = format!("mlp={}", fixture("mlp").join("model.onnx").display());
    let server = Server::start(&["--model", &model, "--metrics-listen", "127.0.0.1:0"]);
    let body = std::fs::read_to_string(fixture("mlp").join("input.json")).unwrap();
    for _ in 0..3 {
        assert_eq!(server.post_json("/v2/models/mlp/infer", &body).status, 200);
    }
    assert_eq!(server.post_json("/v2/models/mlp/infer", "{}").status, 400);
    let metrics_addr = server.metrics_addr.expect("metrics listener");
    let text = http(metrics_addr, "GET", "/metrics", &[], b"").text();
    for needle in [
        "kiln_requests_total{model=\"mlp\",protocol=\"v2\",status=\"200\",version=\"1\"} 3",
        "kiln_requests_total{model=\"mlp\",protocol=\"v2\",status=\"400\",version=\"1\"} 1",
        "kiln_request_duration_seconds_bucket{model=\"mlp\",protocol=\"v2\",version=\"1\",le=",
        "kiln_queue_duration_seconds_count{model=\"mlp\",version=\"1\"} 3",
        "kiln_compute_duration_seconds_count{model=\"mlp\",version=\"1\"} 3",
        "kiln_batch_size_sum{model=\"mlp\",version=\"1\"} 12",
        "kiln_in_flight_requests",
        "kiln_queue_depth{model=\"mlp\",version=\"1\"} 0",
        "kiln_instance_busy_ratio{model=\"mlp\",version=\"1\"}",
        "kiln_instances{model=\"mlp\",version=\"1\"}",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    assert_eq!(http(metrics_addr, "GET", "/v2", &[], b"").status, 404);
}

#[test]
fn json_logs_carry_the_request_id() {
    let model = format!("mlp={}", fixture("mlp").join("model.onnx").display());
    let server = Server::start_with_env(
        &["--model", &model],
        &[("KILN_LOG_FORMAT", "json"), ("KILN_LOG", "info,kiln=debug")],
    );
    let r = server.request(
        "POST",
        "/v2/models/mlp/infer",
        &[("Content-Type", "application/json"), ("x-request-id", "rid-4242")],
        b"{}",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-request-id"), Some("rid-4242"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server.log_text();
        let line = log.lines().find(|l| l.contains("rid-4242") && l.contains("served"));
        if let Some(line) = line {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["status"], 400);
            assert!(v.to_string().contains("\"id\":\"rid-4242\""), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "no JSON log line with the request id:\n{log}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn configuration_errors_exit_2_before_binding() {
    let run = |args: &[&str]| {
        std::process::Command::new(kiln_bin())
            .arg("serve")
            .args(args)
            .env("KILN_LOG", "warn")
            .output()
            .unwrap()
    };
    for (args, needle) in [
        (
            vec!["--model", "noequals"],
            "no model named \"noequals\" in the workspace (a file is given as NAME=PATH)",
        ),
        (vec!["--model", "a=/nonexistent.onnx"], "does not exist"),
        (vec!["--model", "../x=/tmp"], "invalid model name"),
        (vec![], "no models to serve"),
        (vec!["--model", "a=/tmp", "--request-timeout", "soon"], "invalid duration"),
        (vec!["--model", "a=/tmp", "--instances", "0"], "at least 1"),
        (vec!["--model-repository", "/nonexistent-repo"], "model repository /nonexistent-repo"),
        (vec!["--config", "/nonexistent.toml"], "cannot read /nonexistent.toml"),
    ] {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
    }
    // A model that cannot load is a failure (exit 1) with the reason.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.onnx");
    std::fs::write(&broken, b"garbage").unwrap();
    let out = run(&["--model", &format!("b={}", broken.display()), "--listen", "127.0.0.1:0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("failed to load") && stderr.contains("not an ONNX model"), "{stderr}");
}

#[test]
fn config_file_sets_models_and_settings() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("mlp").join("model.onnx"), dir.path().join("mlp.onnx")).unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        "[serve]\nmax_batch_size = 16\nrequest_timeout = \"5s\"\n\n[models.classifier]\npath = \"mlp.onnx\"\nversion = \"7\"\ninstances = 1\nbackend = \"tract\"\n",
    )
    .unwrap();
    let server = Server::start(&["--config", dir.path().join("kiln.toml").to_str().unwrap()]);
    let config = server.get("/v2/models/classifier/config").json();
    assert_eq!(config["max_batch_size"], 16);
    assert_eq!(config["backend"], "tract");
    assert_eq!(config["version_policy"]["specific"]["versions"], json!(["7"]));
    std::fs::write(dir.path().join("bad.toml"), "[serve]\nmax_batchsize = 16\n").unwrap();
    let out = std::process::Command::new(kiln_bin())
        .args(["serve", "--config", dir.path().join("bad.toml").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `max_batchsize`"));
}
