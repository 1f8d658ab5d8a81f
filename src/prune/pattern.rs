//! Layer selection by name pattern, for exclusions and per-layer overrides.
//!
//! A pattern is a glob over node names and parameter names (`*` matches any run of
//! characters, `?` one character), so `features.1.*`, `classifier.1` and
//! `classifier.1.weight` all select the classifier or the layers under a block, the way users
//! read names off `slimcandle inspect`.

use anyhow::{Result, bail};

/// One glob pattern, checked when parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    text: String,
}

impl NamePattern {
    pub fn parse(text: &str) -> Result<NamePattern> {
        let text = text.trim();
        if text.is_empty() {
            bail!("empty layer name pattern");
        }
        Ok(NamePattern {
            text: text.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern matches `name` as a whole.
    pub fn matches(&self, name: &str) -> bool {
        glob(self.text.as_bytes(), name.as_bytes())
    }

    /// Whether the pattern selects layer `node_name`: the node itself or its `.weight`.
    pub fn selects_layer(&self, node_name: &str) -> bool {
        self.matches(node_name) || self.matches(&format!("{node_name}.weight"))
    }
}

/// Parses a comma-separated list of patterns (an empty string gives none).
pub fn parse_list(text: &str) -> Result<Vec<NamePattern>> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(NamePattern::parse)
        .collect()
}

/// Iterative glob match with backtracking to the last `*`: linear in practice.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        let p = NamePattern::parse("features.1.*").unwrap();
        assert!(p.matches("features.1.conv.0.0"));
        assert!(!p.matches("features.10.conv.0.0"));
        assert!(!p.matches("xfeatures.1.conv"));
        let q = NamePattern::parse("classifier.?").unwrap();
        assert!(q.matches("classifier.1"));
        assert!(!q.matches("classifier.10"));
        assert!(NamePattern::parse("*").unwrap().matches(""));
        assert!(NamePattern::parse("*conv*0").unwrap().matches("a.conv.b.0"));
        assert!(!NamePattern::parse("*conv*0").unwrap().matches("a.conv.b.1"));
    }

    #[test]
    fn layers_are_selected_by_node_or_weight_name() {
        let p = NamePattern::parse("classifier.1.weight").unwrap();
        assert!(p.selects_layer("classifier.1"));
        assert!(!p.selects_layer("classifier.2"));
        assert_eq!(parse_list("a, b.*,").unwrap().len(), 2);
        assert!(NamePattern::parse("  ").is_err());
    }
}
