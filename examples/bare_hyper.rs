//! The HTTP ceiling of this machine, for `scripts/bench-serve`: the same hyper + tokio stack as
//! `kiln serve`, but each request only reads its body, parses it as JSON (validating, building
//! nothing) and returns a fixed answer the size of a small V2 response. No model, no batching.
//!
//! `cargo run --release --example bare_hyper -- 127.0.0.1:8090`

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

const ANSWER: &[u8] = br#"{"model_name":"bare","model_version":"1","outputs":[{"name":"probabilities","datatype":"FP32","shape":[1,10],"data":[0.15207584,0.107169755,0.05559872,0.18224013,0.07506641,0.07568563,0.035187785,0.093981005,0.1139652,0.10902952]}]}"#;

async fn handle(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(Response::builder()
                .status(400)
                .body(Full::new(Bytes::new()))
                .expect("static response"));
        }
    };
    let status = match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        Ok(_) => 200,
        Err(_) => 400,
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(ANSWER)))
        .expect("static response"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8090".into()).parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!("bare hyper listening on {}", listener.local_addr()?);
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service_fn(handle)).into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    })
}
