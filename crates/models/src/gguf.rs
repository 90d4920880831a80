//! Opening a GGUF file safely: candle's reader bounds counts, string and array lengths against
//! the file, and this module adds what it leaves out, before any tensor is read:
//! - `general.alignment` must be a power of two (candle divides by it: 0 would panic);
//! - every tensor's element count and byte size are computed in checked arithmetic, its rows
//!   are whole blocks of its type, and its bytes lie inside the file.
//!
//! So a tensor's size can never overflow or exceed the file, whatever its header claims.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::{Error, Result};

/// The header of an open GGUF file, checked (see the module docs), and its reader.
pub(crate) struct GgufFile {
    pub content: gguf_file::Content,
    pub reader: BufReader<File>,
}

/// Opens and checks `path`.
pub(crate) fn open(path: &Path) -> Result<GgufFile> {
    let io = |e| Error::Io { path: path.display().to_string(), source: e };
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut reader = BufReader::new(file);
    let invalid = |e: String| Error::Format(format!("{} is not a valid GGUF file: {e}", path.display()));
    if let Some(alignment) = alignment(&mut reader, size) {
        if !alignment.is_power_of_two() {
            return Err(invalid(format!("general.alignment is {alignment}, not a power of two")));
        }
    }
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let content = gguf_file::Content::read(&mut reader).map_err(|e| invalid(e.to_string()))?;
    check_tensors(&content, size).map_err(invalid)?;
    Ok(GgufFile { content, reader })
}

/// Each tensor's size, in checked arithmetic, inside a file of `size` bytes.
fn check_tensors(content: &gguf_file::Content, size: u64) -> std::result::Result<(), String> {
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let t = info.ggml_dtype;
        let elems = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        let Some(elems) = elems.filter(|&n| n > 0) else {
            return Err(format!("tensor {name}'s dimensions {dims:?} hold no element or overflow 64 bits"));
        };
        // ggml's rows (the last dimension here) are whole blocks of the type.
        let row = dims.last().copied().unwrap_or(1);
        if !row.is_multiple_of(t.block_size()) {
            return Err(format!("tensor {name}'s rows of {row} are not whole {t:?} blocks of {}", t.block_size()));
        }
        let bytes = (elems / t.block_size() as u64).checked_mul(t.type_size() as u64);
        let end = bytes.and_then(|b| content.tensor_data_offset.checked_add(info.offset)?.checked_add(b));
        match end {
            Some(end) if end <= size => {}
            _ => {
                return Err(format!(
                    "tensor {name} ({dims:?} {t:?}) at offset {} runs past the end of the file ({size} bytes)",
                    info.offset
                ))
            }
        }
    }
    Ok(())
}

/// The last `general.alignment` candle's reader would use (an integer of at most 32 bits; other
/// types are ignored), found by walking the metadata without keeping it. `None` when there is
/// none, or when the header is malformed (candle's reader then says how).
fn alignment<R: Read + Seek>(r: &mut R, size: u64) -> Option<u64> {
    Walk { r, size, v1: false }.alignment().ok().flatten()
}

/// A walk over GGUF metadata; `Err(())` on anything malformed.
struct Walk<'a, R> {
    r: &'a mut R,
    size: u64,
    /// GGUF version 1 (32-bit lengths).
    v1: bool,
}

/// GGUF value types (the spec's numbering).
const STRING: u32 = 8;
const ARRAY: u32 = 9;
/// Nested arrays deeper than this are refused (candle's reader does the same).
const MAX_DEPTH: usize = 64;
const KEY: &[u8] = b"general.alignment";

