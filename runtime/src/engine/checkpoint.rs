//! Sharded checkpoints. A checkpoint is a directory `step-NNNNNNNN` in which every rank writes
//! its part of every unit's fp32 master weights and Adam moments (`rank{r}.bin`, with
//! `rank{r}.json`: its layout, length and crc32c) and rank 0 a manifest (`manifest.json`: format
//! version, model, world size, stage, units, step, data position, loss scale). It is written into
//! `step-NNNNNNNN.tmp`, fsynced, then renamed: a crash mid-save leaves the previous checkpoint
//! whole. States stream unit by unit from whatever tier holds them (the device, host memory,
//! NVMe), so the host never holds more than one unit's shard.
//!
//! Loading at the same world size and stage reads this rank's own file; at another, each unit is
//! rebuilt from every rank file of the checkpoint (one unit at a time) and cut to the new shard.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::host_tier::OptimStates;
use super::zero::Home;
use super::{Engine, EngineError};
use crate::backend::Queue;
use crate::config::ModelConfig;

pub const FORMAT: &str = "strata-checkpoint";
pub const VERSION: u32 = 1;

/// `manifest.json`, written by rank 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Optimizer steps taken.
    pub step: usize,
    /// Micro-batches read from the training data by all ranks together.
    pub micro_batches: u64,
    pub world_size: usize,
    pub zero_stage: u8,
    pub model: ModelConfig,
    pub units: Vec<UnitEntry>,
    /// The loss scaler: its scale and steps since the last change.
    pub loss_scale: f32,
    pub loss_scale_good_steps: u32,
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
    pub bytes: u64,
    pub crc32c: u32,
    /// Per unit: (element offset of the part within the padded unit, elements). The file holds,
    /// unit after unit, the part's master weights, m, then v (f32, little-endian).
    pub parts: Vec<(usize, usize)>,
}

