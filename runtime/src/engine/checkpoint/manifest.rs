//! A checkpoint's description on disk — the manifest and the rank indexes — and the directory of
//! checkpoints: which saves it holds, which is the newest (`latest`, by sequence number), which
//! retention removes.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::EngineError;
use crate::config::ModelConfig;

pub const FORMAT: &str = "strata-checkpoint";
pub const VERSION: u32 = 2;
/// What a checkpoint's directory name starts with; a save in progress ends with [`TMP_SUFFIX`].
const DIR_PREFIX: &str = "step-";
const TMP_SUFFIX: &str = ".tmp";
/// `manifest.json`, written by rank 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Optimizer steps taken.
    pub step: usize,
    /// This save's place among the saves in its directory: one more than the highest there when it
    /// was written. `latest` and retention go by it.
    pub sequence: u64,
    /// Rows of training data (sequences of `model.seq_len` + 1 tokens) read by all ranks together.
    pub rows: u64,
    /// Rows per optimizer step: `micro_batch_size × grad_accum_steps × world_size`.
    pub global_batch_rows: u64,
    pub micro_batch_size: usize,
    pub grad_accum_steps: usize,
    pub world_size: usize,
    pub zero_stage: u8,
    pub model: ModelConfig,
    pub units: Vec<UnitEntry>,
    /// The loss scaler: its scale and steps since the last change.
    pub loss_scale: f32,
    pub loss_scale_good_steps: u32,
    /// Every rank's index, as the rank wrote it: the checkpoint's rank files are these.
    pub ranks: Vec<RankIndex>,
}

/// One unit as the checkpoint holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitEntry {
    /// Elements of the unit (its layout, padding rows included).
    pub numel: usize,
    /// Elements after padding to world × 64.
    pub padded: usize,
    /// Whether each rank holds only its shard (else every rank holds the whole unit; rank 0's
    /// copy is read).
    pub sharded: bool,
}

/// `rank{r}.json`: where each unit's states are in `rank{r}.bin`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankIndex {
    pub rank: usize,
    /// The step the file was written at.
    pub step: usize,
    pub bytes: u64,
    pub crc32c: u32,
    /// Per unit: (element offset of the part within the padded unit, elements). The file holds,
    /// unit after unit, the part's master weights, m, then v (f32, little-endian).
    pub parts: Vec<(usize, usize)>,
}

/// A checkpoint's files and the error that names them.
pub(super) fn error(path: &Path, message: impl std::fmt::Display) -> EngineError {
    EngineError::Checkpoint(format!("{}: {message}", path.display()))
}

pub(super) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), EngineError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| error(path, e))?;
    let mut f = std::fs::File::create(path).map_err(|e| error(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| error(path, e))?;
    f.sync_all().map_err(|e| error(path, e))
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EngineError> {
    let bytes = crate::inputs::read_bounded(path, 64 << 20, "a checkpoint file")
        .map_err(|e| EngineError::Checkpoint(e.to_string()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| error(path, format!("not a valid checkpoint file: {e}")))
}

pub(super) fn sync_dir(path: &Path) -> Result<(), EngineError> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| error(path, e))
}

/// The name of step `step`'s checkpoint directory.
pub fn dir_name(step: usize) -> String {
    format!("{DIR_PREFIX}{step:08}")
}

/// A complete checkpoint in a directory of checkpoints.
#[derive(Clone, Debug)]
pub struct Saved {
    pub path: PathBuf,
    pub step: usize,
    pub sequence: u64,
}

/// Every complete-looking checkpoint under `root` (`step-N` with a manifest.json; `.tmp` never),
/// with its manifest or the error reading it.
fn scan(root: &Path) -> Vec<(PathBuf, Result<Manifest, EngineError>)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix(DIR_PREFIX)?.parse::<usize>().ok()?;
            let path = e.path();
            path.join("manifest.json")
                .is_file()
                .then(|| (path.clone(), read_manifest(&path)))
        })
        .collect()
}

/// Every checkpoint directory under `root`, complete or not (`step-*`, `.tmp` too).
pub fn dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(DIR_PREFIX))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}

