//! `kiln image`: reproducible OCI images without Docker, pushed to a real registry, inspected and
//! copied by skopeo, unpacked by umoci, run by runc, scored over V2 and compared with onnxruntime.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::oci_registry::{OciRegistry, which};
use common::server::http;
use common::*;
use serde_json::Value;

fn kiln_ws(ws: &Path, args: &[&str]) -> Output {
    kiln_ws_env(ws, args, &[])
}

fn kiln_ws_env(ws: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(kiln_bin());
    c.arg("--workspace").arg(ws).args(args).env("KILN_LOG", "warn").env("SOURCE_DATE_EPOCH", "1700000000");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// [`common::ok`], trimmed: most commands here print one line (a digest, a tag).
fn ok(out: &Output) -> String {
    common::ok(out).trim().to_string()
}

fn register(ws: &Path, name: &str) {
    ok(&kiln_ws(ws, &["model", "register", name, fixture(name).join("model.onnx").to_str().unwrap()]));
}

fn tool(name: &str, args: &[&str]) -> Output {
    let out = Command::new(which(name)).args(args).output().unwrap();
    assert!(out.status.success(), "{name} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An unpacked image run by runc with host networking; deleted on drop.
struct Container {
    id: String,
    child: std::process::Child,
    port: u16,
    _bundle: tempfile::TempDir,
}

impl Container {
    /// skopeo-copies `reference` from the registry, umoci-unpacks it and runs it with runc.
    fn run(reference: &str, tag: &str) -> (Container, Duration) {
        let layout = tempfile::tempdir().unwrap();
        let oci = format!("oci:{}:{tag}", layout.path().display());
        tool("skopeo", &["copy", "--src-tls-verify=false", &format!("docker://{reference}"), &oci]);
        let bundle = tempfile::tempdir().unwrap();
        let rootfs_bundle = bundle.path().join("b");
        tool(
            "umoci",
            &[
                "unpack",
                "--image",
                &format!("{}:{tag}", layout.path().display()),
                rootfs_bundle.to_str().unwrap(),
            ],
        );
        let config_path = rootfs_bundle.join("config.json");
        let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
        // This machine's kernel set-up: no resource limits, no cgroup namespace; host network.
        config["linux"].as_object_mut().unwrap().remove("resources");
        let ns: Vec<Value> = config["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["type"] != "cgroup" && n["type"] != "network")
            .cloned()
            .collect();
        config["linux"]["namespaces"] = Value::Array(ns);
        config["process"]["terminal"] = false.into();
        let port = free_port();
        config["process"]["env"].as_array_mut().unwrap().push(format!("KILN_LISTEN=127.0.0.1:{port}").into());
        std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
        let id = format!("kiln-test-{}-{port}", std::process::id());
        let started = Instant::now();
        let child = Command::new(which("runc"))
            .args(["run", "--bundle", rootfs_bundle.to_str().unwrap(), &id])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let container = Container { id, child, port, _bundle: bundle };
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        loop {
            if let Ok(r) = common::server::try_http(addr, "GET", "/v2/health/ready", &[], b"")
                && r.status == 200
            {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the container never became ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        let ready = started.elapsed();
        drop(layout);
        (container, ready)
    }

    fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    fn pid(&self) -> u32 {
        let out = tool("runc", &["state", &self.id]);
        let state: Value = serde_json::from_slice(&out.stdout).unwrap();
        state["pid"].as_u64().unwrap() as u32
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new(which("runc")).args(["kill", &self.id, "KILL"]).output();
        let _ = self.child.wait();
        let _ = Command::new(which("runc")).args(["delete", "--force", &self.id]).output();
    }
}

fn score_and_compare(c: &Container, model: &str) {
    let body = std::fs::read(fixture(model).join("input.json")).unwrap();
    let r = http(
        c.addr(),
        "POST",
        &format!("/v2/models/{model}/infer"),
        &[("Content-Type", "application/json")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let want = read_json(fixture(model).join("expected.json"));
    compare_outputs(&r.json()["outputs"], &want["outputs"]).unwrap_or_else(|e| panic!("{model}: {e}"));
}

fn build_push_run(backend: &str, model: &str) {
    let registry = OciRegistry::start();
    let ws = tempfile::tempdir().unwrap();
    register(ws.path(), model);
    let tag = format!("{model}-svc:1");
    let digest =
        ok(&kiln_ws(ws.path(), &["image", "build", "--model", model, "--backend", backend, "--tag", &tag]));
    assert!(digest.starts_with("sha256:"), "{digest}");
    let reference = format!("{}/services/{model}:1", registry.host());
    let pushed = ok(&kiln_ws(ws.path(), &["image", "push", &tag, &reference, "--insecure-registry"]));
    assert!(pushed.contains(&digest), "the registry stores the digest we computed: {pushed}");

    let inspect =
        tool("skopeo", &["inspect", "--tls-verify=false", "--config", &format!("docker://{reference}")]);
    let config: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["Entrypoint"][1], "serve");
    assert_eq!(config["config"]["StopSignal"], "SIGTERM");
    assert_eq!(config["config"]["Labels"][format!("dev.kiln.model.{model}.version")], "1");
    assert_eq!(config["created"], "2023-11-14T22:13:20Z", "SOURCE_DATE_EPOCH sets the timestamp");

    let (c, ready) = Container::run(&reference, "t");
    eprintln!("{backend}: runc run to first ready response: {ready:?}");
    score_and_compare(&c, model);
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid.split_whitespace().skip(1).all(|u| u == "65532"), "runs as 65532: {uid}");
}

#[test]
fn tract_image_runs_under_runc_as_nonroot() {
    build_push_run("tract", "mlp");
}

#[test]
fn ort_image_runs_under_runc_as_nonroot() {
    build_push_run("ort", "iris");
}

/// An accelerator image from `kiln fpga compile` is registered, packaged with `--backend fpga`,
/// pushed, run by runc and scored: the same outputs as `kiln predict --backend fpga` here, the
/// same top-1 classes as onnxruntime, and the container's /metrics counts the accelerator's work.
#[test]
fn fpga_image_runs_under_runc() {
    let registry = OciRegistry::start();
    let ws = tempfile::tempdir().unwrap();
    let f = fixture("digits_mlp");
    let kacc = ws.path().join("digits.kacc");
    ok(&kiln_ws(
        ws.path(),
        &[
            "fpga",
            "compile",
            f.join("model.onnx").to_str().unwrap(),
            "--calibration",
            f.join("calibration.json").to_str().unwrap(),
            "-o",
            kacc.to_str().unwrap(),
        ],
    ));
    let shown = ok(&kiln_ws(ws.path(), &["model", "register", "digits", kacc.to_str().unwrap()]));
    assert_eq!(shown, "digits:1");
    let show = ok(&kiln_ws(ws.path(), &["model", "show", "digits"]));
    assert!(show.contains("input: pixels FP32 [-1, 64]"), "{show}");
    // A corrupt accelerator image is refused at registration, and nothing is stored.
    let mut bytes = std::fs::read(&kacc).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    let corrupt = ws.path().join("corrupt.kacc");
    std::fs::write(&corrupt, bytes).unwrap();
    fails(
        &kiln_ws(ws.path(), &["model", "register", "bad", corrupt.to_str().unwrap()]),
        2,
        "is named .kacc but",
    );
    fails(&kiln_ws(ws.path(), &["model", "show", "bad"]), 2, "no model named \"bad\"");
    // Packaging for a CPU engine says what to do instead.
    fails(
        &kiln_ws(ws.path(), &["image", "build", "--model", "digits", "--backend", "tract", "--tag", "x:1"]),
        2,
        "this is an accelerator image: run it with --backend fpga",
    );
    ok(&kiln_ws(
        ws.path(),
        &["image", "build", "--model", "digits", "--backend", "fpga", "--tag", "digits:fpga"],
    ));
    let reference = format!("{}/services/digits:fpga", registry.host());
    ok(&kiln_ws(ws.path(), &["image", "push", "digits:fpga", &reference, "--insecure-registry"]));

    let (c, _) = Container::run(&reference, "t");
    let input = f.join("input.json");
    let r = http(
        c.addr(),
        "POST",
        "/v2/models/digits/infer",
        &[("Content-Type", "application/json")],
        &std::fs::read(&input).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let served = r.json()["outputs"][0]["data"].clone();
    let local: Value = serde_json::from_str(&ok(&kiln_ws(
        ws.path(),
        &[
            "predict",
            "--model",
            kacc.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--backend",
            "fpga",
        ],
    )))
    .unwrap();
    assert_eq!(served, local["outputs"][0]["data"], "the container computes what kiln predict does");
    let argmax = |v: &Value| -> Vec<usize> {
        let flat: Vec<f64> = flatten(v).iter().map(|x| x.as_f64().unwrap()).collect();
        flat.chunks(10)
            .map(|row| row.iter().enumerate().fold(0, |best, (i, &x)| if x > row[best] { i } else { best }))
            .collect()
    };
    let want = read_json(f.join("expected.json"));
    assert_eq!(argmax(&served), argmax(&want["outputs"][0]["data"]), "top-1 classes of onnxruntime");
    let metrics = http(c.addr(), "GET", "/metrics", &[], b"").text();
    let tiles: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_fpga_tiles_total "))
        .unwrap_or_else(|| panic!("no kiln_fpga_tiles_total in {metrics}"))
        .parse()
        .unwrap();
    assert!(tiles > 0.0, "{tiles}");
}

fn build_in(dir: &Path, umask: &str, epoch: &str) -> String {
    let ws = dir.join("ws");
    let models = dir.join("src");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(fixture("mlp").join("model.onnx"), models.join("model.onnx")).unwrap();
    let script = format!(
        "umask {umask}; cd {dir}; \"$0\" --workspace {ws} model register mlp {model} >/dev/null && exec \"$0\" --workspace {ws} image build --model mlp --backend tract --tag mlp-svc:1",
        dir = dir.display(),
        ws = ws.display(),
        model = models.join("model.onnx").display()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .arg(kiln_bin())
        .env("KILN_LOG", "warn")
        .env("SOURCE_DATE_EPOCH", epoch)
        .output()
        .unwrap();
    ok(&out)
}

#[test]
fn builds_are_reproducible_across_directories_and_umasks() {
    let (a, b, c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = build_in(a.path(), "022", "1700000000");
    let second = build_in(b.path(), "077", "1700000000");
    assert_eq!(first, second, "same inputs, same manifest digest");
    let later = build_in(c.path(), "022", "1700000001");
    assert_ne!(first, later, "SOURCE_DATE_EPOCH is part of the inputs");
}

#[test]
fn a_config_only_change_reuses_the_model_and_runtime_layers() {
    let ws = tempfile::tempdir().unwrap();
    register(ws.path(), "mlp");
    let first: Value = serde_json::from_str(&ok(&kiln_ws(
        ws.path(),
        &["image", "build", "--model", "mlp", "--backend", "tract", "--tag", "m:1", "--json"],
    )))
    .unwrap();
    let cfg = ws.path().join("kiln.toml");
    std::fs::write(&cfg, "[serve]\nmax_batch_size = 8\n\n[models.mlp]\ninstances = 1\n").unwrap();
    let second: Value = serde_json::from_str(&ok(&kiln_ws(
        ws.path(),
        &[
            "image",
            "build",
            "--model",
            "mlp",
            "--backend",
            "tract",
            "--config",
            cfg.to_str().unwrap(),
            "--tag",
            "m:2",
            "--json",
        ],
    )))
    .unwrap();
    let layers = |v: &Value| v["layers"].as_array().unwrap().clone();
    assert_eq!(layers(&first)[0]["digest"], layers(&second)[0]["digest"]);
    assert_eq!(layers(&first)[1]["digest"], layers(&second)[1]["digest"]);
    assert_eq!(layers(&second)[0]["cached"], true, "runtime layer reused without rewriting");
    assert_eq!(layers(&second)[1]["cached"], true, "model layer reused without rewriting");
    assert_ne!(layers(&first)[2]["digest"], layers(&second)[2]["digest"], "the config layer changed");
    assert_ne!(first["digest"], second["digest"]);
}

#[test]
fn tags_models_and_references_are_guarded() {
    let ws = tempfile::tempdir().unwrap();
    register(ws.path(), "mlp");
    register(ws.path(), "iris");
    ok(&kiln_ws(ws.path(), &["image", "build", "--model", "mlp", "--backend", "tract", "--tag", "svc:1"]));
    fails(
        &kiln_ws(ws.path(), &["image", "build", "--model", "mlp", "--backend", "tract", "--tag", "svc:1"]),
        2,
        "exists; pass --force",
    );
    ok(&kiln_ws(
        ws.path(),
        &["image", "build", "--model", "mlp", "--backend", "tract", "--tag", "svc:1", "--force"],
    ));
    fails(
        &kiln_ws(ws.path(), &["image", "build", "--model", "nope", "--tag", "x:1"]),
        2,
        "no model named \"nope\"",
    );
    fails(
        &kiln_ws(ws.path(), &["image", "build", "--model", "iris", "--backend", "tract", "--tag", "x:1"]),
        2,
        "unsupported operator(s) ai.onnx.ml:Scaler",
    );
    fails(&kiln_ws(ws.path(), &["image", "build", "--model", "mlp", "--tag", "Bad Tag"]), 2, "invalid tag");
    fails(&kiln_ws(ws.path(), &["model", "delete", "mlp:1"]), 2, "is used by image svc:1");
    let list = ok(&kiln_ws(ws.path(), &["image", "list", "--json"]));
    assert!(list.contains("svc:1"));
    ok(&kiln_ws(ws.path(), &["image", "delete", "svc:1"]));
    ok(&kiln_ws(ws.path(), &["model", "delete", "mlp:1"]));
    fails(&kiln_ws(ws.path(), &["image", "show", "svc:1"]), 2, "no image \"svc:1\"");
    ok(&kiln_ws(ws.path(), &["workspace", "gc"]));
    assert!(ok(&kiln_ws(ws.path(), &["workspace", "verify"])).contains("is clean"));
}

#[test]
fn exports_are_readable_by_skopeo() {
    let ws = tempfile::tempdir().unwrap();
    register(ws.path(), "mlp");
    let digest = ok(&kiln_ws(
        ws.path(),
        &["image", "build", "--model", "mlp", "--backend", "tract", "--tag", "svc:1"],
    ));
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("dir");
    ok(&kiln_ws(ws.path(), &["image", "export", "svc:1", "--format", "oci-dir", dir.to_str().unwrap()]));
    let archive = out.path().join("image.tar");
    ok(&kiln_ws(
        ws.path(),
        &["image", "export", "svc:1", "--format", "oci-archive", archive.to_str().unwrap()],
    ));
    let docker = out.path().join("docker.tar");
    ok(&kiln_ws(
        ws.path(),
        &["image", "export", "svc:1", "--format", "docker-archive", docker.to_str().unwrap()],
    ));
    for src in [
        format!("oci:{}:svc:1", dir.display()),
        format!("oci-archive:{}:svc:1", archive.display()),
        format!("docker-archive:{}", docker.display()),
    ] {
        let o = tool("skopeo", &["inspect", &src]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["Labels"]["dev.kiln.models"], "mlp:1", "{src}");
        if !src.starts_with("docker-archive") {
            assert_eq!(v["Digest"], digest.as_str(), "{src}");
        }
    }
    // The workspace itself is an OCI layout.
    tool("skopeo", &["inspect", &format!("oci:{}:svc:1", ws.path().display())]);
}

/// A tar with raw entry names, including ones no careful tool would write.
type RawEntry<'a> = (&'a [u8], tar::EntryType, Option<&'a [u8]>);

fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link) in entries {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..name.len()].copy_from_slice(name);
            if let Some(l) = link {
                g.linkname[..l.len()].copy_from_slice(l);
            }
        }
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Writes a one-layer image with `layer` to an OCI layout and copies it into the registry.
fn push_base(registry: &OciRegistry, name: &str, layer: Vec<u8>) -> String {
    use kiln_images::digest::Digest;
    let dir = tempfile::tempdir().unwrap();
    let layout = kiln_images::layout::Layout::open(dir.path()).unwrap();
    let layer_digest = layout.put_bytes(&layer).unwrap();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]}, "config": {"Env": ["FROM_BASE=1"]}});
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = layout.put_bytes(&config_bytes).unwrap();
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest.to_string(), "size": layer.len()}]});
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let digest: Digest = layout.put_bytes(&manifest_bytes).unwrap();
    layout
        .set_index_entry(&kiln_images::layout::IndexEntry {
            name: "base".into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest,
            size: manifest_bytes.len() as u64,
            annotations: Default::default(),
        })
        .unwrap();
    let reference = format!("{}/bases/{name}:1", registry.host());
    tool(
        "skopeo",
        &[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:base", dir.path().display()),
            &format!("docker://{reference}"),
        ],
    );
    reference
}

