//! A recipe file as a tree of values that remember where they were written, so that every
//! problem found later can point at its line and column; `--set` overrides land in the same
//! tree, remembered as coming from the command line.

use std::fmt;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};

/// Where a value or key came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// 1-based line and column in the recipe file.
    File { line: usize, column: usize },
    /// A `--set KEY=VALUE` argument.
    Set(String),
}

/// One thing wrong with a recipe, where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    pub message: String,
}

/// Every problem of one recipe, rendered one per line as `FILE:LINE:COL: message`.
#[derive(Debug, Clone)]
pub struct Problems {
    pub path: PathBuf,
    pub list: Vec<Problem>,
}

impl Problems {
    /// The problems, one line each, in file order (`--set` ones last).
    pub fn lines(&self) -> Vec<String> {
        let mut list = self.list.clone();
        list.sort_by(|a, b| a.origin.cmp(&b.origin));
        list.dedup();
        list.iter()
            .map(|p| match &p.origin {
                Origin::File { line, column } => {
                    format!("{}:{line}:{column}: {}", self.path.display(), p.message)
                }
                Origin::Set(arg) => format!("--set {arg}: {}", p.message),
            })
            .collect()
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.lines().join("\n"))
    }
}

impl std::error::Error for Problems {}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Kept as written; no option takes one.
    Datetime(String),
    Array(Vec<Node>),
    Table(Table),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Datetime(_) => "a date-time",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }

    /// The text a scalar stands for on the command line. Floats keep their point (`4.0`), so
    /// that an integer option given a float is refused as on the command line.
    pub fn as_arg_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(x) => Some(format!("{x:?}")),
            Value::Bool(b) => Some(b.to_string()),
            Value::Datetime(d) => Some(d.clone()),
            Value::Array(_) | Value::Table(_) => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_table(&self) -> Option<&Table> {
        match self {
            Value::Table(t) => Some(t),
            _ => None,
        }
    }

    fn to_toml(&self) -> toml::Value {
        match self {
            Value::Str(s) => toml::Value::String(s.clone()),
            Value::Int(i) => toml::Value::Integer(*i),
            Value::Float(x) => toml::Value::Float(*x),
            Value::Bool(b) => toml::Value::Boolean(*b),
            Value::Datetime(d) => toml::Value::String(d.clone()),
            Value::Array(items) => {
                toml::Value::Array(items.iter().map(|n| n.value.to_toml()).collect())
            }
            Value::Table(t) => toml::Value::Table(t.to_toml()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_origin: Origin,
    pub node: Node,
}

/// A table's entries in the order written.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    pub entries: Vec<Entry>,
}

impl Table {
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// Sets `key` (replacing its value in place, or appending it).
    pub fn set(&mut self, key: &str, node: Node) {
        match self.entries.iter_mut().find(|e| e.key == key) {
            Some(e) => e.node = node,
            None => self.entries.push(Entry {
                key: key.to_string(),
                key_origin: node.origin.clone(),
                node,
            }),
        }
    }

    fn to_toml(&self) -> toml::Table {
        self.entries
            .iter()
            .map(|e| (e.key.clone(), e.node.value.to_toml()))
            .collect()
    }
}

/// A parsed recipe: its file and its top-level table.
#[derive(Debug, Clone)]
pub struct Document {
    pub path: PathBuf,
    pub root: Table,
}

/// Maps byte offsets of a text to 1-based lines and columns (in characters).
struct Lines<'a> {
    text: &'a str,
}

impl Lines<'_> {
    fn origin(&self, offset: usize) -> Origin {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Origin::File { line, column }
    }
}

impl Document {
    /// Parses recipe text; a syntax error comes back as a problem at its position.
    pub fn parse(path: &Path, text: &str) -> Result<Document, Problems> {
        let lines = Lines { text };
        let table = DeTable::parse(text).map_err(|e| Problems {
            path: path.to_path_buf(),
            list: vec![Problem {
                origin: lines.origin(e.span().map_or(0, |s| s.start)),
                message: format!("invalid TOML: {}", e.message().trim()),
            }],
        })?;
        Ok(Document {
            path: path.to_path_buf(),
            root: convert_table(table.get_ref(), &lines),
        })
    }