/// A checkpoint's files and the error that names them.
fn error(path: &Path, message: impl std::fmt::Display) -> EngineError {
    EngineError::Checkpoint(format!("{}: {message}", path.display()))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), EngineError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| error(path, e))?;
    let mut f = std::fs::File::create(path).map_err(|e| error(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| error(path, e))?;
    f.sync_all().map_err(|e| error(path, e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EngineError> {
    let bytes = crate::inputs::read_bounded(path, 64 << 20, "a checkpoint file")
        .map_err(|e| EngineError::Checkpoint(e.to_string()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| error(path, format!("not a valid checkpoint file: {e}")))
}

fn sync_dir(path: &Path) -> Result<(), EngineError> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| error(path, e))
}

/// The name of step `step`'s checkpoint directory.
pub fn dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// The complete checkpoints under `root` (a manifest present), oldest first.
pub fn list(root: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(usize, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            let path = e.path();
            path.join("manifest.json").is_file().then_some((step, path))
        })
        .collect();
    out.sort();
    out
}

/// `latest` (the newest complete checkpoint under `root`) or a checkpoint directory.
pub fn resolve(which: &str, root: Option<&Path>) -> Result<PathBuf, EngineError> {
    if which != "latest" {
        return Ok(PathBuf::from(which));
    }
    let root = root.ok_or_else(|| {
        EngineError::Checkpoint(
            "--resume latest needs train.checkpoint_dir (where the checkpoints are)".into(),
        )
    })?;
    list(root).pop().map(|(_, p)| p).ok_or_else(|| {
        error(
            root,
            "holds no complete checkpoint (step-NNNNNNNN with a manifest.json) to resume from",
        )
    })
}

/// f32 slice as little-endian bytes.
fn le_bytes(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

impl Engine {
    /// The ranks meet (a host all-reduce), each saying whether it succeeded; an error on any
    /// rank is an error on every rank.
    fn meet(&self, ok: bool, what: &str) -> Result<(), EngineError> {
        let mut flag = [f32::from(u8::from(!ok))];
        if self.comm.world_size() > 1 {
            self.dev.synchronize(Queue::Comm)?;
            self.comm.all_reduce(&mut flag)?;
        }
        if flag[0] > 0.0 && ok {
            return Err(EngineError::Checkpoint(format!(
                "{what} failed on another rank"
            )));
        }
        Ok(())
    }

    /// This rank's part of unit `u`: its offset in the padded unit, and its states.
    fn unit_states(&self, u: usize) -> Result<(usize, OptimStates), EngineError> {
        let s = &self.states[u];
        let (offset, len) = match s.placement.optimizer {
            Home::Whole => (0, s.shard.padded),
            Home::Sharded => (s.shard.range().start, s.shard.len),
        };
        let dev = self.device();
        let states = match (&s.optim, &self.host) {
            (Some(o), _) => OptimStates {
                master: dev.read_f32(&o.master)?,
                m: dev.read_f32(&o.adam_m)?,
                v: dev.read_f32(&o.adam_v)?,
            },
            (None, Some(tier)) => tier.read_states(dev, u, len, true)?,
            (None, None) => return Err(super::host::no_optimizer(u)),
        };
        Ok((offset, states))
    }

    /// Saves a checkpoint of the current step under `root` (collective: every rank calls it);
    /// `micro_batches` is how many micro-batches all ranks together have read. Returns the
    /// checkpoint's directory.
    pub fn save_checkpoint(&self, root: &Path, micro_batches: u64) -> Result<PathBuf, EngineError> {
        let final_dir = root.join(dir_name(self.step));
        let tmp = root.join(format!("{}.tmp", dir_name(self.step)));
        let rank = self.comm.rank();
        // Rank 0 makes the temporary directory (a leftover of a crash is replaced).
        let made = if rank == 0 {
            std::fs::create_dir_all(root)
                .map_err(|e| error(root, e))
                .and_then(|()| match std::fs::remove_dir_all(&tmp) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(error(&tmp, e)),
                    _ => std::fs::create_dir(&tmp).map_err(|e| error(&tmp, e)),
                })
        } else {
            Ok(())
        };
        self.meet(made.is_ok(), "making the checkpoint directory")?;
        made?;
        let written = self.write_rank_file(&tmp);
        self.meet(written.is_ok(), "writing a rank file")?;
        written?;
        let committed = if rank == 0 {
            self.write_manifest(&tmp, micro_batches).and_then(|()| {
                if final_dir.exists() {
                    std::fs::remove_dir_all(&final_dir).map_err(|e| error(&final_dir, e))?;
                }
                std::fs::rename(&tmp, &final_dir).map_err(|e| error(&tmp, e))?;
                sync_dir(root)
            })
        } else {
            Ok(())
        };
        self.meet(committed.is_ok(), "committing the checkpoint")?;
        committed?;
        Ok(final_dir)
    }

    fn write_rank_file(&self, dir: &Path) -> Result<(), EngineError> {
        self.dev.synchronize_all()?;
        let rank = self.comm.rank();
        let path = dir.join(format!("rank{rank}.bin"));
        let file = std::fs::File::create(&path).map_err(|e| error(&path, e))?;
        let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
        let (mut crc, mut bytes, mut parts) = (0u32, 0u64, Vec::with_capacity(self.states.len()));
        for u in 0..self.states.len() {
            let (offset, states) = self.unit_states(u)?;
            for values in [&states.master, &states.m, &states.v] {
                let b = le_bytes(values);
                out.write_all(b).map_err(|e| error(&path, e))?;
                crc = crc32c::crc32c_append(crc, b);
                bytes += b.len() as u64;
            }
            parts.push((offset, states.master.len()));
        }
        let file = out.into_inner().map_err(|e| error(&path, e.error()))?;
        file.sync_all().map_err(|e| error(&path, e))?;
        let index = RankIndex {
            rank,
            bytes,
            crc32c: crc,
            parts,
        };
        write_json(&dir.join(format!("rank{rank}.json")), &index)
    }

    fn write_manifest(&self, dir: &Path, micro_batches: u64) -> Result<(), EngineError> {
        let (scale, good_steps) = self.scaler.state();
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            step: self.step,
            micro_batches,
            world_size: self.comm.world_size(),
            zero_stage: self.config.zero.stage,
            model: ModelConfig {
                init_from: None,
                ..self.config.model.clone()
            },
            units: self
                .states
                .iter()
                .map(|s| UnitEntry {
                    numel: s.shard.numel,
                    padded: s.shard.padded,
                    sharded: s.placement.optimizer == Home::Sharded,
                })
                .collect(),
            loss_scale: scale,
            loss_scale_good_steps: good_steps,
        };
        write_json(&dir.join("manifest.json"), &manifest)?;
        sync_dir(dir)
    }

    /// Loads the checkpoint in `dir` into every state class on its tier, the step, the loss
    /// scale (collective). Returns its manifest (the data position is the caller's).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<Manifest, EngineError> {
        let manifest = read_manifest(dir)?;
        check_model(dir, &manifest, &self.config.model, &self.states)?;
        let reader = CheckpointReader::open(dir, &manifest)?;
        self.dev.synchronize_all()?;
        let dev = std::sync::Arc::clone(&self.dev);
        let same_layout = manifest.world_size == self.comm.world_size();
        for u in 0..self.states.len() {
            let s = &self.states[u];
            let (offset, len) = match s.placement.optimizer {
                Home::Whole => (0, s.shard.padded),
                Home::Sharded => (s.shard.range().start, s.shard.len),
            };
            let [master, m, v] =
                reader.part(u, offset, len, same_layout.then_some(self.comm.rank()))?;
            match (&s.optim, self.host.as_mut()) {
                (Some(o), _) => {
                    dev.upload(&o.master, &master)?;
                    dev.upload(&o.adam_m, &m)?;
                    dev.upload(&o.adam_v, &v)?;
                    let copy = s.params_shard.as_ref().or(s.params.as_ref());
                    if let Some(copy) = copy.filter(|c| !c.same_range(&o.master)) {
                        dev.cast_f32_to_x(copy, &o.master)?;
                    }
                }
                (None, Some(tier)) => tier.init_unit(
                    dev.as_ref(),
                    u,
                    &master,
                    Some((&m, &v)),
                    s.params_shard.as_ref(),
                )?,
                (None, None) => return Err(super::host::no_optimizer(u)),
            }
        }
        self.gather_whole_params()?;
        self.dev.synchronize_all()?;
        self.step = manifest.step;
        self.scaler
            .restore(manifest.loss_scale, manifest.loss_scale_good_steps);
        Ok(manifest)
    }
}

