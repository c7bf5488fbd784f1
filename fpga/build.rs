//! With the `rtl-sim` feature: verilates the RTL compute unit (`rtl/`) and compiles it, Verilator's
//! runtime and the C ABI shim (`sim/`) into static libraries for `rtl_sim`. With the `xrt`
//! feature: compiles the C layer over the Xilinx Runtime (`xrt/kiln_xrt.cpp`) against the XRT
//! headers and links `libxrt_coreutil`. Without either feature this does nothing (no Verilator,
//! XRT or C/C++ compiler needed).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "rtl-sim")]
    rtl_sim::build();
    #[cfg(feature = "xrt")]
    xrt::build();
}

#[cfg(feature = "xrt")]
mod xrt {
    use std::path::PathBuf;

    pub fn build() {
        let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
        let shim = manifest.join("xrt/kiln_xrt.cpp");
        println!("cargo:rerun-if-changed={}", shim.display());
        println!("cargo:rerun-if-env-changed=XILINX_XRT");
        // Debian's libxrt-dev puts the headers in /usr/include/xrt; Xilinx's own packages in
        // /opt/xilinx/xrt (XILINX_XRT, set by its setup.sh).
        let (include, lib) = match std::env::var_os("XILINX_XRT") {
            Some(root) => (PathBuf::from(&root).join("include"), Some(PathBuf::from(root).join("lib"))),
            None => (PathBuf::from("/usr/include/xrt"), None),
        };
        assert!(
            include.join("xrt_kernel.h").exists() || include.join("xrt/xrt_kernel.h").exists(),
            "the xrt feature needs the XRT headers (xrt_kernel.h) in {}: install libxrt-dev \
             (scripts/setup test installs it) or set XILINX_XRT",
            include.display()
        );
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .file(&shim)
            .include(&include)
            .include(include.parent().unwrap_or(&include))
            .warnings_into_errors(true)
            .compile("kiln_xrt");
        if let Some(lib) = lib {
            println!("cargo:rustc-link-search=native={}", lib.display());
        }
        println!("cargo:rustc-link-lib=dylib=xrt_coreutil");
    }
}

#[cfg(feature = "rtl-sim")]
mod rtl_sim {
    use std::path::PathBuf;
    use std::process::Command;

    /// The RTL sources, top module first.
    const RTL: [&str; 3] = ["gemm_tile.v", "gemm_tile_pe.v", "gemm_tile_requant.v"];
    const PREFIX: &str = "Vgemm_tile";

    pub fn build() {
        let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
        let rtl_dir = manifest.join("rtl");
        let sim_dir = manifest.join("sim");
        let verilator = std::env::var("VERILATOR").unwrap_or_else(|_| "verilator".into());
        println!("cargo:rerun-if-env-changed=VERILATOR");
        println!("cargo:rerun-if-env-changed=VERILATOR_ROOT");
        for f in RTL {
            println!("cargo:rerun-if-changed={}", rtl_dir.join(f).display());
        }
        println!("cargo:rerun-if-changed={}", sim_dir.join("kiln_tile_sim.cpp").display());
        println!("cargo:rerun-if-changed={}", sim_dir.join("kiln_tile_sim.h").display());

        // Verilate into a fresh directory so stale generated files never get compiled.
        let mdir = out.join("verilated");
        if mdir.exists() {
            std::fs::remove_dir_all(&mdir).expect("clean the Verilator output directory");
        }
        let mut cmd = Command::new(&verilator);
        cmd.args(["--cc", "-Wall", "-O3", "--x-assign", "fast", "--x-initial", "fast", "--noassert"])
            .args(["--top-module", "gemm_tile", "--prefix", PREFIX, "-Mdir"])
            .arg(&mdir)
            .args(RTL.iter().map(|f| rtl_dir.join(f)));
        let status = match cmd.status() {
            Ok(s) => s,
            Err(e) => panic!(
                "cannot run `{verilator}` ({e}): the rtl-sim feature needs Verilator \
                 (scripts/setup test installs it)"
            ),
        };
        assert!(status.success(), "verilator failed on {}", rtl_dir.display());

        let root = verilator_root(&verilator);
        let include = root.join("include");

        // The shim first: its static library must precede the model's on the link line. It is
        // warning-clean (Verilator's headers come in as system headers).
        let mut shim = cc::Build::new();
        shim.cpp(true).std("c++17").opt_level(2).debug(false).warnings_into_errors(true);
        for dir in [mdir.clone(), include.clone(), include.join("vltstd")] {
            shim.flag("-isystem").flag(dir.to_string_lossy().as_ref());
        }
        shim.file(sim_dir.join("kiln_tile_sim.cpp")).compile("kiln_tile_sim");

        // The generated model plus Verilator's runtime; generated code is not ours to lint.
        let mut model = cc::Build::new();
        model
            .cpp(true)
            .std("c++17")
            .opt_level(2)
            .debug(false)
            .warnings(false)
            .extra_warnings(false)
            .flag_if_supported("-w")
            .flag_if_supported("-faligned-new")
            .define("VM_COVERAGE", "0")
            .define("VM_SC", "0")
            .define("VM_TRACE", "0")
            .define("VM_TRACE_FST", "0")
            .define("VM_TRACE_VCD", "0")
            .include(&mdir)
            .include(&include)
            .include(include.join("vltstd"));
        let mut generated: Vec<PathBuf> = std::fs::read_dir(&mdir)
            .expect("read the Verilator output directory")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
            .collect();
        generated.sort();
        assert!(!generated.is_empty(), "verilator generated no C++ in {}", mdir.display());
        model.files(&generated);
        // Verilator's runtime files, as the generated makefile lists them (verilated, and in
        // Verilator 5 verilated_threads).
        let mk = std::fs::read_to_string(mdir.join(format!("{PREFIX}_classes.mk"))).unwrap_or_default();
        let mut runtime = mk_list(&mk, "VM_GLOBAL_FAST");
        runtime.extend(mk_list(&mk, "VM_GLOBAL_SLOW"));
        if runtime.is_empty() {
            runtime.push("verilated".into());
        }
        for name in &runtime {
            model.file(include.join(format!("{name}.cpp")));
        }
        if runtime.iter().any(|n| n == "verilated_threads") {
            println!("cargo:rustc-link-lib=pthread");
        }
        model.compile("kiln_tile_model");
    }

    /// Verilator's install root (holds `include/verilated.cpp`).
    fn verilator_root(verilator: &str) -> PathBuf {
        if let Some(root) = std::env::var_os("VERILATOR_ROOT") {
            return PathBuf::from(root);
        }
        let out = Command::new(verilator).arg("--getenv").arg("VERILATOR_ROOT").output();
        if let Ok(out) = out {
            let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if root.join("include/verilated.cpp").exists() {
                return root;
            }
        }
        PathBuf::from("/usr/share/verilator")
    }

    /// The words a generated makefile appends to `var` (`VAR += \` followed by indented lines).
    fn mk_list(mk: &str, var: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut inside = false;
        for line in mk.lines() {
            if !inside {
                inside = line.split_whitespace().next() == Some(var) && line.contains("+=");
                continue;
            }
            if !line.starts_with([' ', '\t']) {
                inside = false;
                continue;
            }
            out.extend(line.split_whitespace().filter(|w| *w != "\\").map(str::to_owned));
        }
        out
    }
}
