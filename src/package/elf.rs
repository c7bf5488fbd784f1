//! The shared libraries an ELF executable needs, resolved the way the dynamic loader would, so
//! the runtime layer carries everything and `--base scratch` images need nothing else.
//!
//! Hand-written rather than pulling in a general object-file crate: only three things are read
//! (the `PT_INTERP` path, `DT_NEEDED` names, `DT_RUNPATH`/`DT_RPATH`), from 64-bit little-endian
//! ELF, with every offset bounds-checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the loader needs to know about one ELF file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ElfDeps {
    /// The program interpreter (dynamic loader), for executables.
    pub interpreter: Option<PathBuf>,
    /// Sonames of needed libraries, in order.
    pub needed: Vec<String>,
    /// Run-time search path entries (`$ORIGIN` not yet expanded).
    pub runpath: Vec<String>,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o.checked_add(2)?)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o.checked_add(4)?)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o.checked_add(8)?)?.try_into().ok()?))
}
fn cstr(b: &[u8], o: usize) -> Option<String> {
    let tail = b.get(o..)?;
    let end = tail.iter().position(|&c| c == 0)?;
    String::from_utf8(tail[..end].to_vec()).ok()
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// Parses the dependency information of an ELF64 little-endian file.
pub fn parse(b: &[u8]) -> Result<ElfDeps, String> {
    if b.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let bad = || "truncated or malformed ELF headers".to_string();
    let phoff = u64_at(b, 0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(b, 0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(b, 0x38).ok_or_else(bad)? as usize;
    let mut loads = Vec::new();
    let mut dynamic = None;
    let mut deps = ElfDeps::default();
    for i in 0..phnum {
        let o = phoff.checked_add(i.checked_mul(phentsize).ok_or_else(bad)?).ok_or_else(bad)?;
        let p_type = u32_at(b, o).ok_or_else(bad)?;
        let at = |k: usize| o.checked_add(k).ok_or_else(bad);
        let p_offset = u64_at(b, at(8)?).ok_or_else(bad)?;
        let p_vaddr = u64_at(b, at(16)?).ok_or_else(bad)?;
        let p_filesz = u64_at(b, at(32)?).ok_or_else(bad)?;
        match p_type {
            PT_LOAD => loads.push((p_vaddr, p_offset, p_filesz)),
            PT_DYNAMIC => dynamic = Some((p_offset as usize, p_filesz as usize)),
            PT_INTERP => deps.interpreter = cstr(b, p_offset as usize).map(PathBuf::from),
            _ => {}
        }
    }
    let Some((dyn_off, dyn_size)) = dynamic else { return Ok(deps) };
    let mut entries = Vec::new();
    let mut strtab_vaddr = None;
    let mut o = dyn_off;
    let end = dyn_off.saturating_add(dyn_size).min(b.len());
    while o.saturating_add(16) <= end {
        let tag = u64_at(b, o).ok_or_else(bad)?;
        let val = u64_at(b, o + 8).ok_or_else(bad)?;
        if tag == 0 {
            break;
        }
        if tag == DT_STRTAB {
            strtab_vaddr = Some(val);
        }
        entries.push((tag, val));
        o += 16;
    }
    let strtab_vaddr = strtab_vaddr.ok_or("dynamic section without a string table")?;
    // The string table is given as a virtual address: map it through the loadable segments.
    let strtab = loads
        .iter()
        .find(|(vaddr, _, size)| strtab_vaddr >= *vaddr && strtab_vaddr < vaddr.saturating_add(*size))
        .and_then(|(vaddr, off, _)| (strtab_vaddr - vaddr).checked_add(*off))
        .map(|o| o as usize)
        .ok_or("the string table is outside every loadable segment")?;
    for (tag, val) in entries {
        let s = || cstr(b, strtab.checked_add(val as usize).ok_or_else(bad)?).ok_or_else(bad);
        match tag {
            DT_NEEDED => deps.needed.push(s()?),
            DT_RUNPATH | DT_RPATH => {
                deps.runpath.extend(s()?.split(':').filter(|p| !p.is_empty()).map(str::to_string))
            }
            _ => {}
        }
    }
    Ok(deps)
}

/// The loader's default and configured library directories on this machine.
pub fn system_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    let mut conf_files = vec![PathBuf::from("/etc/ld.so.conf")];
    if let Ok(entries) = std::fs::read_dir("/etc/ld.so.conf.d") {
        let mut more: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conf"))
            .collect();
        more.sort();
        conf_files.extend(more);
    }
    for f in conf_files {
        for line in std::fs::read_to_string(f).unwrap_or_default().lines() {
            let line = line.trim();
            if line.starts_with('/') {
                dirs.push(PathBuf::from(line));
            }
        }
    }
    for d in
        ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]
    {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

/// Every file the dynamic loader would load for `binary` (and for `extra` libraries loaded at
/// run time, such as libonnxruntime), mapped to the path it must have in the image: the
/// interpreter at its absolute path, libraries in the directory they were found in.
pub fn closure(binary: &Path, extra: &[PathBuf]) -> Result<BTreeMap<PathBuf, PathBuf>, String> {
    let dirs = system_dirs();
    let mut out: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    let mut todo: Vec<PathBuf> = vec![binary.to_path_buf()];
    todo.extend(extra.iter().cloned());
    let mut seen_names = std::collections::BTreeSet::new();
    while let Some(file) = todo.pop() {
        let bytes = std::fs::read(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        let deps = parse(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
        if let Some(interp) = deps.interpreter {
            out.entry(interp.clone()).or_insert(interp);
        }
        let origin = file.parent().map(Path::to_path_buf).unwrap_or_default();
        for name in deps.needed {
            if !seen_names.insert(name.clone()) {
                continue;
            }
            let runpath =
                deps.runpath.iter().map(|p| PathBuf::from(p.replace("$ORIGIN", &origin.to_string_lossy())));
            let found = runpath
                .chain(dirs.iter().cloned())
                .map(|d| d.join(&name))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    format!("{} needs {name}, which is in none of the loader's directories", file.display())
                })?;
            // A runpath such as `$ORIGIN/../../lib/x86_64-linux-gnu` (libxrt's) yields a path with
            // `..` in it; the image needs the normal form, where the loader's default directories
            // find it.
            let found = lexically_normal(&found);
            out.insert(found.clone(), found.clone());
            todo.push(found);
        }
    }
    Ok(out)
}

/// `path` with `.` and `//` removed and each `..` applied to the component before it (lexically:
/// the file was found at this path, so every directory it names exists).
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runpath_dot_dots_are_normalised() {
        assert_eq!(
            lexically_normal(Path::new("/lib/x86_64-linux-gnu/../../lib/x86_64-linux-gnu//./libz.so.1")),
            PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1")
        );
        assert_eq!(lexically_normal(Path::new("/../a")), PathBuf::from("/a"));
    }

    #[test]
    fn the_test_binary_itself_resolves() {
        let me = std::env::current_exe().unwrap();
        let deps = parse(&std::fs::read(&me).unwrap()).unwrap();
        assert!(deps.interpreter.is_some());
        assert!(deps.needed.iter().any(|n| n.starts_with("libc.so")), "{deps:?}");
        let files = closure(&me, &[]).unwrap();
        assert!(files.keys().any(|p| p.to_string_lossy().contains("libc.so.6")));
        assert!(files.keys().any(|p| p.to_string_lossy().contains("ld-linux")));
    }

    #[test]
    fn mutated_headers_never_panic() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut b = me[..me.len().min(1 << 16)].to_vec();
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state as usize) % 256;
                b[at] = (state >> 32) as u8;
            }
            let _ = parse(&b);
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse(b"not elf").is_err());
        let mut hdr = b"\x7fELF\x02\x01\x01".to_vec();
        hdr.resize(64, 0xff);
        assert!(parse(&hdr).is_err());
    }
}