/// Reads and checks `dir/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, EngineError> {
    let path = dir.join("manifest.json");
    if !path.is_file() {
        return Err(error(
            dir,
            "is not a checkpoint (no manifest.json): an interrupted save, or another directory",
        ));
    }
    let manifest: Manifest = read_json(&path)?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(error(
            &path,
            format!(
                "format {} version {}; this strata reads {FORMAT} version {VERSION}",
                manifest.format, manifest.version
            ),
        ));
    }
    Ok(manifest)
}

/// The checkpoint's model must be this model: the same shape keys and units.
fn check_model(
    dir: &Path,
    manifest: &Manifest,
    model: &ModelConfig,
    states: &[super::UnitState],
) -> Result<(), EngineError> {
    let path = dir.join("manifest.json");
    let saved = manifest.model.shape_keys();
    for (key, now) in model.shape_keys() {
        let there = saved
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str());
        if there != Some(now.as_str()) {
            return Err(error(
                &path,
                format!(
                    "a checkpoint of another model: {key} is {} there, {now} in this config",
                    there.unwrap_or("absent")
                ),
            ));
        }
    }
    if manifest.units.len() != states.len()
        || manifest
            .units
            .iter()
            .zip(states)
            .any(|(e, s)| e.numel != s.shard.numel)
    {
        return Err(error(&path, "its units do not match this model's layout"));
    }
    Ok(())
}

/// The rank files of a checkpoint, checked against their indexes.
pub struct CheckpointReader {
    dir: PathBuf,
    units: Vec<UnitEntry>,
    indexes: Vec<RankIndex>,
    /// Byte offset of each unit's part in each rank file.
    offsets: Vec<Vec<u64>>,
}

impl CheckpointReader {
    /// Opens every rank file's index and checks each file's length and crc32c.
    pub fn open(dir: &Path, manifest: &Manifest) -> Result<CheckpointReader, EngineError> {
        let mut indexes = Vec::with_capacity(manifest.world_size);
        let mut offsets = Vec::with_capacity(manifest.world_size);
        for r in 0..manifest.world_size {
            let index_path = dir.join(format!("rank{r}.json"));
            if !index_path.is_file() {
                return Err(error(
                    &index_path,
                    format!(
                        "missing: the checkpoint was saved by {} ranks",
                        manifest.world_size
                    ),
                ));
            }
            let index: RankIndex = read_json(&index_path)?;
            if index.parts.len() != manifest.units.len() {
                return Err(error(
                    &index_path,
                    "lists another number of units than the manifest",
                ));
            }
            let path = dir.join(format!("rank{r}.bin"));
            let (bytes, crc) = crc_of(&path)?;
            if bytes != index.bytes {
                return Err(error(
                    &path,
                    format!(
                        "is {bytes} bytes, {} were written (truncated or replaced)",
                        index.bytes
                    ),
                ));
            }
            if crc != index.crc32c {
                return Err(error(
                    &path,
                    format!("checksum mismatch: crc32c {crc:#010x}, {:#010x} was written (the file is corrupted)", index.crc32c),
                ));
            }
            let mut at = 0u64;
            offsets.push(
                index
                    .parts
                    .iter()
                    .map(|&(_, len)| {
                        let here = at;
                        at += 12 * len as u64;
                        here
                    })
                    .collect(),
            );
            indexes.push(index);
        }
        Ok(CheckpointReader {
            dir: dir.to_path_buf(),
            units: manifest.units.clone(),
            indexes,
            offsets,
        })
    }

