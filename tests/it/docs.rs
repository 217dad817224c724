//! The documentation's configuration examples: every TOML block of README.md and of each
//! page in `docs/` passes `outboxd check-config` as written.

use crate::cli::run_with;

/// The ```toml blocks of `text`.
fn toml_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "a ```toml block is not closed");
    blocks
}

#[test]
fn every_configuration_example_in_the_docs_passes_check_config() {
    let mut pages: Vec<String> = std::fs::read_dir("docs")
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".md"))
        .collect();
    pages.sort();
    pages.insert(0, "README.md".into());
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (n, block) in toml_blocks(&text).iter().enumerate() {
            let (code, out, err) = run_with(&["check-config"], block, &[]);
            assert_eq!(
                code,
                0,
                "{page}, TOML example {}:\n{block}\n{out}{err}",
                n + 1
            );
            checked += 1;
        }
    }
    // README's relay and consumer, and the examples of architecture, configuration,
    // debezium and sidecar.
    assert!(checked >= 6, "only {checked} examples found in {pages:?}");
}

#[test]
fn toml_blocks_are_found_and_other_blocks_are_not() {
    let text = "a\n```toml\n[kafka]\nbrokers = \"x\"\n```\n```sh\nls\n```\n```toml\nb = 1\n```\n";
    assert_eq!(toml_blocks(text), ["[kafka]\nbrokers = \"x\"\n", "b = 1\n"]);
}
