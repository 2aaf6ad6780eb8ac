//! `--set key.path=value` overrides applied to the TOML tree before it is deserialized, and the rules that
//! say which input an error is about: a file, the DeepSpeed JSON, or one `--set`.

use super::ConfigError;

/// One `--set key.path=value`, parsed.
#[derive(Clone, Debug)]
pub struct Override {
    /// As given on the command line.
    pub arg: String,
    /// The key's parts, as TOML reads the dotted key (`"model".n_layer` is `model`, `n_layer`).
    pub path: Vec<String>,
    pub value: toml::Value,
    /// Why the value, which looks like a TOML value but is not one, was taken as a plain string.
    not_toml: Option<String>,
}

impl Override {
    /// Parses `arg`: the key as a TOML dotted key, the value as a TOML value (`0.01`, `true`,
    /// `[0.9, 0.95]`, `"text"`), or else as a plain string (`data.train=/data/tokens.bin`).
    pub fn parse(arg: &str) -> Result<Override, ConfigError> {
        let err = |message: String| ConfigError::Override {
            arg: arg.to_string(),
            message,
        };
        let (key, raw) = arg
            .split_once('=')
            .ok_or_else(|| err("expected key.path=value".into()))?;
        let path = key_path(key).ok_or_else(|| {
            err(format!(
                "`{}` is not a key: write section.key, as in the config reference (`optim.lr`)",
                key.trim()
            ))
        })?;
        let raw = raw.trim();
        let (value, not_toml) = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => match t.remove("v") {
                Some(v) => (v, None),
                None => (toml::Value::String(raw.into()), None),
            },
            // A word or a path is a string as meant; a value that starts like a number, an array, a table
            // or a quoted string and is none is explained where the key wanted something else.
            Err(e) if raw.starts_with(|c: char| c.is_ascii_digit() || "+-.[{\"'".contains(c)) => {
                (toml::Value::String(raw.into()), Some(why_not_toml(raw, &e)))
            }
            Err(_) => (toml::Value::String(raw.into()), None),
        };
        Ok(Override {
            arg: arg.to_string(),
            path,
            value,
            not_toml,
        })
    }

    /// The key, its parts joined by dots (`model.n_layer`).
    pub fn key(&self) -> String {
        self.path.join(".")
    }

    /// Sets the key in `table` (creating sections).
    pub fn apply(&self, table: &mut toml::Table) -> Result<(), ConfigError> {
        let (last, parents) = self
            .path
            .split_last()
            .ok_or_else(|| ConfigError::Override {
                arg: self.arg.clone(),
                message: "empty key".into(),
            })?;
        let mut node = table;
        for part in parents {
            let entry = node
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Override {
                        arg: self.arg.clone(),
                        message: format!("`{part}` is a value, not a section"),
                    })
                }
            };
        }
        node.insert(last.clone(), self.value.clone());
        Ok(())
    }

    /// `err`, the error of the tree right after this override was applied, named by this `--set`. A value
    /// taken as a string because it is not TOML says why, where the key wanted something else.
    pub(super) fn blame(&self, err: ConfigError) -> ConfigError {
        let (key, message) = match err {
            ConfigError::Key { key, message, .. } => (key, message),
            ConfigError::Invalid { key, message } => (key.to_string(), message),
            other => return other,
        };
        let message = match &self.not_toml {
            Some(why) if message.starts_with("invalid type: string") => {
                let raw = self.value.as_str().unwrap_or_default();
                format!("`{raw}` is not a TOML value{why}, so it was read as a string: {message}")
            }
            _ => message,
        };
        ConfigError::Key {
            origin: format!("--set {}", self.arg),
            key,
            message,
        }
    }
}

/// The parts of a dotted key as TOML reads it, or `None` when `key` is not one.
fn key_path(key: &str) -> Option<Vec<String>> {
    if key.contains(['\n', '\r']) {
        return None;
    }
    let mut node = toml::from_str::<toml::Table>(&format!("{key} = 0")).ok()?;
    let mut path = Vec::new();
    loop {
        let (name, value) = node.into_iter().next()?;
        path.push(name);
        match value {
            toml::Value::Table(t) if t.len() == 1 => node = t,
            toml::Value::Integer(0) => return Some(path),
            _ => return None,
        }
    }
}

