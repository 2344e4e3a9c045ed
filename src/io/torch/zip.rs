//! The zip container of `torch.save` (PyTorch ≥ 1.6): its central directory, read from a mapped
//! file. PyTorch writes every entry stored (uncompressed), its data 64-byte aligned, with zip64
//! records past 4 GiB (an SD v1 `.ckpt` with EMA weights is 7.7 GB); a stored entry is a slice of
//! the map, so tensors are read in place. A deflated entry (a file re-zipped by another tool) is
//! inflated into memory. Everything read from the file is bounds-checked against the map: a
//! truncated or hostile directory is an error, never a panic or an out-of-range read.

use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::io::Read;

const EOCD: u32 = 0x0605_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_EOCD: u32 = 0x0606_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const LOCAL: u32 = 0x0403_4b50;

/// One entry of the central directory.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    /// 0: stored, 8: deflated.
    method: u16,
    compressed: u64,
    pub size: u64,
    local_header: u64,
}

/// Little-endian reads at an offset, bounds-checked.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn get(&self, at: u64, n: usize) -> Result<&'a [u8]> {
        let at = usize::try_from(at).ok().filter(|&a| a.checked_add(n).is_some_and(|e| e <= self.0.len()));
        at.map(|a| &self.0[a..a + n]).context("a zip record points past the end of the file (truncated?)")
    }
    fn u16(&self, at: u64) -> Result<u16> {
        Ok(u16::from_le_bytes(self.get(at, 2)?.try_into().unwrap()))
    }
    fn u32(&self, at: u64) -> Result<u32> {
        Ok(u32::from_le_bytes(self.get(at, 4)?.try_into().unwrap()))
    }
    fn u64(&self, at: u64) -> Result<u64> {
        Ok(u64::from_le_bytes(self.get(at, 8)?.try_into().unwrap()))
    }
}

