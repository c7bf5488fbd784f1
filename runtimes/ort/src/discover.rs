//! Finding `libonnxruntime` on this machine, with a report of every place looked at.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The ONNX Runtime version `ort` 2.0.0-rc.15 is built against.
pub const ORT_VERSION: &str = "1.31.1";

/// The one command that installs a compatible library.
pub fn install_hint() -> String {
    format!(
        "Install it with `python3 -m pip install onnxruntime=={ORT_VERSION}` (or run scripts/setup), \
         or point --ort-lib / ORT_DYLIB_PATH at libonnxruntime.so"
    )
}

/// One search for the library; records what each place held.
#[derive(Debug)]
pub struct LibrarySearch {
    explicit: Option<PathBuf>,
    tried: Vec<String>,
}

/// The newest-looking `libonnxruntime.so*` in `dir`, if any.
fn lib_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so") && !n.contains("providers"))
        })
        .collect();
    // Prefer the fully versioned name (libonnxruntime.so.1.31.1) over bare symlinks.
    found.sort_by_key(|p| p.as_os_str().len());
    found.pop()
}

/// `site-packages/onnxruntime/capi` directories of a virtual environment.
fn venv_capi_dirs(venv: &Path) -> Vec<PathBuf> {
    let lib = venv.join("lib");
    let Ok(entries) = std::fs::read_dir(&lib) else { return vec![] };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python")))
        .map(|p| p.join("site-packages/onnxruntime/capi"))
        .collect();
    dirs.sort();
    dirs
}

impl LibrarySearch {
    /// A search that first tries `explicit` (from `--ort-lib`).
    pub fn new(explicit: Option<PathBuf>) -> Self {
        LibrarySearch { explicit, tried: Vec::new() }
    }

    fn try_file(&mut self, label: &str, path: &Path) -> Option<PathBuf> {
        if path.is_file() {
            return Some(path.to_path_buf());
        }
        if path.is_dir() {
            if let Some(p) = lib_in(path) {
                return Some(p);
            }
            self.tried.push(format!("{label}: {} (no libonnxruntime.so* inside)", path.display()));
        } else {
            self.tried.push(format!("{label}: {} (does not exist)", path.display()));
        }
        None
    }

    fn try_dir(&mut self, label: &str, dir: &Path) -> Option<PathBuf> {
        let found = lib_in(dir);
        if found.is_none() {
            self.tried.push(format!("{label}: {} (not found)", dir.display()));
        }
        found
    }

    /// Asks the `python3` on PATH where its `onnxruntime` package lives.
    fn python_package(&mut self) -> Option<PathBuf> {
        let out = Command::new("python3")
            .args([
                "-c",
                "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
                self.try_dir("python3's onnxruntime package", &dir)
            }
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let last = err.lines().last().unwrap_or("failed").trim().to_string();
                self.tried.push(format!("python3's onnxruntime package ({last})"));
                None
            }
            Err(e) => {
                self.tried.push(format!("python3's onnxruntime package (python3 not runnable: {e})"));
                None
            }
        }
    }

    /// Looks in every place in order; the error names them all and how to install the library.
    pub fn find(mut self) -> Result<PathBuf, String> {
        if let Some(p) = self.explicit.clone() {
            // An explicit path is the user's decision: do not fall back to another library.
            return self.try_file("--ort-lib", &p).ok_or_else(|| self.report());
        }
        self.tried.push("--ort-lib (not given)".into());
        match std::env::var_os("ORT_DYLIB_PATH") {
            Some(p) if !p.is_empty() => {
                if let Some(found) = self.try_file("ORT_DYLIB_PATH", Path::new(&p)) {
                    return Ok(found);
                }
            }
            _ => self.tried.push("ORT_DYLIB_PATH (not set)".into()),
        }
        if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf))
            && let Some(found) = self.try_dir("next to the executable", &dir)
        {
            return Ok(found);
        }
        let mut venvs = Vec::new();
        if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
            venvs.push(("$VIRTUAL_ENV", PathBuf::from(v)));
        }
        if let Ok(cwd) = std::env::current_dir() {
            for dir in cwd.ancestors() {
                let venv = dir.join(".venv");
                if venv.is_dir() {
                    venvs.push(("project .venv", venv));
                    break;
                }
            }
        }
        for (label, venv) in venvs {
            let dirs = venv_capi_dirs(&venv);
            if dirs.is_empty() {
                self.tried.push(format!("{label}: {} (no onnxruntime package)", venv.display()));
            }
            for dir in dirs {
                if let Some(found) = self.try_dir(label, &dir) {
                    return Ok(found);
                }
            }
        }
        self.python_package().ok_or_else(|| self.report())
    }

    fn report(&self) -> String {
        format!("ONNX Runtime library not found; searched: {}. {}", self.tried.join("; "), install_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_missing_path_is_reported_without_fallback() {
        let err = LibrarySearch::new(Some("/nonexistent/libonnxruntime.so".into())).find().unwrap_err();
        assert!(err.contains("--ort-lib: /nonexistent/libonnxruntime.so (does not exist)"), "{err}");
        assert!(err.contains("pip install onnxruntime==1.31.1"), "{err}");
    }

    #[test]
    fn a_directory_is_searched() {
        let dir = std::env::temp_dir().join(format!("kiln-ort-discover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        std::fs::write(dir.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        let found = LibrarySearch::new(Some(dir.clone())).find().unwrap();
        assert_eq!(found, dir.join("libonnxruntime.so.1.31.1"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
