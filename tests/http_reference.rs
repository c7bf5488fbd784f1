//! docs/http.md lists every route; each must be known to the server (no 404 "no route").

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::server::Server;
use common::*;

#[test]
fn every_documented_route_exists() {
    let doc = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/http.md"))
        .unwrap();
    let model = format!("mlp={}", fixture("mlp").join("model.onnx").display());
    let server = Server::start(&["--model", &model]);
    let mut checked = 0;
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(method), Some(path)) = (cells.get(1), cells.get(2)) else { continue };
        if !matches!(*method, "GET" | "POST") {
            continue;
        }
        let path = path.trim_matches('`').replace("{m}", "mlp").replace("{v}", "1");
        let body = if path.ends_with("infer") {
            std::fs::read(fixture("mlp").join("input.json")).unwrap()
        } else if path.contains(":predict") {
            br#"{"instances": [[0.5]]}"#.to_vec()
        } else {
            b"{}".to_vec()
        };
        let path =
            if path == "/swagger.json" || path == "/score" { format!("{path}?model=mlp") } else { path };
        // Unload last would break later rows; the table lists load before unload, so reload after.
        let r = server.request(method, &path, &[("Content-Type", "application/json")], &body);
        let no_route = r.status == 404 && r.text().contains("no route");
        assert!(!no_route && r.status != 405, "{method} {path}: {} {}", r.status, r.text());
        if path.ends_with("/unload") {
            assert_eq!(server.post_json("/v2/repository/models/mlp/load", "{}").status, 200);
        }
        checked += 1;
    }
    assert!(checked >= 24, "only {checked} routes found in docs/http.md");
}
