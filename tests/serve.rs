//! `kiln serve` end to end: the real server on 127.0.0.1:0, driven by the official tritonclient,
//! by raw HTTP for the V1 and Azure contracts, auth, and every kind of bad input.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::server::Server;
use common::*;
use serde_json::json;

fn model_args(names: &[&str]) -> Vec<String> {
    names
        .iter()
        .flat_map(|n| ["--model".to_string(), format!("{n}={}", fixture(n).join("model.onnx").display())])
        .collect()
}

fn start(names: &[&str], extra: &[&str]) -> Server {
    let mut args = model_args(names);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&refs)
}

#[test]
fn tritonclient_drives_every_fixture_json_and_binary() {
    let names = fixture_names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let server = start(&refs, &[]);
    let fixtures = fixtures_dir();
    let mut args = vec![server.addr.to_string(), fixtures.display().to_string()];
    args.extend(names.iter().cloned());
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_python("tritonclient_v2.py", &arg_refs);
    assert!(out.contains(&format!("inference checks passed on {} models", names.len())), "{out}");
}

#[test]
fn v2_metadata_routes_and_errors() {
    let server = start(&["mlp", "two_in_two_out"], &["--backend", "tract"]);
    let v2 = server.get("/v2").json();
    assert_eq!(v2["name"], "kiln");
    let models = server.get("/v2/models").json();
    assert_eq!(models["models"].as_array().unwrap().len(), 2);
    let md = server.get("/v2/models/mlp").json();
    assert_eq!(md["inputs"][0], json!({"name": "input", "datatype": "FP32", "shape": [-1, 64]}));
    assert_eq!(md["platform"], "tract_onnx");
    assert_eq!(server.get("/v2/models/mlp/versions/1").status, 200);
    assert_eq!(server.get("/v2/models/mlp/versions/1/ready").status, 200);
    let config = server.get("/v2/models/mlp/config").json();
    assert_eq!(config["max_batch_size"], 32);
    assert_eq!(config["input"][0]["dims"], json!([64]));
    assert_eq!(config["input"][0]["data_type"], "TYPE_FP32");

    let r = server.get("/v2/models/nope");
    assert_eq!(r.status, 404);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("unknown model \"nope\"; served models: mlp, two_in_two_out")
    );
    assert_eq!(server.get("/v2/models/mlp/versions/7").status, 404);
    assert_eq!(server.get("/v2/models/mlp/versions/7/ready").status, 404);
    assert_eq!(server.get("/v2/models/mlp/infer").status, 405);
    assert_eq!(server.get("/nowhere").status, 404);

    // Inputs given out of order, nested data, id echoed, outputs selected.
    let body = json!({
        "id": "r-1",
        "inputs": [
            {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [[1, 1, 1]]},
            {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [[1, 2, 3]]}
        ],
        "outputs": [{"name": "dot"}]
    });
    let r = server.post_json("/v2/models/two_in_two_out/infer", &body.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["id"], "r-1");
    assert_eq!(v["outputs"], json!([{"name": "dot", "datatype": "FP32", "shape": [1, 1], "data": [6.0]}]));
    assert!(r.header("x-request-id").is_some());
}

#[test]
fn v1_protocol() {
    let server = start(&["iris", "two_in_two_out", "strings"], &[]);
    let r = server.get("/v1/models/iris").json();
    assert_eq!(r["ready"], true);
    let want = read_json(fixture("iris").join("expected.json"));
    let rows = json!({"instances": [[5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5]]});
    let r = server.post_json("/v1/models/iris:predict", &rows.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    let p = &r.json()["predictions"];
    assert_eq!(p[0]["label"], 0);
    assert_eq!(p[1]["label"], 1);
    assert_eq!(p[0]["probabilities"].as_array().unwrap().len(), 3);
    let _ = want;
    // Row objects for a two-input model; columnar "inputs" too.
    let r = server.post_json(
        "/v1/models/two_in_two_out:predict",
        &json!({"instances": [{"a": [1, 2, 3], "b": [1, 1, 1]}, {"a": [0, 0, 1], "b": [2, 2, 2]}]})
            .to_string(),
    );
    assert_eq!(
        r.json()["predictions"],
        json!([{"sum": [2.0, 3.0, 4.0], "dot": [6.0]}, {"sum": [2.0, 2.0, 3.0], "dot": [2.0]}])
    );
    let r = server.post_json(
        "/v1/models/two_in_two_out:predict",
        &json!({"inputs": {"a": [[1, 2, 3]], "b": [[1, 1, 1]]}}).to_string(),
    );
    assert_eq!(r.json()["outputs"], json!({"sum": [[2.0, 3.0, 4.0]], "dot": [[6.0]]}));
    let r =
        server.post_json("/v1/models/strings:predict", &json!({"instances": ["dog", "fish"]}).to_string());
    assert_eq!(
        r.json()["predictions"],
        json!([{"label_id": 1, "family": "canidae"}, {"label_id": -1, "family": "unknown"}])
    );
    for (body, needle) in [
        (json!({}), "needs \"instances\""),
        (json!({"instances": [[1, 2]]}), "has shape [1, 2], the model expects [-1, 4]"),
        (json!({"instances": [[1, 2, 3, "x"]]}), "element 3 is \"x\""),
        (json!({"instances": [{"a": [1, 2, 3]}]}), "instance 0 has no input \"b\""),
    ] {
        let model = if body.to_string().contains("\"a\"") { "two_in_two_out" } else { "iris" };
        let r = server.post_json(&format!("/v1/models/{model}:predict"), &body.to_string());
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.json()["error"].as_str().unwrap().contains(needle), "{needle}: {}", r.text());
    }
}

