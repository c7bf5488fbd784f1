//! A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution) on
//! 127.0.0.1 with a temporary storage root. Missing binary = failed test, never a skip.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running registry; killed on drop.
pub struct OciRegistry {
    child: Option<Child>,
    /// Storage root (survives restarts).
    pub root: PathBuf,
    /// Listen address.
    pub addr: SocketAddr,
    /// Access log lines.
    pub log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl OciRegistry {
    /// Starts a registry on a free loopback port.
    pub fn start() -> OciRegistry {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("storage");
        std::fs::create_dir_all(&root).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut r = OciRegistry { child: None, root, addr, log: Arc::new(Mutex::new(Vec::new())), _dir: dir };
        r.spawn();
        r
    }

    fn config_path(&self) -> PathBuf {
        self.root.parent().unwrap().join("config.yml")
    }

    fn spawn(&mut self) {
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}\n",
            self.root.display(),
            self.addr
        );
        std::fs::write(self.config_path(), config).unwrap();
        let bin = which("docker-registry");
        let mut child = Command::new(bin)
            .arg("serve")
            .arg(self.config_path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker-registry must be installed (scripts/setup test installs it)");
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = Arc::clone(&self.log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Kills the registry (SIGKILL), keeping its storage.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Access-log lines so far containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// Clears the collected log.
    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Absolute path of a required tool; panics with how to get it.
pub fn which(tool: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/usr/bin", "/sbin"])
    {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("{tool} is not installed; scripts/setup test installs it");
}