/// The central directory of the zip archive `data` (the whole file).
pub fn entries(data: &[u8]) -> Result<Vec<Entry>> {
    let b = Bytes(data);
    // The end-of-central-directory record: 22 bytes plus a comment of up to 64 KiB, at the end.
    let lo = data.len().saturating_sub(22 + 65535);
    let eocd = (lo..data.len().saturating_sub(21))
        .rev()
        .find(|&i| data[i..i + 4] == EOCD.to_le_bytes())
        .context("no zip end-of-directory record: not a zip archive, or truncated")? as u64;
    let mut count = b.u16(eocd + 10)? as u64;
    let mut dir_size = b.u32(eocd + 12)? as u64;
    let mut dir_offset = b.u32(eocd + 16)? as u64;
    // Zip64: a locator just before the record points at the 64-bit record.
    if eocd >= 20 && b.u32(eocd - 20)? == ZIP64_LOCATOR {
        let z = b.u64(eocd - 20 + 8)?;
        if b.u32(z)? != ZIP64_EOCD {
            bail!("the zip64 locator points at no zip64 end-of-directory record");
        }
        count = b.u64(z + 32)?;
        dir_size = b.u64(z + 40)?;
        dir_offset = b.u64(z + 48)?;
    }
    b.get(dir_offset, usize::try_from(dir_size).unwrap_or(usize::MAX)).context("the zip central directory")?;
    // Each central record is at least 46 bytes: a count beyond that is corrupt, not a huge
    // allocation.
    if count > dir_size / 46 + 1 {
        bail!("the zip directory claims {count} entries in {dir_size} bytes");
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut at = dir_offset;
    for _ in 0..count {
        if b.u32(at)? != CENTRAL {
            bail!("zip central directory record {} is damaged", out.len());
        }
        let method = b.u16(at + 10)?;
        let mut compressed = b.u32(at + 20)? as u64;
        let mut size = b.u32(at + 24)? as u64;
        let (name_len, extra_len, comment_len) =
            (b.u16(at + 28)? as u64, b.u16(at + 30)? as u64, b.u16(at + 32)? as u64);
        let mut local_header = b.u32(at + 42)? as u64;
        let name = String::from_utf8_lossy(b.get(at + 46, name_len as usize)?).into_owned();
        // The zip64 extra field holds, in order, the fields whose 32-bit value is all ones.
        let mut e = at + 46 + name_len;
        let extra_end = e + extra_len;
        while e + 4 <= extra_end {
            let (id, len) = (b.u16(e)?, b.u16(e + 2)? as u64);
            if id == 1 {
                let mut f = e + 4;
                for field in [&mut size, &mut compressed, &mut local_header] {
                    if *field == u32::MAX as u64 && f + 8 <= e + 4 + len {
                        *field = b.u64(f)?;
                        f += 8;
                    }
                }
            }
            e += 4 + len;
        }
        out.push(Entry { name, method, compressed, size, local_header });
        at = extra_end + comment_len;
    }
    Ok(out)
}

/// The bytes of `entry`: a slice of `data` when stored, inflated when deflated.
pub fn read<'a>(data: &'a [u8], entry: &Entry) -> Result<Cow<'a, [u8]>> {
    let b = Bytes(data);
    let at = entry.local_header;
    if b.u32(at)? != LOCAL {
        bail!("zip entry '{}': its local header is damaged", entry.name);
    }
    // The local header's name and extra lengths can differ from the central record's.
    let start = at + 30 + b.u16(at + 26)? as u64 + b.u16(at + 28)? as u64;
    let n = usize::try_from(entry.compressed).context("entry too large")?;
    let raw = b.get(start, n).with_context(|| format!("zip entry '{}'", entry.name))?;
    match entry.method {
        0 => {
            if entry.size != entry.compressed {
                bail!("zip entry '{}' is stored with two different sizes", entry.name);
            }
            Ok(Cow::Borrowed(raw))
        }
        8 => {
            // Deflate expands at most 1032:1: a larger claimed size is a damaged directory.
            if entry.size > entry.compressed.saturating_mul(1032) {
                bail!("zip entry '{}' claims {} bytes from {} compressed", entry.name, entry.size, entry.compressed);
            }
            let mut out = Vec::with_capacity(usize::try_from(entry.size).context("entry too large")?);
            flate2::read::DeflateDecoder::new(raw)
                .take(entry.size)
                .read_to_end(&mut out)
                .with_context(|| format!("zip entry '{}': cannot inflate", entry.name))?;
            if out.len() as u64 != entry.size {
                bail!("zip entry '{}' inflates to {} bytes, not {}", entry.name, out.len(), entry.size);
            }
            Ok(Cow::Owned(out))
        }
        m => bail!("zip entry '{}' uses compression method {m}; only stored (0) and deflate (8) are read", entry.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored-entries archive written by hand as a zip64 writer lays it out past 4 GiB: the
    /// 32-bit sizes and offset all ones in the central record, the real values in its zip64 extra
    /// field, and the counts in the zip64 end record (APPNOTE 4.3.14, 4.5.3).
    fn zip64_archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let offset = out.len() as u64;
            out.extend(LOCAL.to_le_bytes());
            out.extend([45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method 0, time, date, crc
            out.extend(u32::MAX.to_le_bytes()); // sizes in the extra field
            out.extend(u32::MAX.to_le_bytes());
            out.extend((name.len() as u16).to_le_bytes());
            out.extend(20u16.to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(1u16.to_le_bytes());
            out.extend(16u16.to_le_bytes());
            out.extend((data.len() as u64).to_le_bytes());
            out.extend((data.len() as u64).to_le_bytes());
            out.extend(*data);
            central.extend(CENTRAL.to_le_bytes());
            central.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend(u32::MAX.to_le_bytes());
            central.extend(u32::MAX.to_le_bytes());
            central.extend((name.len() as u16).to_le_bytes());
            central.extend(28u16.to_le_bytes());
            central.extend([0u8; 6]); // comment length, disk, internal attributes
            central.extend([0u8; 4]); // external attributes
            central.extend(u32::MAX.to_le_bytes());
            central.extend(name.as_bytes());
            central.extend(1u16.to_le_bytes());
            central.extend(24u16.to_le_bytes());
            central.extend((data.len() as u64).to_le_bytes());
            central.extend((data.len() as u64).to_le_bytes());
            central.extend(offset.to_le_bytes());
        }
        let dir_offset = out.len() as u64;
        out.extend(&central);
        let z64 = out.len() as u64;
        out.extend(ZIP64_EOCD.to_le_bytes());
        out.extend(44u64.to_le_bytes());
        out.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend((entries.len() as u64).to_le_bytes());
        out.extend((entries.len() as u64).to_le_bytes());
        out.extend((central.len() as u64).to_le_bytes());
        out.extend(dir_offset.to_le_bytes());
        out.extend(ZIP64_LOCATOR.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(z64.to_le_bytes());
        out.extend(1u32.to_le_bytes());
        out.extend(EOCD.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend([0xff; 16]); // counts, size, offset: all in the zip64 record
        out.extend([0u8; 2]);
        out
    }

    #[test]
    fn zip64_records_are_followed() {
        let archive = zip64_archive(&[("a/data.pkl", b"pickle"), ("a/data/0", &[1, 2, 3, 4, 5])]);
        let e = entries(&archive).unwrap();
        assert_eq!(e.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["a/data.pkl", "a/data/0"]);
        assert_eq!(read(&archive, &e[1]).unwrap().as_ref(), [1, 2, 3, 4, 5]);
        assert_eq!(read(&archive, &e[0]).unwrap().as_ref(), b"pickle");
        // The same archive cut short is refused, not misread.
        assert!(entries(&archive[..archive.len() - 30]).is_err());
    }
}
