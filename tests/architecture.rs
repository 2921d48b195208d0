//! The layout rules, checked on the source: no import cycles between the crate's top-level
//! modules (`xds` knows nothing of `ecds` or `wasm`; metric names are a leaf) nor between the
//! modules of `wasm/`, and the cache is the only owner of its state (the only `impl Cache`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `file stem → source` of the modules in `src/<dir>`, without their unit tests.
fn modules(dir: &str) -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&root).unwrap().flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("rs") {
            continue;
        }
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&p).unwrap();
        out.insert(name, code_of(&text));
    }
    out
}

/// The code of a source file: without its unit tests and without comment lines.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The crate's top-level modules (files and folders of `src/`, not `lib`/`main`) and the
/// sibling modules each names as `crate::<name>`.
fn crate_edges() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut code: BTreeMap<String, String> = BTreeMap::new();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut text = String::new();
        if p.is_dir() {
            for f in std::fs::read_dir(&p).unwrap().flatten() {
                text.push_str(&code_of(
                    &std::fs::read_to_string(f.path()).unwrap_or_default(),
                ));
            }
        } else if p.extension().and_then(|x| x.to_str()) == Some("rs") {
            text = code_of(&std::fs::read_to_string(&p).unwrap());
        } else {
            continue;
        }
        code.insert(name, text);
    }
    let names: Vec<String> = code.keys().cloned().collect();
    code.iter()
        .map(|(name, text)| {
            let deps = names
                .iter()
                .filter(|o| *o != name && text.contains(&format!("crate::{o}")))
                .cloned()
                .collect();
            (name.clone(), deps)
        })
        .collect()
}

#[test]
fn no_import_cycles_between_the_crates_layers() {
    let g = crate_edges();
    assert!(
        g["ecds"].contains("xds") && g["ecds"].contains("wasm"),
        "{g:#?}"
    );
    assert_eq!(cycle(&g), None, "{g:#?}");
    for (layer, never) in [
        ("xds", "ecds"),
        ("xds", "wasm"),
        ("wasm", "ecds"),
        ("wasm", "xds"),
        ("wasm", "admin"),
        ("ecds", "admin"),
        ("xds", "admin"),
        ("metrics", "admin"),
    ] {
        assert!(
            !g[layer].contains(never),
            "{layer} must not import {never}: {g:#?}"
        );
    }
    for leaf in ["metrics", "backoff"] {
        assert!(g[leaf].is_empty(), "{leaf} is a leaf: {:?}", g[leaf]);
    }
}

/// Edges `a → b` where module `a` of `src/<dir>` names sibling `b` (`super::b`,
/// `crate::<dir>::b`, or `super::{…, b, …}`).
fn edges(dir: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(dir);
    let names: BTreeSet<String> = mods.keys().filter(|n| *n != "mod").cloned().collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, code) in &mods {
        if name == "mod" {
            continue;
        }
        let mut deps = BTreeSet::new();
        for other in &names {
            if other == name {
                continue;
            }
            let direct = [
                format!("super::{other}::"),
                format!("super::{other};"),
                format!("crate::{dir}::{other}::"),
            ];
            let grouped = code.split("super::{").skip(1).any(|rest| {
                rest.split('}')
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .any(|item| item.trim().split("::").next() == Some(other.as_str()))
            });
            if grouped || direct.iter().any(|d| code.contains(d.as_str())) {
                deps.insert(other.clone());
            }
        }
        out.insert(name.clone(), deps);
    }
    out
}

/// A cycle in `g`, if there is one.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut vec![], &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(cycle(&g).unwrap(), vec!["a", "b", "c", "a"]);
}

#[test]
fn no_import_cycles_inside_wasm() {
    let g = edges("wasm");
    assert!(g["cache"].contains("fetch"), "the scan sees imports: {g:?}");
    assert_eq!(cycle(&g), None, "{g:#?}");
}

#[test]
fn the_cache_is_the_only_owner_of_its_state() {
    for (name, code) in modules("wasm") {
        let owners = code.matches("impl Cache {").count();
        let want = usize::from(name == "cache");
        assert_eq!(owners, want, "src/wasm/{name}.rs has {owners} `impl Cache`");
    }
    let cache = &modules("wasm")["cache"];
    assert!(
        !cache.contains("pub(super) struct State") && !cache.contains("pub struct State"),
        "State must stay private to cache.rs"
    );
}
