//! The workspace and model registry through the real `kiln` binary: register, version, tag,
//! search, protect; crash and concurrency safety; bad input; models as OCI artifacts pushed to and
//! pulled from a real registry (Debian's docker-registry), inspected and copied by skopeo.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::oci_registry::{OciRegistry, which};
use common::*;
use serde_json::Value;

fn kiln_ws(ws: &Path, args: &[&str]) -> Output {
    Command::new(kiln_bin())
        .arg("--workspace")
        .arg(ws)
        .args(args)
        .env("KILN_LOG", "warn")
        .env("KILN_REGISTRY_ATTEMPTS", "2")
        .output()
        .unwrap()
}

/// [`common::fails`], and never by panicking.
fn fails(out: &Output, code: i32, needle: &str) {
    common::fails(out, code, needle);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

fn model_path(name: &str) -> String {
    fixture(name).join("model.onnx").display().to_string()
}

#[test]
fn register_version_tag_search_show_download() {
    let ws = tempfile::tempdir().unwrap();
    let w = ws.path();
    assert_eq!(
        ok(&kiln_ws(
            w,
            &[
                "model",
                "register",
                "iris",
                &model_path("iris"),
                "--description",
                "iris classifier",
                "--tag",
                "stage=dev",
                "--property",
                "accuracy=0.97"
            ]
        ))
        .trim(),
        "iris:1"
    );
    assert_eq!(
        ok(&kiln_ws(w, &["model", "register", "iris", &model_path("iris"), "--tag", "stage=prod"])).trim(),
        "iris:2"
    );
    assert_eq!(ok(&kiln_ws(w, &["model", "register", "mlp", &model_path("mlp")])).trim(), "mlp:1");

    let shown = json(&kiln_ws(w, &["model", "show", "iris:1", "--json"]));
    assert_eq!(shown["description"], "iris classifier");
    assert_eq!(shown["tags"]["stage"], "dev");
    assert_eq!(shown["properties"]["accuracy"], "0.97");
    assert_eq!(shown["files"][0]["path"], "model.onnx");
    assert_eq!(shown["files"][0]["onnx"]["inputs"][0]["name"], "float_input");
    assert_eq!(shown["files"][0]["onnx"]["opsets"]["ai.onnx.ml"], 1);
    let digest = shown["files"][0]["digest"].as_str().unwrap().to_string();
    let expected =
        format!("sha256:{}", sha256_hex(&std::fs::read(fixture("iris").join("model.onnx")).unwrap()));
    assert_eq!(digest, expected, "the recorded digest is the file's sha256");
    assert_eq!(json(&kiln_ws(w, &["model", "show", "iris", "--json"]))["version"], 2, "no version = latest");

    // Latest per name by default; all versions on request; filters.
    let list = json(&kiln_ws(w, &["model", "list", "--json"]));
    let names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{}:{}", m["name"].as_str().unwrap(), m["version"]))
        .collect();
    assert_eq!(names, ["iris:2", "mlp:1"]);
    assert_eq!(
        json(&kiln_ws(w, &["model", "list", "--all-versions", "--json"])).as_array().unwrap().len(),
        3
    );
    let prod = json(&kiln_ws(w, &["model", "list", "--tag", "stage=prod", "--json"]));
    assert_eq!(prod.as_array().unwrap().len(), 1);
    let dev = json(&kiln_ws(w, &["model", "list", "--all-versions", "--tag", "stage=dev", "--json"]));
    assert_eq!(dev[0]["version"], 1);
    assert_eq!(
        json(&kiln_ws(w, &["model", "list", "--all-versions", "--property", "accuracy=0.97", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        json(&kiln_ws(w, &["model", "list", "--tag", "stage", "--json"])).as_array().unwrap().len(),
        1
    );
    let table = ok(&kiln_ws(w, &["model", "list"]));
    assert!(table.starts_with("NAME") && table.contains("iris") && table.contains("stage=prod"), "{table}");

    // Tags are mutable; properties add-only.
    ok(&kiln_ws(w, &["model", "tag", "iris:1", "stage=archived", "owner=ml"]));
    ok(&kiln_ws(w, &["model", "tag", "iris:1", "--remove", "owner"]));
    let t = json(&kiln_ws(w, &["model", "show", "iris:1", "--json"]));
    assert_eq!(t["tags"], serde_json::json!({"stage": "archived"}));
    ok(&kiln_ws(w, &["model", "property", "iris:1", "dataset=uci"]));
    fails(&kiln_ws(w, &["model", "property", "iris:1", "accuracy=0.99"]), 2, "properties are add-only");
    assert_eq!(json(&kiln_ws(w, &["model", "show", "iris:1", "--json"]))["properties"]["accuracy"], "0.97");

    // Download gives the bytes back.
    let out = tempfile::tempdir().unwrap();
    ok(&kiln_ws(w, &["model", "download", "iris:1", out.path().to_str().unwrap()]));
    assert_eq!(
        std::fs::read(out.path().join("model.onnx")).unwrap(),
        std::fs::read(fixture("iris").join("model.onnx")).unwrap()
    );
    fails(&kiln_ws(w, &["model", "download", "iris:1", out.path().to_str().unwrap()]), 2, "already exists");

    // Delete, then gc frees nothing still used (iris:2 has the same file) .
    ok(&kiln_ws(w, &["model", "delete", "iris:1"]));
    fails(&kiln_ws(w, &["model", "show", "iris:1"]), 2, "has no version 1");
    ok(&kiln_ws(w, &["workspace", "gc"]));
    ok(&kiln_ws(w, &["model", "download", "iris:2", tempfile::tempdir().unwrap().path().to_str().unwrap()]));
    assert!(ok(&kiln_ws(w, &["workspace", "verify"])).contains("is clean"));
    let summary = json(&kiln_ws(w, &["workspace", "show", "--json"]));
    assert_eq!(summary["versions"], 2);
    assert!(w.join("oci-layout").is_file() && w.join("blobs/sha256").is_dir(), "an OCI image layout");
}

fn sha256_hex(bytes: &[u8]) -> String {
    kiln_images::digest::Digest::of(bytes).hex().to_string()
}

#[test]
fn directories_register_as_one_model() {
    let ws = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("assets")).unwrap();
    std::fs::copy(fixture("mlp").join("model.onnx"), src.path().join("model.onnx")).unwrap();
    std::fs::write(src.path().join("score.py"), "def run(data):\n    return data\n").unwrap();
    std::fs::write(src.path().join("assets/labels.txt"), "cat\ndog\n").unwrap();
    assert_eq!(
        ok(&kiln_ws(ws.path(), &["model", "register", "bundle", src.path().to_str().unwrap()])).trim(),
        "bundle:1"
    );
    let m = json(&kiln_ws(ws.path(), &["model", "show", "bundle", "--json"]));
    let paths: Vec<&str> =
        m["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["assets/labels.txt", "model.onnx", "score.py"]);
    let out = tempfile::tempdir().unwrap();
    ok(&kiln_ws(ws.path(), &["model", "download", "bundle:1", out.path().to_str().unwrap()]));
    for p in paths {
        assert_eq!(
            std::fs::read(out.path().join(p)).unwrap(),
            std::fs::read(src.path().join(p)).unwrap(),
            "{p}"
        );
    }
}

#[test]
fn bad_input_is_refused_and_nothing_is_lost() {
    let ws = tempfile::tempdir().unwrap();
    let w = ws.path();
    ok(&kiln_ws(w, &["model", "register", "keep", &model_path("mlp")]));
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("model.onnx");
    std::fs::write(&fake, b"this is not protobuf").unwrap();
    fails(
        &kiln_ws(w, &["model", "register", "fake", fake.to_str().unwrap()]),
        2,
        "is named .onnx but not an ONNX model",
    );
    fails(&kiln_ws(w, &["model", "register", "x", "/nonexistent/model.onnx"]), 2, "does not exist");
    fails(&kiln_ws(w, &["model", "register", "../evil", &model_path("mlp")]), 2, "invalid model name");
    fails(
        &kiln_ws(w, &["model", "register", "x", &model_path("mlp"), "--tag", "novalue"]),
        2,
        "is not KEY=VALUE",
    );
    fails(&kiln_ws(w, &["model", "show", "nope"]), 2, "no model named \"nope\"");
    fails(&kiln_ws(w, &["model", "show", "keep:7"]), 2, "has no version 7; versions: 1");
    fails(&kiln_ws(w, &["model", "show", "keep:x"]), 2, "must be a positive integer");
    fails(&kiln_ws(w, &["model", "tag", "keep", "a=b"]), 2, "give the version too");
    let unreadable = dir.path().join("secret.bin");
    std::fs::write(&unreadable, b"x").unwrap();
    std::fs::create_dir_all(dir.path().join("sub")).unwrap();
    fails(
        &kiln_ws(w, &["model", "register", "empty", dir.path().join("sub").to_str().unwrap()]),
        2,
        "no files to register",
    );
    assert_eq!(
        json(&kiln_ws(w, &["model", "list", "--all-versions", "--json"])).as_array().unwrap().len(),
        1
    );
    assert!(ok(&kiln_ws(w, &["workspace", "verify"])).contains("is clean"));
}

#[test]
fn a_workspace_from_a_newer_kiln_is_refused() {
    let ws = tempfile::tempdir().unwrap();
    ok(&kiln_ws(ws.path(), &["model", "register", "m", &model_path("mlp")]));
    let conn = rusqlite::Connection::open(ws.path().join("kiln.db")).unwrap();
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    fails(&kiln_ws(ws.path(), &["model", "list"]), 1, "schema version 99, newer than the 1 this kiln reads");
}

#[test]
fn parallel_registers_get_distinct_versions() {
    let ws = tempfile::tempdir().unwrap();
    ok(&kiln_ws(ws.path(), &["workspace", "show"]));
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(kiln_bin())
                .args([
                    "--workspace",
                    ws.path().to_str().unwrap(),
                    "model",
                    "register",
                    "race",
                    &model_path("cnn"),
                ])
                .env("KILN_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut versions: Vec<String> =
        children.into_iter().map(|c| ok(&c.wait_with_output().unwrap()).trim().to_string()).collect();
    versions.sort_by_key(|v| v.split(':').nth(1).unwrap().parse::<u32>().unwrap());
    assert_eq!(versions, (1..=8).map(|v| format!("race:{v}")).collect::<Vec<_>>());
    assert!(ok(&kiln_ws(ws.path(), &["workspace", "verify"])).contains("is clean"));
}

#[test]
fn killed_registrations_leave_a_clean_workspace() {
    let ws = tempfile::tempdir().unwrap();
    let w = ws.path();
    ok(&kiln_ws(w, &["model", "register", "earlier", &model_path("cnn")]));
    let big = tempfile::tempdir().unwrap();
    let big_file = big.path().join("weights.bin");
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut f = std::fs::File::create(&big_file).unwrap();
    for _ in 0..192 {
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    drop(f);
    for delay_ms in [5u64, 30, 80, 150, 300] {
        let mut child = Command::new(kiln_bin())
            .args([
                "--workspace",
                w.to_str().unwrap(),
                "model",
                "register",
                "big",
                big_file.to_str().unwrap(),
            ])
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let verify = kiln_ws(w, &["workspace", "verify"]);
        assert!(ok(&verify).contains("is clean"), "after a kill at {delay_ms} ms: {}", ok(&verify));
        let out = tempfile::tempdir().unwrap();
        ok(&kiln_ws(w, &["model", "download", "earlier:1", out.path().to_str().unwrap()]));
        assert_eq!(
            std::fs::read(out.path().join("model.onnx")).unwrap(),
            std::fs::read(fixture("cnn").join("model.onnx")).unwrap()
        );
    }
    ok(&kiln_ws(w, &["workspace", "gc"]));
    assert!(
        std::fs::read_dir(w.join("blobs/.tmp")).unwrap().next().is_none(),
        "gc removes interrupted writes"
    );
    assert!(ok(&kiln_ws(w, &["workspace", "verify"])).contains("is clean"));
}

#[test]
fn a_full_disk_fails_cleanly() {
    let ws = tempfile::tempdir().unwrap();
    let w = ws.path();
    ok(&kiln_ws(w, &["model", "register", "small", &model_path("mlp")]));
    let big = tempfile::tempdir().unwrap();
    let big_file = big.path().join("weights.bin");
    std::fs::write(&big_file, vec![7u8; 8 << 20]).unwrap();
    // No mount privileges needed: a file-size limit makes writes past 2 MiB fail with EFBIG,
    // as a full disk would fail them with ENOSPC (SIGXFSZ is ignored so the write returns).
    let out = Command::new("bash")
        .args(["-c", "trap '' XFSZ; ulimit -f 2048; exec \"$@\"", "bash"])
        .arg(kiln_bin())
        .args(["--workspace", w.to_str().unwrap(), "model", "register", "big", big_file.to_str().unwrap()])
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    fails(&out, 1, "File too large");
    assert_eq!(
        json(&kiln_ws(w, &["model", "list", "--all-versions", "--json"])).as_array().unwrap().len(),
        1
    );
    assert!(ok(&kiln_ws(w, &["workspace", "verify"])).contains("is clean"));
}

#[test]
fn models_round_trip_through_a_real_oci_registry() {
    let registry = OciRegistry::start();
    let a = tempfile::tempdir().unwrap();
    ok(&kiln_ws(
        a.path(),
        &[
            "model",
            "register",
            "iris",
            &model_path("iris"),
            "--description",
            "round trip",
            "--tag",
            "stage=prod",
            "--tag",
            "team=ml",
            "--property",
            "auc=0.99",
        ],
    ));
    let reference = format!("{}/models/iris:v1", registry.host());
    let push = ok(&kiln_ws(a.path(), &["model", "push", "iris:1", &reference, "--insecure-registry"]));
    assert!(push.contains("2 blob(s) uploaded"), "{push}");

    // skopeo sees a ModelPack artifact and copies it to an OCI layout.
    let skopeo = which("skopeo");
    let raw = Command::new(&skopeo)
        .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{reference}")])
        .output()
        .unwrap();
    assert!(raw.status.success(), "{}", String::from_utf8_lossy(&raw.stderr));
    let manifest: Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(manifest["artifactType"], "application/vnd.cncf.model.manifest.v1+json");
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.cncf.model.config.v1+json");
    assert_eq!(manifest["layers"][0]["mediaType"], "application/vnd.cncf.model.weight.v1.raw");
    assert_eq!(manifest["layers"][0]["annotations"]["org.cncf.model.filepath"], "model.onnx");
    let copy_dir = tempfile::tempdir().unwrap();
    let copied = Command::new(&skopeo)
        .args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{reference}"),
            &format!("oci:{}:iris", copy_dir.path().display()),
        ])
        .output()
        .unwrap();
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    assert_eq!(
        std::fs::read(copy_dir.path().join("blobs/sha256").join(&layer)).unwrap(),
        std::fs::read(fixture("iris").join("model.onnx")).unwrap()
    );

    // Pushing it unchanged uploads nothing.
    registry.clear_log();
    let again = ok(&kiln_ws(a.path(), &["model", "push", "iris:1", &reference, "--insecure-registry"]));
    assert!(again.contains("0 blob(s) uploaded") && again.contains("2 already present"), "{again}");
    assert!(
        registry.log_lines("blobs/uploads").is_empty(),
        "no upload request on an unchanged push: {:?}",
        registry.log_lines("blobs/uploads")
    );

    // Pull into another workspace: everything survives, byte for byte.
    let b = tempfile::tempdir().unwrap();
    assert_eq!(
        ok(&kiln_ws(b.path(), &["model", "pull", &reference, "--insecure-registry"])).trim(),
        "iris:1"
    );
    let (ma, mb) = (
        json(&kiln_ws(a.path(), &["model", "show", "iris:1", "--json"])),
        json(&kiln_ws(b.path(), &["model", "show", "iris:1", "--json"])),
    );
    for field in ["name", "version", "description", "tags", "properties", "files", "created_at"] {
        assert_eq!(ma[field], mb[field], "{field}");
    }
    let out = tempfile::tempdir().unwrap();
    ok(&kiln_ws(b.path(), &["model", "download", "iris", out.path().to_str().unwrap()]));
    assert_eq!(
        std::fs::read(out.path().join("model.onnx")).unwrap(),
        std::fs::read(fixture("iris").join("model.onnx")).unwrap()
    );
    assert!(
        ok(&kiln_ws(b.path(), &["model", "pull", &reference, "--insecure-registry"]))
            .contains("already in the workspace")
    );
    // By digest too.
    let digest = push.split('@').nth(1).unwrap().split_whitespace().next().unwrap();
    let by_digest = format!("{}/models/iris@{digest}", registry.host());
    assert!(ok(&kiln_ws(b.path(), &["model", "pull", &by_digest, "--insecure-registry"])).contains("iris:1"));

    // Plain HTTP only when asked for.
    let tls = kiln_ws(a.path(), &["model", "push", "iris:1", &reference]);
    assert_eq!(tls.status.code(), Some(1), "{}", String::from_utf8_lossy(&tls.stderr));
}

#[test]
fn a_registry_that_dies_mid_push_is_retried_and_resumed() {
    let mut registry = OciRegistry::start();
    let ws = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    for i in 0..4u8 {
        std::fs::write(src.path().join(format!("shard{i}.bin")), vec![i; 24 << 20]).unwrap();
    }
    ok(&kiln_ws(ws.path(), &["model", "register", "sharded", src.path().to_str().unwrap()]));
    let reference = format!("{}/models/sharded:1", registry.host());

    // Killed and not back: a clear error naming the registry.
    let push = Command::new(kiln_bin())
        .args([
            "--workspace",
            ws.path().to_str().unwrap(),
            "model",
            "push",
            "sharded:1",
            &reference,
            "--insecure-registry",
        ])
        .env("KILN_LOG", "warn")
        .env("KILN_REGISTRY_ATTEMPTS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while registry.log_lines("PUT /v2/models/sharded/blobs/uploads").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    registry.kill();
    let out = push.wait_with_output().unwrap();
    fails(&out, 1, &registry.host());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("attempt"), "{stderr}");

    // Back up: the same command resumes, skipping the blobs that made it.
    registry.restart();
    let done = ok(&kiln_ws(ws.path(), &["model", "push", "sharded:1", &reference, "--insecure-registry"]));
    assert!(done.contains("already present") && !done.contains(" 0 already present"), "{done}");

    // Killed and restarted while the push retries: it completes by itself.
    let reference2 = format!("{}/models/sharded2:1", registry.host());
    let push = Command::new(kiln_bin())
        .args([
            "--workspace",
            ws.path().to_str().unwrap(),
            "model",
            "push",
            "sharded:1",
            &reference2,
            "--insecure-registry",
        ])
        .env("KILN_LOG", "warn")
        .env("KILN_REGISTRY_ATTEMPTS", "8")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    registry.restart();
    let out = push.wait_with_output().unwrap();
    ok(&out);
    let b = tempfile::tempdir().unwrap();
    assert_eq!(
        ok(&kiln_ws(b.path(), &["model", "pull", &reference2, "--insecure-registry"])).trim(),
        "sharded:1"
    );
    assert!(ok(&kiln_ws(b.path(), &["workspace", "verify"])).contains("is clean"));
}

/// A fake registry answering every request with a fixed response.
fn fake_registry(response: &'static [u8]) -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    use std::io::{Read, Write};
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = [0u8; 8192];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(response);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    (addr.to_string(), handle)
}

#[test]
fn registries_that_refuse_fail_or_babble_give_clear_errors() {
    let ws = tempfile::tempdir().unwrap();
    ok(&kiln_ws(ws.path(), &["model", "register", "m", &model_path("mlp")]));
    for (response, needle) in [
        (
            &b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"[..],
            "refused the credentials",
        ),
        (
            &b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops!"[..],
            "failed after 2 attempt(s)",
        ),
        (&b"\x00\x01garbage that is not HTTP\r\n\r\n"[..], "registry 127.0.0.1"),
    ] {
        let (host, _server) = fake_registry(response);
        let out = kiln_ws(
            ws.path(),
            &["model", "push", "m:1", &format!("{host}/models/m:1"), "--insecure-registry"],
        );
        fails(&out, 1, needle);
        let out =
            kiln_ws(ws.path(), &["model", "pull", &format!("{host}/models/m:1"), "--insecure-registry"]);
        assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    }
    fails(
        &kiln_ws(ws.path(), &["model", "push", "m:1", "no-registry-here"]),
        2,
        "expected REGISTRY/REPOSITORY",
    );
    assert_eq!(json(&kiln_ws(ws.path(), &["model", "list", "--json"])).as_array().unwrap().len(), 1);
}

#[test]
fn serve_resolves_registered_models() {
    let ws = tempfile::tempdir().unwrap();
    ok(&kiln_ws(ws.path(), &["model", "register", "mlp", &model_path("mlp")]));
    ok(&kiln_ws(ws.path(), &["model", "register", "mlp", &model_path("mlp"), "--tag", "v=2"]));
    let env = [("KILN_WORKSPACE", ws.path().to_str().unwrap())];
    let body = std::fs::read_to_string(fixture("mlp").join("input.json")).unwrap();
    let server = common::server::Server::start_with_env(&["--model", "mlp:1", "--backend", "tract"], &env);
    let r = server.post_json("/v2/models/mlp/infer", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model_version"], "1");
    drop(server);
    let latest = common::server::Server::start_with_env(&["--model", "mlp", "--backend", "tract"], &env);
    let r = latest.post_json("/v2/models/mlp/infer", &body);
    assert_eq!(r.json()["model_version"], "2", "no version = the latest registered");
    compare_outputs(&r.json()["outputs"], &read_json(fixture("mlp").join("expected.json"))["outputs"])
        .unwrap();
    let out = Command::new(kiln_bin())
        .args(["--workspace", ws.path().to_str().unwrap(), "serve", "--model", "nope:3"])
        .output()
        .unwrap();
    fails(&out, 2, "no model named \"nope\"");
}
