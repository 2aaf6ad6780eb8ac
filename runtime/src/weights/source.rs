//! `model.init_from`, streamed: a safetensors file, or a Hugging Face model directory
//! (`model.safetensors`, or the shards `model.safetensors.index.json` lists).
//!
//! [`WeightSource::open`] maps every file and checks every header up front against the model —
//! each shard of the index present, every tensor found once with its shape and a float dtype,
//! none missing, none unknown — before a byte of data is read. [`WeightSource::read`] then fills
//! any range of a unit's flat buffer from the bytes of exactly those elements, so a rank reads
//! (and holds) only its own part of each unit. What only the data can say — a non-finite value,
//! a tied head's copy that differs — is checked on the part read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::{canonical, header_error, is_buffer, WeightsError};
use crate::model::UnitSpec;

/// A single-file model directory's weights.
pub const SINGLE_FILE: &str = "model.safetensors";
/// A sharded model directory's index of which shard holds each tensor.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The largest index read (a 400B model's is well under 1 MB).
const INDEX_BYTES_MAX: u64 = 64 << 20;

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
}

/// Where one tensor's elements are: its file, the byte offset of its data, its element type, and
/// whether it is stored transposed (`[cols, rows]` on disk for a `[rows, cols]` model tensor).
#[derive(Clone)]
struct Located {
    shard: usize,
    name: String,
    start: usize,
    dtype: Dtype,
    /// `Some(rows)` of the model's `[rows, cols]` shape when transposed on disk.
    transposed: Option<(usize, usize)>,
}

/// A tied tensor's second copy in the files: it must equal the model tensor (unit, tensor).
struct TiedCopy {
    at: Located,
    unit: usize,
    tensor: usize,
    tied_to: String,
}

/// The model's initial weights, checked and mapped, read a part at a time.
pub struct WeightSource {
    shards: Vec<Shard>,
    /// `tensors[u][i]`: where unit u's tensor i is.
    tensors: Vec<Vec<Located>>,
    copies: Vec<TiedCopy>,
    units: Vec<UnitSpec>,
}

