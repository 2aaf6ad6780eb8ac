//! The README against the repository: its library program is `examples/train_loop.rs` as it is, its links
//! stay inside the repository and resolve, its tables render, and its quick blocks are well-formed (the
//! commands themselves run in `scripts/readme-commands.sh`).

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("examples/ sits in the repository")
        .to_path_buf()
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// The fenced block right after the line `marker`, without its fences.
fn block_after(text: &str, marker: &str) -> Option<String> {
    let mut lines = text.lines().skip_while(|l| l.trim() != marker).skip(1);
    lines.next().filter(|fence| fence.starts_with("```"))?;
    let body: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    Some(body.iter().map(|l| format!("{l}\n")).collect())
}

#[test]
fn the_readme_program_is_examples_train_loop() {
    let text = readme();
    let shown = block_after(&text, "<!-- file: examples/train_loop.rs -->")
        .expect("README: `<!-- file: examples/train_loop.rs -->` before a fenced block");
    let file = std::fs::read_to_string(repo().join("examples/train_loop.rs")).expect("file");
    assert_eq!(
        shown, file,
        "the README's program differs from examples/train_loop.rs: copy the file into the README"
    );
}

#[test]
fn links_stay_in_the_repository_and_resolve() {
    let text = readme();
    let mut checked = 0;
    for (i, _) in text.match_indices("](") {
        let target: String = text[i + 2..].chars().take_while(|&c| c != ')').collect();
        if target.starts_with("http://")
            || target.starts_with("https://")
            || target.starts_with('#')
        {
            continue;
        }
        let path = target.split('#').next().unwrap_or_default();
        let resolved = repo().join(path);
        assert!(
            !path.starts_with('/') && !path.split('/').any(|part| part == ".."),
            "README links outside the repository: {target}"
        );
        assert!(
            resolved.exists(),
            "README links to a missing file: {target}"
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "found only {checked} relative links: the scan is broken"
    );
    assert!(
        !text.contains("`../") && !text.contains(" ../"),
        "README refers to a path outside the repository"
    );
    assert!(
        !text.to_lowercase().contains("issue"),
        "README speaks of issues; say what is meant instead"
    );
}

#[test]
fn every_table_renders() {
    // A table is a run of lines starting with `|`; its second line must be the separator, and every row
    // must have as many cells as the header (a blank line inside a table cuts it in two).
    let text = readme();
    let lines: Vec<&str> = text.lines().collect();
    let cells = |l: &str| l.trim().trim_matches('|').split(" | ").count();
    let mut tables = 0;
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].starts_with('|') {
            i += 1;
            continue;
        }
        let start = i;
        while i < lines.len() && lines[i].starts_with('|') {
            i += 1;
        }
        let table = &lines[start..i];
        assert!(
            table.len() >= 2 && table[1].starts_with("|---"),
            "README line {}: a table without a header separator (a row cut off by a blank line?): {}",
            start + 1,
            table[0]
        );
        for row in &table[2..] {
            assert_eq!(
                cells(row),
                cells(table[0]),
                "README line {}: row cells differ from the header: {row}",
                start + 1
            );
        }
        tables += 1;
    }
    assert!(
        tables >= 5,
        "found only {tables} tables: the scan is broken"
    );
}

#[test]
fn quick_blocks_are_shell_blocks_with_commands() {
    // As scripts/readme-commands.sh reads them: a line that is the marker, then a ```sh block.
    let text = readme();
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = 0;
    for (i, _) in lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim() == "<!-- quick -->")
    {
        assert_eq!(
            lines.get(i + 1),
            Some(&"```sh"),
            "README line {}: quick blocks are ```sh blocks",
            i + 2
        );
        let block: Vec<&str> = lines[i + 2..]
            .iter()
            .copied()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        assert!(
            block
                .iter()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')),
            "README line {}: an empty quick block",
            i + 1
        );
        for line in block {
            assert!(
                !line.contains('[') && !line.contains('…') && !line.trim_end().ends_with('\\'),
                "README: a quick command with a placeholder or a continuation cannot run as written: {line}"
            );
        }
        blocks += 1;
    }
    assert!(blocks >= 5, "only {blocks} quick blocks");
}
