//! The shape of vault-store, checked from its sources: the folders of
//! `src/` are layers, and a module may import (`crate::…`) only from its
//! own folder or a folder below it (ARCHITECTURE.md, "vault-store: folders
//! and arrows"); and no two modules import each other, directly or round a
//! circle. Parent and child modules may use each other (`super::`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The folders (or root files) of `src/`, lowest first.
const LAYERS: &[&str] = &[
    "crypto",
    "format",
    "store",
    "index",
    "copies",
    "lease",
    "jobs",
    "holds",
    "vault",
    "maintenance",
    "shared",
    "open",
];

/// Root files anything may import.
const ANYWHERE: &[&str] = &["error", "skip"];

/// The only imports of `error` (it names two format types in its variants).
const ERROR_MAY_USE: &[&str] = &["format::chunk_id", "format::record", "crypto"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `format/record.rs` → `format::record`; `vault/mod.rs` → `vault`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

/// The modules each module imports through `crate::` paths (comments
/// and doc lines skipped), resolved to the longest known module.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files
        .iter()
        .map(|f| (module_of(&src, f), f.clone()))
        .collect();
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len())
            .rev()
            .map(|n| parts[..n].join("::"))
            .find(|m| modules.contains_key(m))
    };
    let mut out = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).expect("read source");
        let mut to = BTreeSet::new();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                    .unwrap_or(rest.len());
                let path = rest[..end].trim_end_matches(':');
                if let Some(target) = resolve(path)
                    && target != *module
                    && !target.is_empty()
                    && !is_family(module, &target)
                {
                    to.insert(target);
                }
            }
        }
        out.insert(module.clone(), to);
    }
    out
}

/// True when one module is the other's ancestor.
fn is_family(a: &str, b: &str) -> bool {
    a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

fn rank(folder: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == folder)
}

#[test]
fn every_import_points_down_or_sideways() {
    let mut wrong = Vec::new();
    for (from, targets) in imports() {
        for to in targets {
            let (a, b) = (top(&from), top(&to));
            if a == b || ANYWHERE.contains(&b) || from.is_empty() {
                continue;
            }
            let allowed = if a == "error" {
                ERROR_MAY_USE.contains(&to.as_str())
            } else if ANYWHERE.contains(&a) {
                false
            } else {
                match (rank(a), rank(b)) {
                    (Some(x), Some(y)) => y < x,
                    _ => false,
                }
            };
            if !allowed {
                wrong.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that point up (or to a folder ARCHITECTURE.md does not list): {wrong:#?}"
    );
}

#[test]
fn no_module_imports_round_a_circle() {
    let graph = imports();
    // Depth-first search for a back edge: colour 1 = on the stack.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        colour.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            match colour.get(next.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|s| s == next).unwrap_or(0);
                    let mut circle = stack[from..].to_vec();
                    circle.push(next.clone());
                    return Some(circle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, graph, colour, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        colour.insert(m.to_string(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for m in graph.keys() {
        if !colour.contains_key(m) {
            let circle = visit(m, &graph, &mut colour, &mut Vec::new());
            assert!(circle.is_none(), "import circle: {circle:?}");
        }
    }
}

#[test]
fn the_checker_sees_imports() {
    // A guard against a checker that finds nothing and so passes: the
    // vault imports the index, and the seam imports no vault.
    let graph = imports();
    assert!(graph["vault"].contains("index"), "{:?}", graph["vault"]);
    assert!(graph["store::local"].iter().all(|m| top(m) != "vault"));
    assert!(graph.len() > 40, "only {} modules found", graph.len());
}
