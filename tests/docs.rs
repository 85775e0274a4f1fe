//! The project's own documents hold together: every `design.md section N` cited in the source,
//! the tools, the kernels and the README names a `## N.` heading of docs/design.md.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `## N.` headings of docs/design.md.
fn headings() -> BTreeSet<u32> {
    let text = std::fs::read_to_string(root().join("docs/design.md")).expect("docs/design.md");
    text.lines().filter_map(|l| l.strip_prefix("## ")?.split_once('.')?.0.parse().ok()).collect()
}

/// Every section number cited as `design.md section N`, `sections N and M` or `sections N to M`
/// in `text` (a citation may run over a line break).
fn citations(text: &str) -> Vec<u32> {
    // Comment markers between the words of a citation that runs over a line break are skipped.
    let words: Vec<&str> = text.split_whitespace().filter(|w| !w.chars().all(|c| "/!#*".contains(c))).collect();
    let mut found = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if !w.ends_with("design.md") || !words.get(i + 1).is_some_and(|n| n.starts_with("section")) {
            continue;
        }
        let mut j = i + 2;
        while let Some(n) = words.get(j).and_then(|w| w.trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u32>().ok()) {
            found.push(n);
            match words.get(j + 1) {
                Some(&"and") | Some(&"to") => j += 2,
                _ => break,
            }
        }
    }
    found
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "golden" {
                files(&path, out);
            }
        } else if ["rs", "md", "sh", "py", "cu", "cuh"].iter().any(|e| name.ends_with(&format!(".{e}"))) {
            out.push(path);
        }
    }
}

#[test]
fn every_design_section_cited_exists() {
    let sections = headings();
    assert!(sections.len() >= 11, "docs/design.md has only {sections:?}");
    let mut all = Vec::new();
    for dir in ["engine", "loaders", "tests", "tools", "cuda", "benches"] {
        files(&root().join(dir), &mut all);
    }
    all.push(root().join("README.md"));
    let mut cited = 0;
    for path in all {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for n in citations(&text) {
            assert!(sections.contains(&n), "{} cites design.md section {n}, which docs/design.md does not have", path.display());
            cited += 1;
        }
    }
    assert!(cited > 20, "only {cited} citations found: the scan is broken");
}

#[test]
fn citations_are_read_as_written() {
    assert_eq!(citations("see design.md section 6, and design.md sections 5 to 7"), vec![6, 5, 7]);
    assert_eq!(citations("(design.md\n//! section 11), design.md sections 5 and 7."), vec![11, 5, 7]);
    assert!(citations("the design section 3").is_empty());
}
