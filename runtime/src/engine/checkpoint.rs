//! Sharded checkpoints. A checkpoint is a directory `step-NNNNNNNN` in which every rank writes
//! its part of every unit's fp32 master weights and Adam moments (`rank{r}.bin`, with
//! `rank{r}.json`: its layout, step, length and crc32c) and rank 0 a manifest (`manifest.json`:
//! format version, model, world size, stage, units, step, the save's sequence number, the data
//! position in rows and the global batch, the loss scale, and every rank's index). It is written
//! into `step-NNNNNNNN.tmp`, fsynced, then renamed: a crash mid-save leaves the previous checkpoint
//! whole. States stream unit by unit from whatever tier holds them (the device, host memory,
//! NVMe), a piece at a time: where the host tier holds the optimizer states, one sub-group
//! (`offload_optimizer.sub_group_size`) of master weights and moments, else one unit's shard.
//!
//! The manifest ties the checkpoint together: a rank file whose length or crc32c differs from the
//! manifest's entry (another checkpoint's, or damaged), a rank index that is not the manifest's, a
//! step that disagrees with the rank files or the directory's name, and a `.tmp` directory are
//! refused naming the file. `latest` is the save with the highest sequence number (one more than
//! the highest in the directory when it was written), so after a resume from an earlier step the
//! new saves are the latest, whatever their step; retention keeps the newest saves.
//!
//! Loading reads each piece of this rank's shard from the rank files whose parts overlap it (at the
//! same world size and stage, its own file), only the bytes it needs.
//! Any world size, micro-batch size and accumulation whose global batch (rows per step) is the
//! checkpoint's continues at its data position; another global batch is refused naming the keys.

mod manifest;

