//! ARCHITECTURE.md's code map against the source tree, so that the document cannot drift: the
//! module graph is derived from the `crate::` and `super::` paths of `src/` (each file up to its
//! `#[cfg(test)]`, comments left out; a module and its own ancestors or descendants are not
//! counted), and the test fails when
//! - a module of `src/` is missing from the map, or the map names one that does not exist (the
//!   first cell of a row names a top-level module, `ntk/`, then its submodules, `gc`,
//!   `ranking::metrics`);
//! - the graph has a cycle, between files or between top-level modules;
//! - a top-level module uses one that is neither in a layer below it (the map's `###` sections,
//!   bottom up) nor named in its row's "uses" cell.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`ntk::gc`; the crate root is left out) → its source up to `#[cfg(test)]`, with
/// `//` comments removed.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            out.insert(parts.join("::"), code_of(&text));
        }
    }
    out
}

/// `text` up to its first `#[cfg(test)]`, with `//` comments (doc comments included) removed.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths a `use` tree starting at `s` names, as segments: `a::b::{c, d::e}` gives
/// `[a, b, c]` and `[a, b, d, e]`. Stops at the first character that continues no path.
fn paths_at(s: &str) -> Vec<Vec<String>> {
    fn tree(s: &[u8], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        let mut segs = prefix;
        loop {
            while *i < s.len() && s[*i].is_ascii_whitespace() {
                *i += 1;
            }
            if *i < s.len() && s[*i] == b'{' {
                *i += 1;
                loop {
                    tree(s, i, segs.clone(), out);
                    while *i < s.len() && s[*i].is_ascii_whitespace() {
                        *i += 1;
                    }
                    match s.get(*i) {
                        Some(b',') => *i += 1,
                        Some(b'}') => {
                            *i += 1;
                            return;
                        }
                        _ => return,
                    }
                    while *i < s.len() && s[*i].is_ascii_whitespace() {
                        *i += 1;
                    }
                    if s.get(*i) == Some(&b'}') {
                        *i += 1;
                        return;
                    }
                }
            }
            let start = *i;
            while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == b'_') {
                *i += 1;
            }
            if *i == start {
                out.push(segs);
                return;
            }
            segs.push(String::from_utf8_lossy(&s[start..*i]).into_owned());
            if s[*i..].starts_with(b"::") {
                *i += 2;
            } else {
                out.push(segs);
                return;
            }
        }
    }
    let mut out = Vec::new();
    tree(s.as_bytes(), &mut 0, Vec::new(), &mut out);
    out
}

/// The modules `m` (with code `code`) uses, among `mods`: every `crate::` and `super::` path
/// resolved to the longest module prefix, leaving out `m`'s own ancestors and descendants.
fn uses_of(m: &str, code: &str, mods: &BTreeSet<String>) -> BTreeSet<String> {
    let own: Vec<&str> = if m.is_empty() {
        vec![]
    } else {
        m.split("::").collect()
    };
    let related =
        |c: &str| c == m || m.starts_with(&format!("{c}::")) || c.starts_with(&format!("{m}::"));
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    for (at, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        if at > 0
            && (bytes[at - 1].is_ascii_alphanumeric()
                || bytes[at - 1] == b'_'
                || bytes[at - 1] == b':')
        {
            continue;
        }
        let mut base: Vec<&str> = Vec::new();
        let mut rest = &code[at..];
        if let Some(r) = rest.strip_prefix("crate::") {
            rest = r;
        } else {
            base = own.clone();
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
        }
        for path in paths_at(rest) {
            let full: Vec<String> = base.iter().map(|s| s.to_string()).chain(path).collect();
            let hit = (1..=full.len())
                .rev()
                .map(|k| full[..k].join("::"))
                .find(|c| mods.contains(c));
            if let Some(c) = hit {
                if !related(&c) {
                    out.insert(c);
                }
            }
        }
    }
    out
}

/// The module graph of `src`: module → the modules it uses.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let names: BTreeSet<String> = mods.keys().cloned().collect();
    mods.iter()
        .map(|(m, code)| (m.clone(), uses_of(m, code, &names)))
        .collect()
}

/// The strongly connected components of more than one node (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let l = t.low[v].min(t.low[w]);
                t.low.insert(v, l);
            } else if t.on.contains(w) {
                let l = t.low[v].min(t.index[w]);
                t.low.insert(v, l);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// The graph between top-level modules.
fn top_level(g: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, uses) in g {
        let e = out.entry(top(m)).or_default();
        e.extend(uses.iter().map(|u| top(u)).filter(|u| *u != top(m)));
    }
    out
}

/// One row of the code map.
#[derive(Debug)]
struct Row {
    /// Index of its layer (`###` section), bottom up.
    layer: usize,
    /// The top-level module.
    module: String,
    /// It and its submodules, as full paths.
    modules: Vec<String>,
    /// The top-level modules its "uses" cell names.
    uses: BTreeSet<String>,
}

