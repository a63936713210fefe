//! The stages' one-way imports (the crate documentation lists them), checked on the source:
//! a stage that imports from a stage not above it fails this test, naming the file.

use std::{collections::BTreeMap, path::Path};

/// Each stage and the stages it may import from.
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("metrics", &[]),
    ("source", &["model", "metrics"]),
    ("plan", &["model", "source"]),
    ("datapath", &["model", "plan"]),
    ("sync", &["model", "plan", "datapath"]),
    (
        "agent",
        &["model", "metrics", "source", "plan", "datapath", "sync"],
    ),
];

/// The stages a source text names as `crate::<stage>`, outside comments and test modules.
fn imported(text: &str) -> Vec<&str> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let mut found = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let name = rest
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .next();
            found.extend(name);
        }
    }
    // Grouped imports: `use crate::{\n    stage::...,` names a stage at the start of a line.
    for group in code.split("use crate::{").skip(1) {
        let group = group.split("};").next().unwrap_or("");
        for line in group.lines() {
            let name = line
                .trim()
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .next();
            found.extend(name.filter(|n| !n.is_empty()));
        }
    }
    found
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source folder") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_stage_imports_only_the_stages_above_it() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    files(&src, &mut paths);
    let mut wrong = Vec::new();
    for path in &paths {
        let relative = path.strip_prefix(&src).expect("under src");
        let stage = relative
            .iter()
            .next()
            .and_then(|s| s.to_str())
            .map(|s| s.trim_end_matches(".rs"))
            .unwrap_or("");
        let Some(may) = allowed.get(stage) else {
            continue; // lib.rs, main.rs, this file
        };
        if relative.ends_with("tests.rs") || relative.ends_with("fake.rs") {
            continue; // test code
        }
        let text = std::fs::read_to_string(path).expect("readable source");
        for name in imported(&text) {
            if name != stage && allowed.contains_key(name) && !may.contains(&name) {
                wrong.push(format!("{} imports {name}", relative.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the stages' order (lib.rs):\n{}",
        wrong.join("\n")
    );
}
