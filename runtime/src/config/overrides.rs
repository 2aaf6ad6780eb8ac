//! `--set key.path=value` overrides applied to the TOML tree before it is deserialized.

use super::ConfigError;

/// Sets `key.path` in `table` to `value`, parsed as a TOML value (`0.01`, `true`, `[0.9, 0.95]`, `"text"`);
/// a value that is not valid TOML is taken as a plain string (`data.train=/data/tokens.bin`).
pub fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let err = |message: &str| ConfigError::Override {
        arg: arg.to_string(),
        message: message.to_string(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected key.path=value"))?;
    let parts: Vec<&str> = key.trim().split('.').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err("expected key.path=value with a non-empty key"));
    }
    let value = parse_value(raw.trim());
    let (last, parents) = parts.split_last().ok_or_else(|| err("empty key"))?;
    let mut node = table;
    for part in parents {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(err(&format!("`{part}` is a value, not a section"))),
        };
    }
    node.insert(last.to_string(), value);
    Ok(())
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

/// Attributes a config error about a key the DeepSpeed JSON set (and no `--set` overrode) to
/// its JSON key.
pub fn blame_deepspeed(
    err: ConfigError,
    ds: &super::deepspeed::DeepSpeed,
    overrides: &[String],
) -> ConfigError {
    let key = match &err {
        ConfigError::Key { key, .. } => key.clone(),
        ConfigError::Invalid { key, .. } => key.to_string(),
        _ => return err,
    };
    let overridden = overrides
        .iter()
        .any(|o| o.split('=').next().is_some_and(|k| k.trim() == key));
    match ds.settings.iter().find(|s| s.key == key) {
        Some(s) if !overridden => {
            let message = match err {
                ConfigError::Key { message, .. } | ConfigError::Invalid { message, .. } => message,
                other => return other,
            };
            ConfigError::DeepSpeed {
                origin: ds.origin.clone(),
                json_key: s.from.clone(),
                key,
                message,
            }
        }
        _ => err,
    }
}

/// Attributes a config error to the `--set` that caused it: an error about a key that an override set (or about
/// a key under it, or one whose message names it) names that `--set` instead of the file or the embedded default.
/// The last override of a key is the one in effect, so it is the one named.
pub(super) fn blame_override(err: ConfigError, overrides: &[String]) -> ConfigError {
    let (key, message) = match &err {
        ConfigError::Key { key, message, .. } => (key.as_str(), message.as_str()),
        ConfigError::Invalid { key, message } => (*key, message.as_str()),
        _ => return err,
    };
    let caused = |arg: &&String| {
        let Some((set, _)) = arg.split_once('=') else {
            return false;
        };
        let set = set.trim();
        set == key
            // An unknown key below a known section: the error is about the section and names the key.
            || under(key, set).is_some_and(|rest| message.contains(rest.split('.').next().unwrap_or(rest)))
            || under(set, key).is_some()
            // A cross-field rule: the message names the other key.
            || message.contains(set)
    };
    match overrides.iter().rev().find(caused) {
        Some(arg) => ConfigError::Key {
            origin: format!("--set {arg}"),
            key: key.to_string(),
            message: message.to_string(),
        },
        None => err,
    }
}

/// The rest of `inner` below the section `outer` (`under("optim", "optim.lr") == Some("lr")`).
fn under<'a>(outer: &str, inner: &'a str) -> Option<&'a str> {
    inner
        .strip_prefix(outer)
        .and_then(|rest| rest.strip_prefix('.'))
}

fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_toml_or_fall_back_to_strings() {
        let mut t = toml::Table::new();
        apply_override(&mut t, "optim.betas=[0.8, 0.9]").unwrap();
        apply_override(&mut t, "data.train=/data/x.bin").unwrap();
        apply_override(&mut t, "data.shuffle=true").unwrap();
        assert_eq!(t["optim"]["betas"].as_array().unwrap().len(), 2);
        assert_eq!(t["data"]["train"].as_str(), Some("/data/x.bin"));
        assert_eq!(t["data"]["shuffle"].as_bool(), Some(true));
        assert!(apply_override(&mut t, "data.train.x=1").is_err());
        assert!(apply_override(&mut t, ".x=1").is_err());
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
            "config key `model.n_embd`: 128 must be a multiple of model.n_head (3)"
        );
    }
}