/// The backticked words of `cell`.
fn ticked(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// The rows of the `## Code map` section of `doc`.
fn code_map(doc: &str) -> Vec<Row> {
    let doc = format!("\n{doc}");
    let start = doc
        .find("\n## Code map")
        .expect("ARCHITECTURE.md has a `## Code map` section");
    let section = &doc[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let mut layer = None;
    let mut rows = Vec::new();
    for line in section.lines() {
        if line.starts_with("### ") {
            layer = Some(layer.map_or(0, |l| l + 1));
            continue;
        }
        if !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 5, "a code map row has three cells: {line}");
        let names = ticked(cells[1]);
        let module = names[0].trim_end_matches('/').to_string();
        let mut modules = vec![module.clone()];
        modules.extend(names[1..].iter().map(|s| format!("{module}::{s}")));
        let uses = ticked(cells[3])
            .iter()
            .map(|u| u.split([':', '/']).next().unwrap_or(u).to_string())
            .collect();
        rows.push(Row {
            layer: layer.expect("code map rows sit under a `###` layer"),
            module,
            modules,
            uses,
        });
    }
    rows
}

/// Everything the map and the graph disagree on, in words; empty when they agree.
fn disagreements(g: &BTreeMap<String, BTreeSet<String>>, rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    let in_src: BTreeSet<&String> = g.keys().collect();
    let mut in_map: BTreeSet<&String> = BTreeSet::new();
    for r in rows {
        for m in &r.modules {
            if !in_map.insert(m) {
                out.push(format!("the map names `{m}` twice"));
            }
        }
    }
    for m in in_src.difference(&in_map) {
        out.push(format!("module `{m}` is in src/ but not in the code map"));
    }
    for m in in_map.difference(&in_src) {
        out.push(format!(
            "the code map names `{m}`, which is not a module of src/"
        ));
    }
    for c in cycles(g) {
        out.push(format!("module cycle: {}", c.join(" <-> ")));
    }
    let top = top_level(g);
    for c in cycles(&top) {
        out.push(format!(
            "cycle between top-level modules: {}",
            c.join(" <-> ")
        ));
    }
    let row: BTreeMap<&str, &Row> = rows.iter().map(|r| (r.module.as_str(), r)).collect();
    for r in rows {
        for u in &r.uses {
            if !row.contains_key(u.as_str()) {
                out.push(format!(
                    "`{}` uses `{u}`, which the map does not list",
                    r.module
                ));
            }
        }
    }
    for (m, uses) in &top {
        let Some(r) = row.get(m.as_str()) else {
            continue;
        };
        for u in uses {
            let Some(ur) = row.get(u.as_str()) else {
                continue;
            };
            if ur.layer >= r.layer && !r.uses.contains(u) {
                out.push(format!(
                    "`{m}` uses `{u}`, which is not in a layer below it nor in its \"uses\" cell"
                ));
            }
        }
    }
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The code map of ARCHITECTURE.md matches the modules of src/ and their `use crate::` graph.
#[test]
fn code_map_matches_the_module_graph() {
    let g = graph(&root().join("src"));
    assert!(
        g.len() > 50 && g.contains_key("ntk::gc"),
        "modules found: {g:?}"
    );
    assert!(
        g["ntk::pipeline"].contains("ntk::gc"),
        "{:?}",
        g["ntk::pipeline"]
    );
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let rows = code_map(&doc);
    let found = disagreements(&g, &rows);
    assert!(
        found.is_empty(),
        "ARCHITECTURE.md and src/ disagree:\n{}",
        found.join("\n")
    );
}

/// The checks find what they are for, on a made-up tree and map: a cycle, a module missing
/// from the map, a name the tree does not have, and a use of a module in the same layer that
/// the row does not name.
#[test]
fn disagreements_are_found() {
    let dir = std::env::temp_dir().join(format!("tailscope-arch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    let write = |p: &str, s: &str| std::fs::write(dir.join(p), s).unwrap();
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n");
    write("a/mod.rs", "pub mod x;\npub mod y;\n");
    write("a/x.rs", "use super::y::Y;\n");
    write(
        "a/y.rs",
        "use crate::a::{x::{self, X}, z};\n// crate::c is only a comment\n",
    );
    write(
        "b.rs",
        "fn f() { crate::a::x::g(); }\n#[cfg(test)]\nmod t { use crate::c; }\n",
    );
    write("c.rs", "");
    let g = graph(&dir);
    assert_eq!(g["a::x"], BTreeSet::from(["a::y".to_string()]));
    assert_eq!(g["a::y"], BTreeSet::from(["a::x".to_string()]));
    assert_eq!(g["b"], BTreeSet::from(["a::x".to_string()]));
    assert!(g["c"].is_empty());
    let map = "## Code map\n### Low\n| module | owns | uses |\n|---|---|---|\n\
               | `a/` (`x`, `y`) | things | — |\n| `c` | more | — |\n### High\n\
               | `b` | top | `a` |\n## Invariants\n| `zzz` | not in the map | — |\n";
    assert_eq!(
        disagreements(&g, &code_map(map)),
        ["module cycle: a::x <-> a::y"]
    );
    let edited = map
        .replace("(`x`, `y`)", "(`x`, `w`)")
        .replace("### High\n", "");
    let found = disagreements(&g, &code_map(&edited));
    for want in [
        "module `a::y` is in src/ but not in the code map",
        "the code map names `a::w`, which is not a module of src/",
        "module cycle: a::x <-> a::y",
    ] {
        assert!(found.iter().any(|f| f == want), "{want} not in {found:?}");
    }
    // Without the `### High` heading, `b` sits in the same layer as `a` but names it: allowed.
    let same_layer = map
        .replace("### High\n", "")
        .replace("| `b` | top | `a` |", "| `b` | top | — |");
    let found = disagreements(&g, &code_map(&same_layer));
    assert!(
        found.iter().any(|f| f == "`b` uses `a`, which is not in a layer below it nor in its \"uses\" cell"),
        "{found:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