    /// Reads and parses a recipe file.
    pub fn read(path: &Path) -> anyhow::Result<Document> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read recipe `{}`: {e}", path.display()))?;
        Ok(Document::parse(path, &text)?)
    }

    /// Applies `--set KEY=VALUE` overrides: `train.lr=0.05`, `data.test_limit=100`,
    /// `stage.NAME.key=VALUE` (a stage by its name), `stage.NAME.finetune.epochs=2`. The value
    /// is read as TOML (`0.05`, `true`, `"text"`, `[1, 2]`) and as a plain string otherwise.
    pub fn apply_sets(&mut self, sets: &[String]) -> Result<(), Problems> {
        let mut list = Vec::new();
        for arg in sets {
            if let Err(message) = self.apply_set(arg) {
                list.push(Problem {
                    origin: Origin::Set(arg.clone()),
                    message,
                });
            }
        }
        if list.is_empty() {
            Ok(())
        } else {
            Err(Problems {
                path: self.path.clone(),
                list,
            })
        }
    }

    fn apply_set(&mut self, arg: &str) -> Result<(), String> {
        let Some((key, text)) = arg.split_once('=') else {
            return Err("expected KEY=VALUE, e.g. `train.lr=0.05`".into());
        };
        let origin = Origin::Set(arg.to_string());
        let value = match DeValue::parse(text) {
            Ok(v) => convert_value(v.get_ref(), &Lines { text }, &origin),
            Err(_) => Value::Str(text.to_string()),
        };
        let node = Node {
            value,
            origin: origin.clone(),
        };
        let parts: Vec<&str> = key.trim().split('.').collect();
        let (table, rest) = match parts.as_slice() {
            ["stage", name, rest @ ..] if !rest.is_empty() => {
                let stage = self
                    .stages_mut()
                    .into_iter()
                    .find(|t| t.get("name").and_then(|e| e.node.value.as_str()) == Some(name))
                    .ok_or_else(|| format!("no stage is named `{name}`"))?;
                (stage, rest.to_vec())
            }
            [section, rest @ ..] if !rest.is_empty() && *section != "stage" => (
                section_mut(&mut self.root, section, &origin)?,
                rest.to_vec(),
            ),
            _ => {
                return Err(
                    "KEY is SECTION.KEY (`train.lr`) or stage.NAME.KEY (`stage.prune.target_macs`)"
                        .into(),
                );
            }
        };
        let (last, path) = rest.split_last().expect("rest is not empty");
        let mut table = table;
        for part in path {
            table = section_mut(table, part, &origin)?;
        }
        table.set(last, node);
        Ok(())
    }

    /// The `[[stage]]` tables (those that are tables).
    pub fn stages(&self) -> Vec<&Table> {
        match self.root.get("stage").map(|e| &e.node.value) {
            Some(Value::Array(items)) => items.iter().filter_map(|n| n.value.as_table()).collect(),
            _ => Vec::new(),
        }
    }

    fn stages_mut(&mut self) -> Vec<&mut Table> {
        match self.root.entries.iter_mut().find(|e| e.key == "stage") {
            Some(Entry {
                node:
                    Node {
                        value: Value::Array(items),
                        ..
                    },
                ..
            }) => items
                .iter_mut()
                .filter_map(|n| match &mut n.value {
                    Value::Table(t) => Some(t),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The effective recipe as TOML: what `recipe.lock.toml` holds.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(&self.root.to_toml()).expect("a TOML tree serialises")
    }
}

/// The sub-table `key` of `table`, created when absent.
fn section_mut<'t>(
    table: &'t mut Table,
    key: &str,
    origin: &Origin,
) -> Result<&'t mut Table, String> {
    if table.get(key).is_none() {
        table.set(
            key,
            Node {
                value: Value::Table(Table::default()),
                origin: origin.clone(),
            },
        );
    }
    let entry = table
        .entries
        .iter_mut()
        .find(|e| e.key == key)
        .expect("just set");
    match &mut entry.node.value {
        Value::Table(t) => Ok(t),
        other => Err(format!("`{key}` is {}, not a table", other.type_name())),
    }
}