impl WeightSource {
    /// Checks the weights at `path` (a file, or a model directory) against `units`; `tied` are
    /// the (name in a file, model tensor) pairs of `Model::tied_names`. Reads only headers.
    pub fn open(
        path: &Path,
        units: &[UnitSpec],
        tied: &[(String, String)],
    ) -> Result<WeightSource, WeightsError> {
        let (files, listed) = files_of(path)?;
        let mut shards = Vec::with_capacity(files.len());
        // Every tensor of every file: (name, shard, its header entry), by name.
        let mut found: BTreeMap<String, (usize, safetensors::tensor::TensorInfo, usize)> =
            BTreeMap::new();
        for file in files {
            let (handle, _) = crate::inputs::open_regular(&file)?;
            // SAFETY: a read-only map of a regular file that strata never writes (outputs may not
            // alias inputs). A file truncated by another program while it is read would raise
            // SIGBUS; token files, read throughout a run, are read with pread instead
            // (data::tokens). Only the header's pages are touched here.
            let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|error| WeightsError::Io {
                path: file.clone(),
                error,
            })?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&map).map_err(|e| header_error(&file, &map, e))?;
            let s = shards.len();
            let mut names: Vec<_> = meta.tensors().into_iter().collect();
            names.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, info) in names {
                if let Some((other, _, _)) = found.get(&name) {
                    let other: &Shard = &shards[*other];
                    return Err(WeightsError::Directory {
                        path: file.clone(),
                        message: format!(
                            "tensor `{name}` is also in {}: a model's files hold each tensor once",
                            other.path.display()
                        ),
                    });
                }
                found.insert(name, (s, info.clone(), 8 + header_len));
            }
            shards.push(Shard { path: file, map });
        }
        // The index lists each tensor in the shard that holds it.
        for (name, file) in &listed {
            let in_shard = found
                .get(name)
                .is_some_and(|(s, _, _)| &shards[*s].path == file);
            if !in_shard {
                return Err(WeightsError::Directory {
                    path: file.clone(),
                    message: format!(
                        "{INDEX_FILE} lists tensor `{name}` in this shard, whose header does not have it"
                    ),
                });
            }
        }
        let mut wanted: HashMap<&str, (usize, usize)> = HashMap::new();
        for (u, unit) in units.iter().enumerate() {
            for (i, t) in unit.tensors.iter().enumerate() {
                wanted.insert(canonical(&t.name), (u, i));
            }
        }
        let mut tensors: Vec<Vec<Option<Located>>> =
            units.iter().map(|u| vec![None; u.tensors.len()]).collect();
        let mut copies = Vec::new();
        for (name, (s, info, data_start)) in found {
            let path = &shards[s].path;
            if is_buffer(&name) {
                continue;
            }
            if !matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                return Err(WeightsError::Dtype {
                    path: path.clone(),
                    name,
                    dtype: format!("{:?}", info.dtype),
                });
            }
            let copy_of = tied
                .iter()
                .find(|(copy, _)| *copy == name && !wanted.contains_key(canonical(copy)));
            let target = match copy_of {
                Some((_, tied_to)) => canonical(tied_to),
                None => canonical(&name),
            };
            let &(u, i) = wanted.get(target).ok_or_else(|| WeightsError::Unknown {
                path: path.clone(),
                name: name.clone(),
            })?;
            let spec = &units[u].tensors[i];
            let transposed = spec.stored_transposed && copy_of.is_none();
            let expected: Vec<usize> = if transposed {
                spec.shape.iter().rev().copied().collect()
            } else {
                spec.shape.clone()
            };
            if info.shape != expected {
                return Err(WeightsError::Shape {
                    path: path.clone(),
                    name,
                    expected,
                    found: info.shape.clone(),
                });
            }
            let at = Located {
                shard: s,
                name: name.clone(),
                start: data_start + info.data_offsets.0,
                dtype: info.dtype,
                transposed: transposed.then(|| (spec.shape[0], spec.shape[1])),
            };
            if let Some((_, tied_to)) = copy_of {
                copies.push(TiedCopy {
                    at,
                    unit: u,
                    tensor: i,
                    tied_to: tied_to.clone(),
                });
                continue;
            }
            if let Some(first) = &tensors[u][i] {
                return Err(WeightsError::Duplicate {
                    path: path.clone(),
                    first: first.name.clone(),
                    second: name,
                });
            }
            tensors[u][i] = Some(at);
        }
        // The first missing tensor in the model's order, by its own name.
        let tensors = tensors
            .into_iter()
            .zip(units)
            .map(|(located, unit)| {
                located
                    .into_iter()
                    .zip(&unit.tensors)
                    .map(|(at, spec)| {
                        at.ok_or_else(|| WeightsError::Missing {
                            path: path.to_path_buf(),
                            name: spec.name.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WeightSource {
            shards,
            tensors,
            copies,
            units: units.to_vec(),
        })
    }

    /// The files read, in the order they were checked.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Elements `range` of unit `u`'s flat buffer (its layout: tensors in order, padding rows and
    /// anything past the unit zero) into `out`, from the bytes of those elements only.
    pub fn read(&self, u: usize, range: Range<usize>, out: &mut [f32]) -> Result<(), WeightsError> {
        out.fill(0.0);
        let unit = &self.units[u];
        for (i, (spec, r)) in unit.tensors.iter().zip(unit.ranges()).enumerate() {
            let lo = range.start.max(r.start);
            let hi = range.end.min(r.start + spec.numel());
            if lo >= hi {
                continue;
            }
            let at = &self.tensors[u][i];
            let dst = &mut out[lo - range.start..hi - range.start];
            self.elements(at, lo - r.start..hi - r.start, dst);
            self.release(at, lo - r.start..hi - r.start);
            if let Some(index) = dst.iter().position(|x| !x.is_finite()) {
                return Err(WeightsError::NonFinite {
                    path: self.shards[at.shard].path.clone(),
                    name: at.name.clone(),
                    index: lo - r.start + index,
                    value: dst[index],
                });
            }
            for copy in self.copies.iter().filter(|c| (c.unit, c.tensor) == (u, i)) {
                let mut theirs = vec![0.0; hi - lo];
                self.elements(&copy.at, lo - r.start..hi - r.start, &mut theirs);
                self.release(&copy.at, lo - r.start..hi - r.start);
                if theirs.as_slice() != &*dst {
                    return Err(WeightsError::UntiedHead {
                        path: self.shards[copy.at.shard].path.clone(),
                        name: copy.at.name.clone(),
                        tied_to: copy.tied_to.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Gives back the mapped pages that held elements `range` of a tensor (all of a transposed
    /// one's, whose elements are strided across it), so that a rank's resident memory does not
    /// grow with the bytes it has read: the kernel keeps them in its page cache, not in this
    /// process. Only advice: a failure is ignored, it costs memory, never bytes.
    fn release(&self, at: &Located, range: Range<usize>) {
        let map = &self.shards[at.shard].map;
        let size = at.dtype.size();
        let bytes = match at.transposed {
            None => at.start + range.start * size..at.start + range.end * size,
            Some((rows, cols)) => at.start..at.start + rows * cols * size,
        };
        let end = bytes.end.min(map.len());
        if bytes.start >= end {
            return;
        }
        // SAFETY: the map is a read-only, shared mapping of a file this process never writes, and
        // no reference into it outlives `elements`: after MADV_DONTNEED the next access faults the
        // same bytes back in from the file.
        let _ = unsafe {
            map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                bytes.start,
                end - bytes.start,
            )
        };
    }

    /// Elements `range` of a tensor in the model's layout, converted to f32.
    fn elements(&self, at: &Located, range: Range<usize>, out: &mut [f32]) {
        let map = &self.shards[at.shard].map;
        let size = at.dtype.size();
        let value = |e: usize| {
            let b = &map[at.start + e * size..at.start + (e + 1) * size];
            match at.dtype {
                Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                Dtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            }
        };
        match at.transposed {
            None => {
                for (o, e) in out.iter_mut().zip(range) {
                    *o = value(e);
                }
            }
            // The model's (row, col) is the file's (col, row).
            Some((rows, cols)) => {
                for (o, e) in out.iter_mut().zip(range) {
                    *o = value((e % cols) * rows + e / cols);
                }
            }
        }
    }
}

/// The files of the weights at `path` and, for a sharded directory, the index's (tensor, shard).
type Listed = Vec<(String, PathBuf)>;

fn files_of(path: &Path) -> Result<(Vec<PathBuf>, Listed), WeightsError> {
    if !path.is_dir() {
        return Ok((vec![path.to_path_buf()], Vec::new()));
    }
    let index = path.join(INDEX_FILE);
    if !index.is_file() {
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Ok((vec![single], Vec::new()));
        }
        return Err(WeightsError::Directory {
            path: path.to_path_buf(),
            message: format!(
                "a model directory has its weights in {SINGLE_FILE} or in the shards {INDEX_FILE} lists; it has neither"
            ),
        });
    }
    let bytes = crate::inputs::read_bounded(&index, INDEX_BYTES_MAX, "a safetensors index")?;
    let format = |message: String| WeightsError::Directory {
        path: index.clone(),
        message,
    };
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format("has no `weight_map` object (tensor name to shard file)".into()))?;
    let mut files = BTreeSet::new();
    let mut listed = Vec::with_capacity(map.len());
    for (name, file) in map {
        let file = file
            .as_str()
            .filter(|f| !f.is_empty() && Path::new(f).file_name() == Some(f.as_ref()))
            .ok_or_else(|| {
                format(format!(
                    "tensor `{name}`: its shard must be a file name in the directory, not {file}"
                ))
            })?;
        let shard = path.join(file);
        if !shard.is_file() {
            return Err(WeightsError::Directory {
                path: shard,
                message: format!(
                    "{INDEX_FILE} lists this shard (for tensor `{name}`), but there is no such file"
                ),
            });
        }
        files.insert(shard.clone());
        listed.push((name.clone(), shard));
    }
    Ok((files.into_iter().collect(), listed))
}

#[cfg(test)]
mod tests {
    use super::WeightSource;
    use crate::model::{Init, TensorSpec, UnitSpec};
    use half::bf16;
    use std::path::Path;

    /// Resident bytes of this process's mappings of `path` (`Rss:` in /proc/self/smaps).
    fn resident(path: &Path) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        let mut ours = false;
        let mut kb = 0;
        for line in smaps.lines() {
            if let Some(rss) = line.strip_prefix("Rss:") {
                if ours {
                    kb += rss
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<usize>()
                        .unwrap();
                }
            } else if !line
                .split_whitespace()
                .next()
                .is_some_and(|w| w.ends_with(':'))
            {
                // A mapping's first line: its addresses, ..., its file.
                ours = line.ends_with(path.to_str().unwrap());
            }
        }
        kb << 10
    }

    #[test]
    fn pages_read_are_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let (rows, cols) = (4096, 2048);
        // bf16 values of a closed form, not zeros (whole zero pages may be shared).
        let value = |e: usize| bf16::from_f32(((e * 7919) % 1999) as f32 / 1999.0 - 0.5);
        let data: Vec<u8> = (0..rows * cols)
            .flat_map(|e| value(e).to_le_bytes())
            .collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![rows, cols], &data)
                .unwrap();
        safetensors::serialize_to_file([("w", view)], &None, &path).unwrap();
        let unit = UnitSpec {
            name: "u".into(),
            tensors: vec![TensorSpec {
                name: "w".into(),
                shape: vec![rows, cols],
                decay: true,
                init: Init::Zeros,
                stored_transposed: false,
                pad_rows: 0,
            }],
        };
        let source = WeightSource::open(&path, &[unit], &[]).unwrap();
        let chunk = 256 << 10;
        let mut out = vec![0.0; chunk];
        let mut most = 0;
        for start in (0..rows * cols).step_by(chunk) {
            source.read(0, start..start + chunk, &mut out).unwrap();
            for (i, &x) in out.iter().enumerate() {
                assert_eq!(x, value(start + i).to_f32(), "element {}", start + i);
            }
            most = most.max(resident(&path));
        }
        // 16 MiB of the file read, no more than the kernel maps around the last read resident
        // (the large folios of its page cache: at most 2 MiB each).
        assert_eq!(data.len(), 16 << 20);
        assert!(most <= 4 << 20, "{most} bytes of the map resident");
    }
}
