//! The layout of `src/`: dependencies between files run one way. A file names another
//! through a `crate::`, `super::` or `self::` path outside comments; no file names a file
//! that names it back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `.rs` file under `src/` by its module path (`relay/store/postgres/cursor`; a
/// `mod.rs` by its directory, `lib.rs` as the empty path), with its text.
fn modules(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut inner = prefix.to_vec();
            inner.push(path.file_name().unwrap().to_string_lossy().into_owned());
            modules(&path, &inner, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut module = prefix.to_vec();
            if !matches!(name.as_str(), "mod" | "lib" | "main") {
                module.push(name.clone());
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code: Vec<&str> = text
                .lines()
                .map(|l| l.split("//").next().unwrap())
                .collect();
            out.entry(module)
                .and_modify(|t| t.push_str(&code.join("\n")))
                .or_insert_with(|| code.join("\n"));
        }
    }
}

/// The paths a text names: every `a::b::c`, with `use` groups (`a::{b, c::{d, e}}`)
/// spelled out.
fn paths(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let word_char = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
        if word_char(chars[i]) && (i == 0 || !word_char(chars[i - 1])) {
            let start = i;
            while i < chars.len() && word_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.ends_with("::") && chars.get(i) == Some(&'{') {
                let (inner, end) = group(&chars, i);
                out.extend(inner.into_iter().map(|p| format!("{word}{p}")));
                i = end;
            } else if word.contains("::") {
                out.push(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The paths of the group that opens at `chars[open]` (`{`), and the index after it.
fn group(chars: &[char], open: usize) -> (Vec<String>, usize) {
    let mut depth = 0;
    let mut close = open;
    for (j, c) in chars.iter().enumerate().skip(open) {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = j;
                    break;
                }
            }
            _ => {}
        }
    }
    let body: String = chars[open + 1..close].iter().collect();
    let mut items = Vec::new();
    let (mut depth, mut item) = (0, String::new());
    for c in body.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    items.push(item);
    let mut out = Vec::new();
    for item in items {
        let item = item.trim();
        let chars: Vec<char> = item.chars().collect();
        if let Some(at) = chars.iter().position(|c| *c == '{') {
            // A nested group: `b::{c, d}`.
            let prefix: String = chars[..at].iter().filter(|c| !c.is_whitespace()).collect();
            out.extend(
                group(&chars, at)
                    .0
                    .into_iter()
                    .map(|p| format!("{prefix}{p}")),
            );
        } else {
            // `d as e` names `d`.
            let name = item.split(" as ").next().unwrap_or_default().trim();
            if !name.is_empty() {
                out.push(name.to_owned());
            }
        }
    }
    (out, close + 1)
}

/// The files `module` names, by the longest module path each of its paths starts with.
fn named_by(
    module: &[String],
    text: &str,
    all: &BTreeMap<Vec<String>, String>,
) -> BTreeSet<Vec<String>> {
    let mut named = BTreeSet::new();
    for path in paths(text) {
        let mut segments = path.split("::").filter(|s| !s.is_empty());
        let mut base: Vec<String> = match segments.next() {
            Some("crate") => Vec::new(),
            // `self` is the file's own module, `super` its parent.
            Some("self") => module.to_vec(),
            Some("super") => module[..module.len().saturating_sub(1)].to_vec(),
            _ => continue,
        };
        let mut rest: Vec<&str> = segments.collect();
        while rest.first() == Some(&"super") {
            base.pop();
            rest.remove(0);
        }
        base.extend(rest.iter().map(|s| s.to_string()));
        while !base.is_empty() && !all.contains_key(&base) {
            base.pop();
        }
        if base.as_slice() != module {
            named.insert(base);
        }
    }
    named
}

#[test]
fn use_groups_are_spelled_out() {
    assert_eq!(
        paths("use super::{a, b::{c, d as e}, f::g};\nlet x = crate::h::i(1);"),
        [
            "super::a",
            "super::b::c",
            "super::b::d",
            "super::f::g",
            "crate::h::i"
        ]
    );
}

#[test]
fn no_source_file_names_a_file_that_names_it_back() {
    let mut all = BTreeMap::new();
    modules(Path::new("src"), &[], &mut all);
    assert!(all.len() > 50, "read src/: {} files", all.len());
    let edges: BTreeMap<&Vec<String>, BTreeSet<Vec<String>>> = all
        .iter()
        .map(|(module, text)| (module, named_by(module, text, &all)))
        .collect();
    let mut cycles = Vec::new();
    for (a, names) in &edges {
        for b in names {
            if a.as_slice() < b.as_slice() && edges.get(b).is_some_and(|n| n.contains(*a)) {
                cycles.push(format!("{} <-> {}", a.join("/"), b.join("/")));
            }
        }
    }
    assert!(cycles.is_empty(), "files that name each other: {cycles:?}");
}