impl<R: Read + Seek> Walk<'_, R> {
    fn bytes<const N: usize>(&mut self) -> std::result::Result<[u8; N], ()> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| ())?;
        Ok(b)
    }

    fn u32(&mut self) -> std::result::Result<u32, ()> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    /// A length or count: 32 bits in version 1, 64 after.
    fn len(&mut self) -> std::result::Result<u64, ()> {
        if self.v1 {
            Ok(u64::from(self.u32()?))
        } else {
            Ok(u64::from_le_bytes(self.bytes()?))
        }
    }

    fn remaining(&mut self) -> std::result::Result<u64, ()> {
        Ok(self.size.saturating_sub(self.r.stream_position().map_err(|_| ())?))
    }

    /// Skips `n` bytes that must lie inside the file.
    fn skip(&mut self, n: u64) -> std::result::Result<(), ()> {
        if n > self.remaining()? {
            return Err(());
        }
        self.r.seek(SeekFrom::Current(i64::try_from(n).map_err(|_| ())?)).map_err(|_| ())?;
        Ok(())
    }

    fn alignment(&mut self) -> std::result::Result<Option<u64>, ()> {
        if &self.bytes::<4>()? != b"GGUF" {
            return Err(());
        }
        self.v1 = match self.u32()? {
            1 => true,
            2 | 3 => false,
            _ => return Err(()),
        };
        let _tensors = self.len()?;
        let count = self.len()?;
        let mut found = None;
        for _ in 0..count {
            let key_len = self.len()?;
            let is_alignment = if key_len == KEY.len() as u64 {
                let mut key = [0u8; KEY.len()];
                self.r.read_exact(&mut key).map_err(|_| ())?;
                key == KEY
            } else {
                self.skip(key_len)?;
                false
            };
            let ty = self.u32()?;
            if !is_alignment {
                self.skip_value(ty, 0)?;
                continue;
            }
            // The types candle's reader takes an alignment from (the last key wins; a negative
            // or other value means its default).
            found = match ty {
                0 => Some(u64::from(self.bytes::<1>()?[0])),
                1 => u64::try_from(i8::from_le_bytes(self.bytes()?)).ok(),
                2 => Some(u64::from(u16::from_le_bytes(self.bytes()?))),
                3 => u64::try_from(i16::from_le_bytes(self.bytes()?)).ok(),
                4 => Some(u64::from(self.u32()?)),
                5 => u64::try_from(i32::from_le_bytes(self.bytes()?)).ok(),
                _ => {
                    self.skip_value(ty, 0)?;
                    None
                }
            };
        }
        Ok(found)
    }

    fn skip_value(&mut self, ty: u32, depth: usize) -> std::result::Result<(), ()> {
        let fixed = |ty: u32| match ty {
            0 | 1 | 7 => Some(1u64),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match ty {
            STRING => {
                let n = self.len()?;
                self.skip(n)
            }
            ARRAY if depth < MAX_DEPTH => {
                let elem = self.u32()?;
                let n = self.len()?;
                match fixed(elem) {
                    Some(size) => self.skip(n.checked_mul(size).ok_or(())?),
                    None if elem == STRING || elem == ARRAY => {
                        // Each element takes at least a length prefix: a count past what the
                        // file can hold is refused before looping.
                        if n > self.remaining()? / 4 {
                            return Err(());
                        }
                        (0..n).try_for_each(|_| self.skip_value(elem, depth + 1))
                    }
                    None => Err(()),
                }
            }
            ty => self.skip(fixed(ty).ok_or(())?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file::Value, GgmlDType, QTensor};
    use candle_core::{DType, Device, Tensor};

    fn write(path: &Path, alignment: Option<Value>) {
        let t = QTensor::quantize(&Tensor::ones((2, 32), DType::F32, &Device::Cpu).unwrap(), GgmlDType::Q8_0).unwrap();
        let mut md = vec![
            ("general.architecture", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", Value::Array(vec![Value::String("a".into()), Value::String("b".into())])),
        ];
        md.extend(alignment.map(|a| ("general.alignment", a)));
        let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut File::create(path).unwrap(), &md, &[("t.weight", &t)]).unwrap();
    }

    /// The alignment walk finds the value candle's reader would use; 0 (which candle divides
    /// by) is refused, as is a tensor past the end of the file.
    #[test]
    fn alignment_and_tensor_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write(&path, None);
        let f = open(&path).unwrap();
        assert_eq!(f.content.tensor_infos["t.weight"].shape.dims(), [2, 32]);
        let mut r = BufReader::new(File::open(&path).unwrap());
        let size = std::fs::metadata(&path).unwrap().len();
        assert_eq!(alignment(&mut r, size), None);
        write(&path, Some(Value::U32(0)));
        let mut r = BufReader::new(File::open(&path).unwrap());
        assert_eq!(alignment(&mut r, size + 30), Some(0));
        let err = open(&path).err().unwrap().to_string();
        assert!(err.contains("general.alignment is 0"), "{err}");
        // (candle's writer aligns to 32.)
        write(&path, Some(Value::U32(32)));
        open(&path).unwrap();
        // Cut the file inside the tensor's bytes (candle pads each tensor to 32 bytes: 68 -> 96).
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
        let err = open(&path).err().unwrap().to_string();
        assert!(err.contains("runs past the end of the file"), "{err}");
    }
}