/// The complete checkpoints under `root`, oldest save first; a manifest that cannot be read is an
/// error naming it (which save is the newest cannot be told without it).
pub fn list(root: &Path) -> Result<Vec<Saved>, EngineError> {
    let mut out = scan(root)
        .into_iter()
        .map(|(path, manifest)| {
            manifest.map(|m| Saved {
                path,
                step: m.step,
                sequence: m.sequence,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|s| (s.sequence, s.step));
    Ok(out)
}

/// The newest complete save under `root`.
pub fn latest(root: &Path) -> Result<PathBuf, EngineError> {
    list(root)?.pop().map(|s| s.path).ok_or_else(|| {
        error(
            root,
            "holds no complete checkpoint (step-NNNNNNNN with a manifest.json) to resume from",
        )
    })
}

/// `latest` (the newest complete save under `root`) or a checkpoint directory.
pub fn resolve(which: &str, root: Option<&Path>) -> Result<PathBuf, EngineError> {
    if which != "latest" {
        return Ok(PathBuf::from(which));
    }
    let root = root.ok_or_else(|| {
        EngineError::Checkpoint(
            "--resume latest needs train.checkpoint_dir (where the checkpoints are)".into(),
        )
    })?;
    latest(root)
}

/// The sequence number of the next save under `root`.
pub(super) fn next_sequence(root: &Path) -> u64 {
    scan(root)
        .into_iter()
        .filter_map(|(_, m)| m.ok().map(|m| m.sequence))
        .max()
        .map_or(1, |s| s + 1)
}

/// Removes all but the newest `keep` saves under `root` (0 keeps all). A checkpoint whose manifest
/// cannot be read is left alone. A failure is a warning: the run's own checkpoint is written.
pub fn prune(root: &Path, keep: usize) {
    if keep == 0 {
        return;
    }
    let mut saved: Vec<(u64, usize, PathBuf)> = scan(root)
        .into_iter()
        .filter_map(|(path, m)| m.ok().map(|m| (m.sequence, m.step, path)))
        .collect();
    saved.sort();
    for (_, _, old) in saved.iter().take(saved.len().saturating_sub(keep)) {
        if let Err(e) = std::fs::remove_dir_all(old) {
            tracing::warn!("cannot remove the old checkpoint {}: {e}", old.display());
        }
    }
}

/// Reads and checks `dir/manifest.json`: not a save in progress, this format, a step that agrees
/// with the directory's name and with every rank's index.
pub fn read_manifest(dir: &Path) -> Result<Manifest, EngineError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(TMP_SUFFIX) {
        return Err(error(
            dir,
            "is a save in progress or one a crash interrupted (`.tmp` directories are never read); \
             resume from a complete step-NNNNNNNN",
        ));
    }
    let path = dir.join("manifest.json");
    if !path.is_file() {
        return Err(error(
            dir,
            "is not a checkpoint (no manifest.json): an interrupted save, or another directory",
        ));
    }
    let manifest: Manifest = read_json(&path).map_err(|e| {
        // A manifest of the first format lacks the fields this one reads: say so.
        match read_json::<serde_json::Value>(&path) {
            Ok(v)
                if v["version"]
                    .as_u64()
                    .is_some_and(|v| v != u64::from(VERSION)) =>
            {
                error(
                    &path,
                    format!(
                        "format {} version {}; this strata reads {FORMAT} version {VERSION}",
                        v["format"], v["version"]
                    ),
                )
            }
            _ => e,
        }
    })?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(error(
            &path,
            format!(
                "format {} version {}; this strata reads {FORMAT} version {VERSION}",
                manifest.format, manifest.version
            ),
        ));
    }
    if let Some(named) = name
        .strip_prefix(DIR_PREFIX)
        .and_then(|n| n.parse::<usize>().ok())
    {
        if named != manifest.step {
            return Err(error(
                &path,
                format!(
                    "says step {}, but its directory is named for step {named} (edited, or another checkpoint's)",
                    manifest.step
                ),
            ));
        }
    }
    if manifest.ranks.len() != manifest.world_size
        || manifest.ranks.iter().enumerate().any(|(r, i)| i.rank != r)
    {
        return Err(error(
            &path,
            format!(
                "lists {} rank indexes for a world of {} (edited or damaged)",
                manifest.ranks.len(),
                manifest.world_size
            ),
        ));
    }
    if let Some(index) = manifest.ranks.iter().find(|i| i.step != manifest.step) {
        return Err(error(
            &path,
            format!(
                "says step {}, but rank {}'s file was written at step {} (edited, or another checkpoint's)",
                manifest.step, index.rank, index.step
            ),
        ));
    }
    Ok(manifest)
}
