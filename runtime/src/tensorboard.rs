//! `train.tensorboard_dir`: scalars in TensorBoard's event-file format, which an unmodified
//! TensorBoard reads (`tensorboard --logdir DIR`).
//!
//! A file `events.out.tfevents.<unix seconds>.<host>.<pid>` is a sequence of TFRecords — u64 length
//! (little-endian), masked CRC32C of those 8 bytes, the data, masked CRC32C of the data — each
//! holding one `tensorflow.Event` protobuf. The first record carries `file_version =
//! "brain.Event:2"`; then one record per step with `wall_time`, `step` and a `summary` of `value
//! { tag, simple_value }`. The few protobuf fields are encoded here by hand (field numbers from
//! tensorflow/core/util/event.proto and tensorflow/core/framework/summary.proto).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum TensorBoardError {
    /// The OS error is the source, not repeated in the message.
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The TFRecord checksum: CRC32C rotated right by 15 bits plus a constant (TensorFlow's
/// `crc32c::Mask`), so that a CRC of data holding CRCs is not trivially related to them.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1; step = 2; file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    key(&mut out, 1, FIXED64);
    out.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut out, 2, VARINT);
    // int64: two's complement as a 64-bit varint.
    varint(&mut out, step as u64);
    body(&mut out);
    out
}

/// The encoded `Event` with a `Summary { repeated Value value = 1 }`, each `Value { string tag =
/// 1; float simple_value = 2 }`.
pub fn scalar_event(wall_time: f64, step: i64, scalars: &[(&str, f32)]) -> Vec<u8> {
    event(wall_time, step, |out| {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            key(&mut v, 2, FIXED32);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(out, 5, &summary);
    })
}

/// The encoded first `Event` of a file: `file_version = "brain.Event:2"`.
pub fn file_version_event(wall_time: f64) -> Vec<u8> {
    event(wall_time, 0, |out| bytes_field(out, 3, b"brain.Event:2"))
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty() && !s.contains('/'))
        .unwrap_or_else(|| "localhost".to_string())
}

/// Writes one run's event file; every `add` is flushed, so TensorBoard sees each step as it ends.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` (with its parents) and a new event file in it.
    pub fn create(dir: &Path) -> Result<EventWriter, TensorBoardError> {
        std::fs::create_dir_all(dir).map_err(|source| TensorBoardError::Io {
            what: "create the TensorBoard directory",
            path: dir.to_path_buf(),
            source,
        })?;
        let wall = now_s();
        let name = format!(
            "events.out.tfevents.{}.{}.{}",
            wall as u64,
            host_name(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = File::create(&path).map_err(|source| TensorBoardError::Io {
            what: "create the TensorBoard event file",
            path: path.clone(),
            source,
        })?;
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        writer.write_record(&file_version_event(wall))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding every `(tag, value)` of `scalars`.
    pub fn add(&mut self, step: u64, scalars: &[(&str, f32)]) -> Result<(), TensorBoardError> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        self.write_record(&scalar_event(now_s(), step, scalars))
    }

    fn write_record(&mut self, data: &[u8]) -> Result<(), TensorBoardError> {
        self.out
            .write_all(&tfrecord(data))
            .and_then(|()| self.out.flush())
            .map_err(|source| TensorBoardError::Io {
                what: "write the TensorBoard event file",
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-encoded from the protobuf wire format: field keys, little-endian fixed fields.
    #[test]
    fn an_event_encodes_as_the_wire_format_says() {
        let bytes = scalar_event(1.5, 3, &[("a", 2.0)]);
        #[rustfmt::skip]
        let expected = [
            0x09, 0, 0, 0, 0, 0, 0, 0xf8, 0x3f, // wall_time (1, fixed64) = 1.5
            0x10, 0x03,                          // step (2, varint) = 3
            0x2a, 0x0a,                          // summary (5, len 10)
            0x0a, 0x08,                          //   value (1, len 8)
            0x0a, 0x01, b'a',                    //     tag (1) = "a"
            0x15, 0, 0, 0, 0x40,                 //     simple_value (2, fixed32) = 2.0
        ];
        assert_eq!(bytes, expected);
        // A step of 300 takes two varint bytes: 300 = 0b10_0101100 → 0xac 0x02.
        let bytes = scalar_event(0.0, 300, &[]);
        assert_eq!(&bytes[9..12], &[0x10, 0xac, 0x02]);
    }

    /// The CRC32C check value of "123456789" (0xe3069283, RFC 3720) and TensorFlow's mask.
    #[test]
    fn records_use_the_masked_crc32c() {
        let expected_check = 0xe306_9283_u32;
        assert_eq!(crc32c::crc32c(b"123456789"), expected_check);
        // The mask as TensorFlow's crc32c.h writes it, not as this module computes it.
        #[allow(clippy::manual_rotate)]
        let masked = ((expected_check >> 15) | (expected_check << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), masked);
        let record = tfrecord(b"xyz");
        assert_eq!(record.len(), 8 + 4 + 3 + 4);
        assert_eq!(&record[..8], &3u64.to_le_bytes());
        assert_eq!(&record[12..15], b"xyz");
    }
}