#[test]
fn azure_score_contract() {
    let one = start(&["iris"], &[]);
    let r = one.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "Healthy"));
    let r = one.post_json("/score", &json!({"data": [[5.1, 3.5, 1.4, 0.2]]}).to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["label"], json!([0]));
    let want = read_json(fixture("iris").join("expected.json"));
    let p = v["probabilities"][0].as_array().unwrap();
    let w = &want["outputs"][1]["data"];
    for i in 0..3 {
        let (a, b) = (p[i].as_f64().unwrap(), w[i].as_f64().unwrap());
        assert!((a - b).abs() <= ATOL + RTOL * b.abs(), "{a} vs {b}");
    }
    assert!(r.header("x-ms-request-id").is_some());
    assert!(r.header("x-ms-run-fn-exec-ms").unwrap().parse::<f64>().unwrap() >= 0.0);
    let r = one.request(
        "POST",
        "/score",
        &[("Content-Type", "application/json"), ("x-ms-request-id", "abc-123")],
        br#"{"data": [[1,2,3,4]]}"#,
    );
    assert_eq!(r.header("x-ms-request-id"), Some("abc-123"));
    let r = one.post_json("/score", "{\"data\": [[1, 2]]}");
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap().contains("the model expects [-1, 4]"), "{}", r.text());
    for version in ["2", "3"] {
        let s = one.get(&format!("/swagger.json?version={version}")).json();
        let key = if version == "2" { "swagger" } else { "openapi" };
        assert!(s[key].is_string(), "{s}");
        assert!(s["paths"]["/score"]["post"].is_object());
    }
    let s = one.get("/swagger.json").json();
    assert_eq!(s["definitions"]["ServiceInput"]["properties"]["data"]["items"]["maxItems"], 4);
    assert_eq!(one.get("/swagger.json?version=9").status, 400);

    let two = start(&["iris", "mlp"], &[]);
    let r = two.post_json("/score", &json!({"data": [[5.1, 3.5, 1.4, 0.2]]}).to_string());
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap().contains("several models are served (iris, mlp)"));
    let r = two.post_json("/score?model=iris", &json!({"data": [[5.1, 3.5, 1.4, 0.2]]}).to_string());
    assert_eq!(r.status, 200);
    let r = two.request(
        "POST",
        "/score",
        &[("Content-Type", "application/json"), ("azureml-model-deployment", "iris")],
        json!({"inputs": {"float_input": [[5.1, 3.5, 1.4, 0.2]]}}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(two.post_json("/score?model=nope", "{}").status, 404);
}

#[test]
fn auth_key_guards_everything_but_health_and_metrics() {
    let server = start(&["mlp"], &["--auth-key", "s3cret"]);
    let body = std::fs::read_to_string(fixture("mlp").join("input.json")).unwrap();
    let r = server.post_json("/v2/models/mlp/infer", &body);
    assert_eq!(r.status, 401);
    assert!(r.json()["error"].as_str().unwrap().contains("Authorization: Bearer"));
    let wrong = [("Content-Type", "application/json"), ("Authorization", "Bearer s3cre")];
    assert_eq!(server.request("POST", "/v2/models/mlp/infer", &wrong, body.as_bytes()).status, 401);
    let right = [("Content-Type", "application/json"), ("Authorization", "Bearer s3cret")];
    assert_eq!(server.request("POST", "/v2/models/mlp/infer", &right, body.as_bytes()).status, 200);
    assert_eq!(server.get("/v2/models/mlp").status, 401);
    assert_eq!(server.request("POST", "/score", &[], b"{}").status, 401);
    for open in ["/v2/health/live", "/v2/health/ready", "/", "/metrics"] {
        assert_eq!(server.get(open).status, 200, "{open}");
    }
}
