//! Every kind of bad input gets a precise 4xx with the protocol's error body, costs bounded
//! memory, and the server keeps serving.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::server::{Server, read_response, try_http};
use common::*;
use serde_json::json;

fn mlp_server(extra: &[&str]) -> Server {
    let model = format!("mlp={}", fixture("mlp").join("model.onnx").display());
    let mut args = vec!["--model", &model, "--backend", "tract"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn assert_error(r: &common::server::HttpResponse, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
}

fn good_body() -> String {
    std::fs::read_to_string(fixture("mlp").join("input.json")).unwrap()
}

fn one(n: usize) -> String {
    vec!["0.5"; n].join(",")
}

#[test]
fn malformed_requests_get_precise_400s_and_the_server_keeps_serving() {
    let server = mlp_server(&["--max-body-bytes", "1MiB"]);
    let path = "/v2/models/mlp/infer";
    let cases: Vec<(String, &str)> = vec![
        ("{\"inputs\": [".into(), "invalid inference request"),
        ("not json at all".into(), "invalid inference request"),
        (json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1, 2]}]}).to_string(),
            "data has 2 elements, but shape [1, 64] needs 64"),
        (json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP17", "data": []}]}).to_string(),
            "unknown datatype \"FP17\""),
        (json!({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": vec![0.5; 63]}]}).to_string(),
            "has shape [1, 63], the model expects [-1, 64]"),
        (json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT32", "data": vec![1; 64]}]}).to_string(),
            "datatype INT32, the model expects FP32"),
        (json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5; 64]}]}).to_string(),
            "unknown input \"x\""),
        (format!(r#"{{"inputs":[{{"name":"input","shape":[1,64],"datatype":"FP32","data":[{},"a"]}}]}}"#, one(63)),
            "data element 63 is the string \"a\""),
        (r#"{"inputs":[{"name":"input","shape":[9223372036854775807,9223372036854775807],"datatype":"FP32","data":[1]}]}"#.into(),
            "more elements than this machine can address"),
        (r#"{"inputs":[{"name":"input","shape":[100000000000,64],"datatype":"FP32","data":[1]}]}"#.into(),
            "data has 1 elements, but shape [100000000000, 64] needs 6400000000000"),
        (r#"{"inputs":[{"name":"input","shape":[-1,64],"datatype":"FP32","data":[1]}]}"#.into(), "negative dimension"),
        (json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5; 64]}],
                "outputs": [{"name": "nope"}]}).to_string(), "unknown output \"nope\""),
    ];
    for (body, needle) in &cases {
        let r = server.post_json(path, body);
        assert_error(&r, 400, needle);
    }
    // Non-UTF-8 in the JSON.
    let mut bad = br#"{"inputs":[{"name":"inp"#.to_vec();
    bad.extend_from_slice(&[0xff, 0xfe]);
    bad.extend_from_slice(br#"ut","shape":[1],"datatype":"FP32","data":[1]}]}"#);
    assert_error(
        &server.request("POST", path, &[("Content-Type", "application/json")], &bad),
        400,
        "invalid inference request",
    );
    // Wrong content type, compressed body.
    assert_error(&server.request("POST", path, &[("Content-Type", "text/csv")], b"1,2"), 415, "text/csv");
    assert_error(
        &server.request("POST", path, &[("Content-Encoding", "gzip")], good_body().as_bytes()),
        415,
        "Content-Encoding",
    );
    // Binary extension lies.
    let header = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}).to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&[0u8; 100]);
    let hl = header.len().to_string();
    let r = server.request("POST", path, &[("Inference-Header-Content-Length", &hl)], &body);
    assert_error(&r, 400, "runs past the end of the body");
    let r = server.request("POST", path, &[("Inference-Header-Content-Length", "99999")], &body);
    assert_error(&r, 400, "Inference-Header-Content-Length is 99999 but the body has only");
    let r = server.request("POST", path, &[("Inference-Header-Content-Length", "abc")], &body);
    assert_error(&r, 400, "must be a non-negative integer");
    body.extend_from_slice(&[0u8; 200]);
    let r = server.request("POST", path, &[("Inference-Header-Content-Length", &hl)], &body);
    assert_error(&r, 400, "not claimed by any input");
    // Unknown model and version.
    assert_error(&server.post_json("/v2/models/nope/infer", &good_body()), 404, "unknown model \"nope\"");
    assert_error(
        &server.post_json("/v2/models/mlp/versions/3/infer", &good_body()),
        404,
        "has no version \"3\"",
    );
    // And it still serves.
    let r = server.post_json(path, &good_body());
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn oversized_bodies_get_413_with_or_without_content_length() {
    let server = mlp_server(&["--max-body-bytes", "64KiB"]);
    let big = vec![b' '; 200 * 1024];
    let r = server.request("POST", "/v2/models/mlp/infer", &[("Content-Type", "application/json")], &big);
    assert_error(&r, 413, "exceeds the limit of 65536 bytes");
    // Chunked, no Content-Length: the limit applies while reading.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    let chunk = vec![b' '; 16 * 1024];
    for _ in 0..8 {
        if write!(s, "{:x}\r\n", chunk.len()).is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(server.post_json("/v2/models/mlp/infer", &good_body()).status, 200);
}

#[test]
fn bad_input_costs_bounded_memory() {
    let server = mlp_server(&["--max-body-bytes", "2MiB"]);
    // Warm up allocator pools with valid traffic first.
    for _ in 0..50 {
        assert_eq!(server.post_json("/v2/models/mlp/infer", &good_body()).status, 200);
    }
    let before = server.rss_kib();
    let huge_shape =
        r#"{"inputs":[{"name":"input","shape":[4000000000,64],"datatype":"FP32","data":[1,2,3]}]}"#;
    let near_limit = format!(
        r#"{{"inputs":[{{"name":"input","shape":[1,64],"datatype":"FP32","data":[{}]}}]}}"#,
        one(200_000)
    );
    for _ in 0..30 {
        assert_eq!(server.post_json("/v2/models/mlp/infer", huge_shape).status, 400);
        assert_eq!(server.post_json("/v2/models/mlp/infer", &near_limit).status, 400);
        let r = try_http(server.addr, "POST", "/v2/models/mlp/infer", &[], &vec![b'['; 3 << 20]);
        assert!(r.map(|r| r.status == 413).unwrap_or(true));
    }
    let after = server.rss_kib();
    assert!(after < before + 32 * 1024, "RSS grew from {before} KiB to {after} KiB over 90 bad requests");
    assert_eq!(server.post_json("/v2/models/mlp/infer", &good_body()).status, 200);
}

#[test]
fn garbage_on_the_wire_does_not_hurt() {
    let server = mlp_server(&[]);
    for junk in [
        &b"\x00\x01\x02 garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v2 HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(junk).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
    }
    assert_eq!(server.post_json("/v2/models/mlp/infer", &good_body()).status, 200);
}