pub use manifest::{
    dir_name, dirs, latest, list, prune, read_manifest, resolve, Manifest, RankIndex, Saved,
    UnitEntry, FORMAT, VERSION,
};

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::zero::Home;
use super::{Engine, EngineError};
use crate::backend::Queue;
use crate::config::ModelConfig;
use manifest::{error, next_sequence, read_json, sync_dir, write_json};

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

    /// Saves a checkpoint of the current step under `root` (collective: every rank calls it);
    /// `rows` is how many rows of training data all ranks together have read. Returns the
    /// checkpoint's directory.
    pub fn save_checkpoint(&self, root: &Path, rows: u64) -> Result<PathBuf, EngineError> {
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
            self.write_manifest(root, &tmp, rows).and_then(|()| {
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

    /// This rank's file: for each unit, its part's master weights, then m, then v. Written a
    /// piece ([`Engine::pieces`]) at a time, each of the three arrays at its place in the
    /// file, so the host holds one sub-group's states, not the part's.
    fn write_rank_file(&self, dir: &Path) -> Result<(), EngineError> {
        self.dev.synchronize_all()?;
        let rank = self.comm.rank();
        let path = dir.join(format!("rank{rank}.bin"));
        let file = std::fs::File::create(&path).map_err(|e| error(&path, e))?;
        let (mut crc, mut at, mut parts) = (0u32, 0u64, Vec::with_capacity(self.states.len()));
        for u in 0..self.states.len() {
            let range = self.states[u].optimizer_range();
            let array_bytes = 4 * range.len() as u64;
            // The crc32c of each array, in order: the pieces come in order.
            let mut crcs = [0u32; 3];
            for piece in self.pieces(u) {
                let states = self.read_piece_states(u, &piece, true)?;
                let arrays = [&states.master, &states.m, &states.v];
                for (a, (values, crc)) in arrays.into_iter().zip(&mut crcs).enumerate() {
                    let b = le_bytes(values);
                    let place = at + a as u64 * array_bytes + 4 * piece.elements.start as u64;
                    file.write_all_at(b, place)
                        .map_err(|e| error(&path, format!("at byte {place}: {e}")))?;
                    *crc = crc32c::crc32c_append(*crc, b);
                }
            }
            for c in crcs {
                crc = crc32c::crc32c_combine(crc, c, array_bytes as usize);
            }
            at += 3 * array_bytes;
            parts.push((range.start, range.len()));
        }
        let bytes = at;
        file.sync_all().map_err(|e| error(&path, e))?;
        let index = RankIndex {
            rank,
            step: self.step,
            bytes,
            crc32c: crc,
            parts,
        };
        write_json(&dir.join(format!("rank{rank}.json")), &index)
    }

    /// Rows of training data per optimizer step: micro-batch × accumulation × ranks.
    fn global_batch_rows(&self) -> u64 {
        let d = &self.config.data;
        (d.micro_batch_size * d.grad_accum_steps * self.comm.world_size()) as u64
    }

    /// The manifest of the save in `dir` (under `root`), with every rank's index as written there.
    fn write_manifest(&self, root: &Path, dir: &Path, rows: u64) -> Result<(), EngineError> {
        let (scale, good_steps) = self.scaler.state();
        let world_size = self.comm.world_size();
        let ranks = (0..world_size)
            .map(|r| read_json::<RankIndex>(&dir.join(format!("rank{r}.json"))))
            .collect::<Result<Vec<_>, _>>()?;
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            step: self.step,
            sequence: next_sequence(root),
            rows,
            global_batch_rows: self.global_batch_rows(),
            micro_batch_size: self.config.data.micro_batch_size,
            grad_accum_steps: self.config.data.grad_accum_steps,
            world_size,
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
            ranks,
        };
        write_json(&dir.join("manifest.json"), &manifest)?;
        sync_dir(dir)
    }

    /// Refuses a checkpoint whose global batch is not this run's: its data position and its
    /// learning-rate schedule count steps of its own size.
    fn check_batch(&self, dir: &Path, manifest: &Manifest) -> Result<(), EngineError> {
        let d = &self.config.data;
        let world = self.comm.world_size();
        let now = self.global_batch_rows();
        if manifest.global_batch_rows != now {
            return Err(error(
                dir,
                format!(
                    "saved with a global batch of {} rows per step (data.micro_batch_size {} × data.grad_accum_steps {} × {} rank{}), \
                     this run's is {now} (data.micro_batch_size {} × data.grad_accum_steps {} × {world} rank{}); its data position and \
                     learning-rate schedule count steps of {} rows: set data.micro_batch_size, data.grad_accum_steps and the number of \
                     ranks so that their product is {}",
                    manifest.global_batch_rows,
                    manifest.micro_batch_size,
                    manifest.grad_accum_steps,
                    manifest.world_size,
                    if manifest.world_size == 1 { "" } else { "s" },
                    d.micro_batch_size,
                    d.grad_accum_steps,
                    if world == 1 { "" } else { "s" },
                    manifest.global_batch_rows,
                    manifest.global_batch_rows
                ),
            ));
        }
        Ok(())
    }

    /// Loads the checkpoint in `dir` into every state class on its tier, the step, the loss
    /// scale (collective). Returns its manifest: the data position (`rows`) is the caller's, and
    /// continues at micro-batch `rows / data.micro_batch_size` of the data's rule.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<Manifest, EngineError> {
        let manifest = read_manifest(dir)?;
        check_model(dir, &manifest, &self.config.model, &self.states)?;
        self.check_batch(dir, &manifest)?;
        let reader = CheckpointReader::open(dir, &manifest)?;
        self.dev.synchronize_all()?;
        for u in 0..self.states.len() {
            let start = self.states[u].optimizer_range().start;
            for piece in self.pieces(u) {
                let r = &piece.elements;
                let [master, m, v] = reader.part(u, start + r.start, r.len())?;
                self.write_piece_states(u, &piece, &master, Some((&m, &v)))?;
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
    /// Checks every rank file against the manifest — its index the manifest's entry, its length
    /// and crc32c those the entry gives — and opens the checkpoint.
    pub fn open(dir: &Path, manifest: &Manifest) -> Result<CheckpointReader, EngineError> {
        let mut indexes = Vec::with_capacity(manifest.world_size);
        let mut offsets = Vec::with_capacity(manifest.world_size);
        for (r, listed) in manifest.ranks.iter().enumerate() {
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
            if index != *listed {
                return Err(error(
                    &index_path,
                    format!(
                        "is not the index manifest.json lists for rank {r} (step {} and crc32c {:#010x} there, step {} and crc32c {:#010x} here): \
                         a rank file of another checkpoint",
                        listed.step, listed.crc32c, index.step, index.crc32c
                    ),
                ));
            }
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
                        "is {bytes} bytes, manifest.json lists {} (truncated, or replaced by another checkpoint's)",
                        index.bytes
                    ),
                ));
            }
            if crc != index.crc32c {
                return Err(error(
                    &path,
                    format!("checksum mismatch: crc32c {crc:#010x}, manifest.json lists {:#010x} (the file is corrupted, or another checkpoint's)", index.crc32c),
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
    /// unit (beyond the saved unit's elements: zeros), read from the rank files that hold them.
    pub fn part(&self, u: usize, offset: usize, len: usize) -> Result<[Vec<f32>; 3], EngineError> {
        let mut arrays = self.arrays(u, offset, len, 3)?.into_iter();
        let mut next = || arrays.next().unwrap_or_default();
        Ok([next(), next(), next()])
    }

    /// The first `count` of (master, m, v) of unit `u`'s elements `[offset, offset + len)`:
    /// from each rank file whose part overlaps them, only the overlapping bytes.
    fn arrays(
        &self,
        u: usize,
        offset: usize,
        len: usize,
        count: usize,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let entry = &self.units[u];
        let mut out = vec![vec![0.0f32; len]; count];
        let ranks = if entry.sharded {
            0..self.indexes.len()
        } else {
            0..1
        };
        let end = (offset + len).min(entry.numel);
        for r in ranks {
            let (at, n) = self.indexes[r].parts[u];
            let (lo, hi) = (offset.max(at), end.min(at + n));
            if lo >= hi {
                continue;
            }
            let path = self.dir.join(format!("rank{r}.bin"));
            let f = std::fs::File::open(&path).map_err(|e| error(&path, e))?;
            for (a, dst) in out.iter_mut().enumerate() {
                let place = self.offsets[r][u] + 4 * (a * n + lo - at) as u64;
                f.read_exact_at(
                    bytemuck::cast_slice_mut(&mut dst[lo - offset..hi - offset]),
                    place,
                )
                .map_err(|e| error(&path, format!("unit {u}, at byte {place}: {e}")))?;
            }
        }
        Ok(out)
    }

    /// The whole fp32 master weights of unit `u` (its `numel` elements).
    pub fn master(&self, u: usize) -> Result<Vec<f32>, EngineError> {
        let numel = self.units[u].numel;
        Ok(self.arrays(u, 0, numel, 1)?.pop().unwrap_or_default())
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
