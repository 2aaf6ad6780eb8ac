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
}