fn convert_table(table: &DeTable<'_>, lines: &Lines<'_>) -> Table {
    Table {
        entries: table
            .iter()
            .map(|(k, v)| {
                let origin = lines.origin(v.span().start);
                Entry {
                    key: k.get_ref().to_string(),
                    key_origin: lines.origin(k.span().start),
                    node: Node {
                        value: convert_value(v.get_ref(), lines, &origin),
                        origin,
                    },
                }
            })
            .collect(),
    }
}

/// Converts a parsed value; `origin` is where it stands (for values parsed from `--set`, whose
/// inner offsets mean nothing in the file).
fn convert_value(value: &DeValue<'_>, lines: &Lines<'_>, origin: &Origin) -> Value {
    let in_file = matches!(origin, Origin::File { .. });
    match value {
        DeValue::String(s) => Value::Str(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            match i64::from_str_radix(&digits, i.radix()) {
                Ok(v) => Value::Int(v),
                Err(_) => Value::Str(i.as_str().to_string()),
            }
        }
        DeValue::Float(x) => {
            let text = x.as_str().replace('_', "");
            match text.parse::<f64>() {
                Ok(v) => Value::Float(v),
                Err(_) => Value::Str(text),
            }
        }
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| {
                    let o = if in_file {
                        lines.origin(item.span().start)
                    } else {
                        origin.clone()
                    };
                    Node {
                        value: convert_value(item.get_ref(), lines, &o),
                        origin: o,
                    }
                })
                .collect(),
        ),
        DeValue::Table(t) if in_file => Value::Table(convert_table(t, lines)),
        DeValue::Table(t) => Value::Table(Table {
            entries: t
                .iter()
                .map(|(k, v)| Entry {
                    key: k.get_ref().to_string(),
                    key_origin: origin.clone(),
                    node: Node {
                        value: convert_value(v.get_ref(), lines, origin),
                        origin: origin.clone(),
                    },
                })
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Document {
        Document::parse(Path::new("r.toml"), text).unwrap()
    }

    #[test]
    fn values_remember_line_and_column() {
        let d = doc("[train]\nlr = 0.1\n\n[[stage]]\nname = \"a\"\n  epochs = 3\n");
        let train = d.root.get("train").unwrap().node.value.as_table().unwrap();
        let lr = train.get("lr").unwrap();
        assert_eq!(lr.key_origin, Origin::File { line: 2, column: 1 });
        assert_eq!(lr.node.origin, Origin::File { line: 2, column: 6 });
        assert_eq!(lr.node.value, Value::Float(0.1));
        let stage = d.stages()[0];
        assert_eq!(
            stage.get("epochs").unwrap().key_origin,
            Origin::File { line: 6, column: 3 }
        );
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let e = Document::parse(Path::new("r.toml"), "[train]\nlr = = 1\n").unwrap_err();
        assert_eq!(e.list.len(), 1);
        assert!(e.lines()[0].starts_with("r.toml:2:"), "{}", e);
    }

    #[test]
    fn sets_override_sections_and_stages() {
        let mut d = doc("[train]\nlr = 0.1\n[[stage]]\nname = \"prune\"\nratio = 0.5\n");
        d.apply_sets(&[
            "train.lr=0.05".into(),
            "stage.prune.finetune.epochs=2".into(),
            "data.data=shapes".into(),
        ])
        .unwrap();
        let lock = d.to_toml_string();
        let back: toml::Table = lock.parse().unwrap();
        assert_eq!(back["train"]["lr"].as_float(), Some(0.05));
        assert_eq!(back["stage"][0]["finetune"]["epochs"].as_integer(), Some(2));
        assert_eq!(back["data"]["data"].as_str(), Some("shapes"));
        let e = d.apply_sets(&["stage.nope.lr=1".into()]).unwrap_err();
        assert_eq!(
            e.lines(),
            vec!["--set stage.nope.lr=1: no stage is named `nope`"]
        );
    }
}
