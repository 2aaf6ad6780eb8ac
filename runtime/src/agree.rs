//! Ranks agree on what they train: at start-up every rank exchanges a digest of its effective config and
//! strata's version; when they differ the ranks exchange the configs themselves, and every rank stops
//! with the same message, naming each key that differs and the value on each rank.
//!
//! Compared: every key of the TOML tree (model, data, optim, train, dist, and the sections that join it)
//! and the code version, except [`PER_RANK_KEYS`], which may differ legitimately: only rank 0 writes
//! metrics and weights and logs, and each host sets its own thread count. Paths are compared as written:
//! ranks on several hosts must name their token file and initial weights by the same path.

use crate::config::Config;
use std::collections::BTreeMap;
use strata_collectives::{CommError, Communicator, DType};

/// Keys left out of the comparison (see the module documentation).
pub const PER_RANK_KEYS: [&str; 4] = [
    "train.metrics_file",
    "train.export_to",
    "train.log_every",
    "train.threads",
];
/// The key under which the code version takes part in the comparison.
pub const VERSION_KEY: &str = "strata.version";
/// The largest flattened config exchanged (a config is a few hundred bytes).
pub const AGREE_BYTES_MAX: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum AgreeError {
    #[error("checking that the ranks run the same config: {0}")]
    Comm(#[from] CommError),
    #[error("rank {rank}: the ranks were started with different configs, so none of them trains: {differences}")]
    Mismatch {
        rank: usize,
        /// The keys that differ.
        keys: Vec<String>,
        differences: String,
    },
    #[error("rank {rank}: rank {peer}'s flattened config has {bytes} bytes, more than the {AGREE_BYTES_MAX} exchanged")]
    TooLarge {
        rank: usize,
        peer: usize,
        bytes: usize,
    },
}

fn flatten_into(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_into(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The effective config as `key → value` (TOML values as written), with the version, without the per-rank keys.
pub fn flatten(config: &Config) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    match toml::Value::try_from(config) {
        Ok(value) => flatten_into("", &value, &mut map),
        Err(e) => {
            map.insert("config".into(), format!("<not serializable: {e}>"));
        }
    }
    for key in PER_RANK_KEYS {
        map.remove(key);
    }
    map.insert(VERSION_KEY.into(), env!("CARGO_PKG_VERSION").into());
    map
}

fn encode(map: &BTreeMap<String, String>) -> Vec<u8> {
    map.iter()
        .flat_map(|(k, v)| format!("{k}\t{v}\n").into_bytes())
        .collect()
}

fn decode(bytes: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// FNV-1a, 64 bits: a digest that is the same on every host and build.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// "ranks 0, 2" / "rank 1".
fn ranks_text(ranks: &[usize]) -> String {
    let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
    let noun = if ranks.len() == 1 { "rank" } else { "ranks" };
    format!("{noun} {}", list.join(", "))
}

/// Every key whose value is not the same on all ranks, with the value on each (grouped by value).
pub fn differences(maps: &[BTreeMap<String, String>]) -> Vec<(String, String)> {
    let mut keys: Vec<&String> = maps.iter().flat_map(|m| m.keys()).collect();
    keys.sort_unstable();
    keys.dedup();
    let unset = "(unset)".to_string();
    keys.into_iter()
        .filter_map(|key| {
            let values: Vec<&String> = maps.iter().map(|m| m.get(key).unwrap_or(&unset)).collect();
            if values.iter().all(|v| *v == values[0]) {
                return None;
            }
            let mut groups: Vec<(&String, Vec<usize>)> = Vec::new();
            for (rank, v) in values.iter().enumerate() {
                match groups.iter_mut().find(|(g, _)| g == v) {
                    Some((_, ranks)) => ranks.push(rank),
                    None => groups.push((v, vec![rank])),
                }
            }
            let text: Vec<String> = groups
                .iter()
                .map(|(v, ranks)| format!("{v} on {}", ranks_text(ranks)))
                .collect();
            Some((key.clone(), format!("{key} = {}", text.join(" vs "))))
        })
        .collect()
}

/// Pads to whole 4-byte words (the collectives move f32 words; a gather copies their bytes unchanged).
fn padded(mut bytes: Vec<u8>, len: usize) -> Vec<u8> {
    bytes.resize(len.div_ceil(4) * 4, 0);
    bytes
}

/// Exchanges the config digest and version with every rank; on a difference, exchanges the configs and
/// returns the same error on every rank, naming the keys and the ranks.
pub fn check_ranks_agree(comm: &dyn Communicator, config: &Config) -> Result<(), AgreeError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 1 {
        return Ok(());
    }
    let mine = encode(&flatten(config));
    let mut summary = fnv1a64(&mine).to_le_bytes().to_vec();
    summary.extend_from_slice(&(mine.len() as u64).to_le_bytes());
    let mut all = vec![0u8; summary.len() * world];
    comm.all_gather_bytes(DType::F32, &summary, &mut all)?;
    if all.chunks(summary.len()).all(|s| s == summary.as_slice()) {
        return Ok(());
    }
    let lens: Vec<usize> = all
        .chunks(summary.len())
        .map(|s| {
            let mut len = [0u8; 8];
            len.copy_from_slice(&s[8..16]);
            usize::try_from(u64::from_le_bytes(len)).unwrap_or(usize::MAX)
        })
        .collect();
    // Every rank sees the same lengths, so every rank takes the same branch here.
    if let Some((peer, &bytes)) = lens.iter().enumerate().find(|(_, &n)| n > AGREE_BYTES_MAX) {
        return Err(AgreeError::TooLarge { rank, peer, bytes });
    }
    let slot = lens.iter().copied().max().unwrap_or(0).div_ceil(4) * 4;
    let send = padded(mine, slot);
    let mut recv = vec![0u8; slot * world];
    comm.all_gather_bytes(DType::F32, &send, &mut recv)?;
    let maps: Vec<BTreeMap<String, String>> = recv
        .chunks(slot.max(1))
        .zip(&lens)
        .map(|(bytes, &len)| decode(&bytes[..len.min(bytes.len())]))
        .collect();
    let diffs = differences(&maps);
    let (keys, texts): (Vec<String>, Vec<String>) = if diffs.is_empty() {
        // Same keys and values, different digests: cannot happen unless the encodings differ.
        (vec![], vec!["the digests differ but no key does".into()])
    } else {
        diffs.into_iter().unzip()
    };
    Err(AgreeError::Mismatch {
        rank,
        keys,
        differences: texts.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_has_every_shared_key_and_the_version() {
        let mut config = Config::default();
        config.train.metrics_file = Some("m.jsonl".into());
        let map = flatten(&config);
        assert_eq!(map.get("optim.lr").map(String::as_str), Some("0.003"));
        assert_eq!(map.get("model.n_layer").map(String::as_str), Some("4"));
        assert_eq!(
            map.get("data.train").map(String::as_str),
            Some("\"synthetic\"")
        );
        assert!(map.contains_key(VERSION_KEY));
        assert!(!map.contains_key("train.metrics_file"));
        assert_eq!(decode(&encode(&map)), map);
    }

    #[test]
    fn differences_name_keys_values_and_ranks() {
        let base = flatten(&Config::default());
        let mut other = base.clone();
        other.insert("optim.lr".into(), "0.001".into());
        let diffs = differences(&[base.clone(), other, base]);
        assert_eq!(
            diffs,
            vec![(
                "optim.lr".to_string(),
                "optim.lr = 0.003 on ranks 0, 2 vs 0.001 on rank 1".to_string()
            )]
        );
    }

    #[test]
    fn digest_is_fnv1a() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }
}