#[test]
fn bases_are_pulled_checked_and_extended() {
    let registry = OciRegistry::start();
    let ws = tempfile::tempdir().unwrap();
    register(ws.path(), "mlp");
    let good = push_base(
        &registry,
        "good",
        raw_tar(&[
            (b"etc/", tar::EntryType::Directory, None),
            (b"etc/motd", tar::EntryType::Regular, None),
            (b"lib/libx.so", tar::EntryType::Symlink, Some(b"/usr/lib/libx.so.1")),
        ]),
    );
    let out: Value = serde_json::from_str(&ok(&kiln_ws(
        ws.path(),
        &[
            "image",
            "build",
            "--model",
            "mlp",
            "--backend",
            "tract",
            "--base",
            &good,
            "--insecure-registry",
            "--tag",
            "on-base:1",
            "--json",
        ],
    )))
    .unwrap();
    assert!(out["digest"].as_str().unwrap().starts_with("sha256:"));
    let shown: Value =
        serde_json::from_str(&ok(&kiln_ws(ws.path(), &["image", "show", "on-base:1", "--json"]))).unwrap();
    assert_eq!(
        shown["manifest"]["layers"].as_array().unwrap().len(),
        4,
        "base layer + runtime + model + config"
    );
    let env = shown["config"]["config"]["Env"].to_string();
    assert!(env.contains("FROM_BASE=1") && env.contains("KILN_LOG_FORMAT=json"), "{env}");
    assert_eq!(shown["manifest"]["annotations"]["org.opencontainers.image.base.name"], good.as_str());

    for (name, entries, needle) in [
        ("dotdot", vec![(&b"../../etc/cron.d/evil"[..], tar::EntryType::Regular, None)], "'..' component"),
        (
            "escape",
            vec![(&b"usr/lib/evil"[..], tar::EntryType::Symlink, Some(&b"../../../../etc/shadow"[..]))],
            "escapes the root",
        ),
        ("device", vec![(&b"dev/sda"[..], tar::EntryType::Block, None)], "device file"),
    ] {
        let reference = push_base(&registry, name, raw_tar(&entries));
        let out = kiln_ws(
            ws.path(),
            &[
                "image",
                "build",
                "--model",
                "mlp",
                "--backend",
                "tract",
                "--base",
                &reference,
                "--insecure-registry",
                "--tag",
                &format!("{name}:1"),
            ],
        );
        fails(&out, 2, needle);
        fails(&kiln_ws(ws.path(), &["image", "show", &format!("{name}:1")]), 2, "no image");
    }
    let missing = format!("{}/bases/none:1", registry.host());
    fails(
        &kiln_ws(
            ws.path(),
            &[
                "image",
                "build",
                "--model",
                "mlp",
                "--backend",
                "tract",
                "--base",
                &missing,
                "--insecure-registry",
                "--tag",
                "x:1",
            ],
        ),
        2,
        "was not found",
    );
}