/// Why `raw` is not a TOML value, for the message of a key that wanted one: an integer beyond TOML's
/// range is named as such; otherwise the TOML parser's own reason.
fn why_not_toml(raw: &str, err: &toml::de::Error) -> String {
    let digits = raw.strip_prefix(['+', '-']).unwrap_or(raw);
    if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit() || c == '_') {
        return format!(
            " (an integer beyond TOML's range, {} to {})",
            i64::MIN,
            i64::MAX
        );
    }
    let reason = err.message().trim().replace('\n', "; ");
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

/// The dotted key of a `--set` argument (`"model".n_layer=2` gives `model.n_layer`), for callers that
/// set a key themselves (`--steps`) and must know whether a `--set` sets it too.
pub fn override_key(arg: &str) -> Option<String> {
    Override::parse(arg).ok().map(|o| o.key())
}

/// Each `--set` that a later one of the same key replaced with another value, with that later one (the last
/// is the one in effect, so a wrapper script's `--set` can be overridden by its caller's).
pub(super) fn replaced(sets: &[Override]) -> Vec<(String, String)> {
    sets.iter()
        .enumerate()
        .filter_map(|(i, earlier)| {
            let later = sets[i + 1..]
                .iter()
                .rev()
                .find(|o| o.path == earlier.path && o.value != earlier.value)?;
            Some((earlier.arg.clone(), later.arg.clone()))
        })
        .collect()
}

/// Sets the dotted `key` in `table` (creating sections), as a `--set` does.
pub fn set_key(table: &mut toml::Table, key: &str, value: toml::Value) {
    let parts: Vec<&str> = key.split('.').collect();
    let Some((last, parents)) = parts.split_last() else {
        return;
    };
    let mut node = table;
    for part in parents {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        node = match entry {
            toml::Value::Table(t) => t,
            _ => return,
        };
    }
    node.insert(last.to_string(), value);
}

/// The value at the dotted `key` in `table`, if set.
pub fn get_key<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// Attributes a cross-field error (from `validate`) to the `--set` that caused it: an error about a key that
/// an override set (or about a key under it, or one whose message names it) names that `--set`. The last
/// override of a key is the one in effect, so it is the one named.
pub(super) fn blame_override(
    err: ConfigError,
    sets: &[Override],
) -> Result<ConfigError, ConfigError> {
    let (key, message) = match &err {
        ConfigError::Key { key, message, .. } => (key.as_str(), message.as_str()),
        ConfigError::Invalid { key, message } => (*key, message.as_str()),
        _ => return Err(err),
    };
    let caused = |set: &&Override| {
        let set = set.key();
        set == key
            || under(key, &set).is_some_and(|rest| message.contains(rest.split('.').next().unwrap_or(rest)))
            || under(&set, key).is_some()
            // A cross-field rule: the message names the other key.
            || message.contains(&set)
    };
    match sets.iter().rev().find(caused) {
        Some(set) => Ok(ConfigError::Key {
            origin: format!("--set {}", set.arg),
            key: key.to_string(),
            message: message.to_string(),
        }),
        None => Err(err),
    }
}