    /// Master weights, m and v of unit `u`'s elements `[offset, offset + len)` of the padded
    /// unit (beyond the saved unit's elements: zeros). `own`: this rank's file holds exactly
    /// that part (same layout), else the unit is rebuilt from every rank's part.
    pub fn part(
        &self,
        u: usize,
        offset: usize,
        len: usize,
        own: Option<usize>,
    ) -> Result<[Vec<f32>; 3], EngineError> {
        let mut arrays = self.arrays(u, offset, len, own, 3)?.into_iter();
        let mut next = || arrays.next().unwrap_or_default();
        Ok([next(), next(), next()])
    }

    /// The first `count` of (master, m, v) of unit `u`'s elements `[offset, offset + len)`.
    fn arrays(
        &self,
        u: usize,
        offset: usize,
        len: usize,
        own: Option<usize>,
        count: usize,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        if let Some(r) = own {
            if self.indexes[r].parts[u] == (offset, len) {
                return self.read_part(r, u, count);
            }
        }
        let entry = &self.units[u];
        let mut whole = vec![vec![0.0f32; entry.padded]; count];
        let ranks: Vec<usize> = if entry.sharded {
            (0..self.indexes.len()).collect()
        } else {
            vec![0]
        };
        for r in ranks {
            let (at, n) = self.indexes[r].parts[u];
            for (dst, src) in whole.iter_mut().zip(self.read_part(r, u, count)?) {
                dst[at..at + n].copy_from_slice(&src);
            }
        }
        Ok(whole
            .into_iter()
            .map(|w| {
                let mut out = vec![0.0f32; len];
                let end = (offset + len).min(entry.numel);
                if offset < end {
                    out[..end - offset].copy_from_slice(&w[offset..end]);
                }
                out
            })
            .collect())
    }

    /// The first `count` arrays of rank `r`'s part of unit `u`.
    fn read_part(&self, r: usize, u: usize, count: usize) -> Result<Vec<Vec<f32>>, EngineError> {
        let path = self.dir.join(format!("rank{r}.bin"));
        let (_, n) = self.indexes[r].parts[u];
        let mut f = std::fs::File::open(&path).map_err(|e| error(&path, e))?;
        f.seek(SeekFrom::Start(self.offsets[r][u]))
            .map_err(|e| error(&path, e))?;
        (0..count)
            .map(|_| {
                let mut v = vec![0.0f32; n];
                f.read_exact(bytemuck::cast_slice_mut(&mut v))
                    .map_err(|e| error(&path, format!("unit {u}: {e}")))?;
                Ok(v)
            })
            .collect()
    }

    /// The whole fp32 master weights of unit `u` (its `numel` elements).
    pub fn master(&self, u: usize) -> Result<Vec<f32>, EngineError> {
        let numel = self.units[u].numel;
        Ok(self.arrays(u, 0, numel, None, 1)?.pop().unwrap_or_default())
    }

    /// The checkpoint's units.
    pub fn units(&self) -> &[UnitEntry] {
        &self.units
    }
}

/// A file's length and crc32c, read in 8 MiB pieces.
fn crc_of(path: &Path) -> Result<(u64, u32), EngineError> {
    let mut f =
        std::fs::File::open(path).map_err(|e| error(path, format!("cannot be read: {e}")))?;
    let mut buf = vec![0u8; 8 << 20];
    let (mut crc, mut bytes) = (0u32, 0u64);
    loop {
        let n = f.read(&mut buf).map_err(|e| error(path, e))?;
        if n == 0 {
            return Ok((bytes, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        bytes += n as u64;
    }
}