#[test]
fn a_registry_that_refuses_or_fails_gives_clear_errors_and_a_full_disk_records_nothing() {
    let ws = tempfile::tempdir().unwrap();
    register(ws.path(), "mlp");
    ok(&kiln_ws(ws.path(), &["image", "build", "--model", "mlp", "--backend", "tract", "--tag", "svc:1"]));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in listener.incoming().take(20).flatten() {
            let mut s = s;
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ =
                s.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    fails(
        &kiln_ws(ws.path(), &["image", "push", "svc:1", &format!("{host}/x/svc:1"), "--insecure-registry"]),
        1,
        "refused the credentials",
    );

    // A file-size limit stands in for a full disk: the build fails, nothing is recorded.
    let before = ok(&kiln_ws(ws.path(), &["image", "list", "--json"]));
    let out = Command::new("bash")
        .args(["-c", "trap '' XFSZ; ulimit -f 4096; exec \"$@\"", "bash"])
        .arg(kiln_bin())
        .args([
            "--workspace",
            ws.path().to_str().unwrap(),
            "image",
            "build",
            "--model",
            "mlp",
            "--backend",
            "ort",
            "--tag",
            "big:1",
        ])
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    fails(&out, 1, "File too large");
    assert_eq!(ok(&kiln_ws(ws.path(), &["image", "list", "--json"])), before);
    assert!(ok(&kiln_ws(ws.path(), &["workspace", "verify"])).contains("is clean"));
}