/// The rest of `inner` below the section `outer` (`under("optim", "optim.lr") == Some("lr")`).
fn under<'a>(outer: &str, inner: &'a str) -> Option<&'a str> {
    inner
        .strip_prefix(outer)
        .and_then(|rest| rest.strip_prefix('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(t: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
        Override::parse(arg)?.apply(t)
    }

    #[test]
    fn values_parse_as_toml_or_fall_back_to_strings() {
        let mut t = toml::Table::new();
        apply(&mut t, "optim.betas=[0.8, 0.9]").unwrap();
        apply(&mut t, "data.train=/data/x.bin").unwrap();
        apply(&mut t, "data.shuffle=true").unwrap();
        apply(&mut t, "\"model\" . 'n_layer'=2").unwrap();
        assert_eq!(t["optim"]["betas"].as_array().unwrap().len(), 2);
        assert_eq!(t["data"]["train"].as_str(), Some("/data/x.bin"));
        assert_eq!(t["data"]["shuffle"].as_bool(), Some(true));
        assert_eq!(t["model"]["n_layer"].as_integer(), Some(2));
        assert!(apply(&mut t, "data.train.x=1").is_err());
        assert!(apply(&mut t, ".x=1").is_err());
        assert_eq!(
            override_key("\"model\".n_layer=2").as_deref(),
            Some("model.n_layer")
        );
    }

    fn load_err(path: Option<&std::path::Path>, sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        crate::config::Config::load(path, &sets)
            .expect_err("an error")
            .to_string()
    }

    #[test]
    fn errors_from_a_set_name_it() {
        assert_eq!(
            load_err(None, &["model.n_layer=twelve"]),
            "--set model.n_layer=twelve: key `model.n_layer`: invalid type: string \"twelve\", expected usize"
        );
        let e = load_err(None, &["optim.lr=1e-3", "optim.learning_rate=1"]);
        assert!(
            e.starts_with("--set optim.learning_rate=1: key `optim.learning_rate`: unknown field"),
            "{e}"
        );
        // Reported on another key, but caused by this --set.
        assert_eq!(
            load_err(None, &["data.seed=3", "model.n_head=3"]),
            "--set model.n_head=3: key `model.n_embd`: 128 must be a multiple of model.n_head (3)"
        );
        // A rule on the key itself: the last --set of it.
        let e = load_err(None, &["data.seed=3", "optim.lr=1e-3", "optim.min_lr=1e-2"]);
        assert!(
            e.starts_with("--set optim.min_lr=1e-2: key `optim.min_lr`"),
            "{e}"
        );
        // A quoted key is the key it quotes; a misspelt section is the --set's, not the default's.
        let e = load_err(None, &["\"model\".n_layr=2"]);
        assert!(
            e.starts_with(
                "--set \"model\".n_layr=2: key `model.n_layr`: unknown field `n_layr`, expected one of \
                 `arch`, `n_layer`, `n_head`,"
            ),
            "{e}"
        );
        let e = load_err(None, &["mdoel.n_layer=2"]);
        assert!(e.starts_with("--set mdoel.n_layer=2: "), "{e}");
        // A bad value is an error even when a later --set of the key replaces it.
        let e = load_err(None, &["train.steps=1e3", "train.steps=2"]);
        assert!(
            e.starts_with("--set train.steps=1e3: key `train.steps`"),
            "{e}"
        );
        // An integer beyond TOML's range says so, not only that a string is not an integer.
        let e = load_err(None, &["train.steps=99999999999999999999"]);
        assert!(
            e.contains("an integer beyond TOML's range") && e.contains("`train.steps`"),
            "{e}"
        );
        let e = load_err(None, &["optim.betas=[0.9, 0.95"]);
        assert!(e.contains("is not a TOML value ("), "{e}");
        let e = load_err(None, &["model n_layer=2"]);
        assert!(e.contains("`model n_layer` is not a key"), "{e}");
    }

    #[test]
    fn a_replaced_set_is_reported_once() {
        let sets: Vec<String> = [
            "train.steps=5",
            "optim.lr=1e-3",
            "train.steps=7",
            "train.steps=7",
        ]
        .map(String::from)
        .to_vec();
        let c = crate::config::Config::load(None, &sets).expect("loads");
        assert_eq!(c.train.steps, 7);
        assert_eq!(
            c.replaced_sets,
            [("train.steps=5".to_string(), "train.steps=7".to_string())]
        );
    }

    #[test]
    fn errors_from_the_file_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[optim]\nlearning_rate = 1\n[model]\nn_layer = 2\n").unwrap();
        let e = load_err(Some(&path), &["optim.lr=1e-3", "model.n_layer=3"]);
        assert!(
            e.starts_with(&format!("{}: key `optim.learning_rate`", path.display())),
            "{e}"
        );
        std::fs::write(&path, "[model]\nn_head = 3\n").unwrap();
        assert_eq!(
            load_err(Some(&path), &["optim.lr=1e-3"]),
            format!(
                "{}: key `model.n_embd`: 128 must be a multiple of model.n_head (3)",
                path.display()
            )
        );
    }
}
