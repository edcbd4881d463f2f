//! Streaming, safe unpacking of a package into a staging directory — and the same walk
//! without writing, which is how `verify` checks every file.
//!
//! **Invariant: nothing is ever written outside the staging directory.** Entry paths are
//! normalised lexically and refused when absolute or climbing with `..`; symbolic links
//! are created only after every file has been written (so no file can be written through
//! one) and only when they resolve inside the staging directory; hard links may only name
//! a file already unpacked there; device nodes, fifos and sparse files are refused; total
//! size, entry count, single-file size and expansion ratio are bounded while reading, so
//! a decompression bomb stops at the limit instead of filling the disk. The archive is read
//! once, as a stream: memory does not grow with the package.

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tar::EntryType;

use crate::PackageError;
use crate::manifest::{MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest};

/// Bounds on what an archive may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of all files once unpacked.
    pub max_unpacked: u64,
    /// Number of entries.
    pub max_entries: u64,
    /// Bytes of one file.
    pub max_file: u64,
    /// Unpacked bytes per compressed byte (checked once more than a megabyte came out).
    pub max_ratio: u64,
}

impl Default for Limits {
    /// 4 GiB unpacked, 1,000,000 entries, 2 GiB per file, ratio 200 (text compresses ~5–10×;
    /// a bomb thousands of times).
    fn default() -> Limits {
        Limits {
            max_unpacked: 4 << 30,
            max_entries: 1_000_000,
            max_file: 2 << 30,
            max_ratio: 200,
        }
    }
}

/// What the archive is expected to be.
#[derive(Debug, Clone, Copy)]
pub enum Expect<'a> {
    /// A lockstep package: the manifest first, every file listed with its checksum; when
    /// a manifest is given, the archive's must equal it.
    Manifest(Option<&'a Manifest>),
    /// A manifest-less tar.gz (the source system's `./bin/x` packages): only the safety
    /// rules apply.
    Legacy,
}

/// What an unpack (or check) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// The manifest, for a lockstep package.
    pub manifest: Option<Manifest>,
    /// Regular files written (or checked).
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
}

/// Normalises an archive path: `./a//b/` → `a/b`. `None` for an absolute path, a `..`
/// component, a NUL, or nothing left.
pub fn normalise(path: &str) -> Option<String> {
    if path.starts_with('/') || path.contains('\0') {
        return None;
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Whether a symlink at `link` (normalised) pointing to `target` stays inside the root,
/// judged lexically.
pub(crate) fn link_target_inside(link: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    let mut depth: Vec<&str> = link.split('/').collect();
    depth.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            c => depth.push(c),
        }
    }
    true
}

struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn unsafe_entry(path: &str, reason: &'static str) -> PackageError {
    PackageError::Unsafe {
        path: path.to_string(),
        reason,
    }
}

/// Unpacks the gzip'd tar stream `reader` into `staging` (an existing, empty directory),
/// or with `staging = None` only checks it. `progress` is called with the number of files
/// done after each one (the agent's crash-test hook uses it).
///
/// On error the staging directory may hold part of the archive; the caller removes it.
pub fn unpack(
    reader: impl Read,
    staging: Option<&Path>,
    limits: &Limits,
    expect: Expect<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<Unpacked, PackageError> {
    let compressed = Arc::new(AtomicU64::new(0));
    let gz = GzDecoder::new(Counting {
        inner: reader,
        read: compressed.clone(),
    });
    let mut archive = tar::Archive::new(gz);
    let entries = archive.entries().map_err(PackageError::Archive)?;
    let manifest_mode = matches!(expect, Expect::Manifest(_));
    let mut manifest: Option<Manifest> = None;
    let mut listed: HashMap<String, (u64, String)> = HashMap::new();
    let mut listed_links: HashMap<String, String> = HashMap::new();
    let mut links: Vec<(String, String)> = Vec::new();
    let mut out = Unpacked {
        manifest: None,
        files: 0,
        bytes: 0,
    };
    let mut count = 0u64;
    let mut buf = vec![0u8; 128 * 1024];
    for entry in entries {
        let mut entry = entry.map_err(PackageError::Archive)?;
        count += 1;
        if count > limits.max_entries {
            return Err(PackageError::Limit(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            continue;
        }
        let raw = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| unsafe_entry("<binary>", "the path is not UTF-8"))?;
        // `tar czf x.tar.gz -C dir .` starts with `./` itself: the root, nothing to create.
        if kind == EntryType::Directory && raw.split('/').all(|c| c.is_empty() || c == ".") {
            continue;
        }
        let rel = normalise(&raw).ok_or_else(|| {
            if raw.trim_start_matches("./").is_empty() || raw == "." {
                unsafe_entry(&raw, "empty path")
            } else {
                unsafe_entry(&raw, "absolute path or `..` component")
            }
        });
        if manifest_mode && manifest.is_none() {
            // The manifest must come first so every checksum is known before any file.
            let is_manifest = rel.as_deref().is_ok_and(|r| r == MANIFEST_NAME);
            if !is_manifest || !matches!(kind, EntryType::Regular | EntryType::Continuous) {
                return Err(PackageError::Manifest(format!(
                    "the first entry is {raw:?}, not {MANIFEST_NAME}"
                )));
            }
            if entry.size() > MAX_MANIFEST_BYTES {
                return Err(PackageError::Limit("manifest too large".into()));
            }
            let mut text = Vec::new();
            entry
                .read_to_end(&mut text)
                .map_err(PackageError::Archive)?;
            let m: Manifest = serde_json::from_slice(&text)
                .map_err(|e| PackageError::Manifest(format!("not valid JSON ({e})")))?;
            m.validate()?;
            if let Expect::Manifest(Some(want)) = expect
                && *want != m
            {
                return Err(PackageError::Manifest(
                    "differs from the manifest that was verified".into(),
                ));
            }
            if m.total_size() > limits.max_unpacked {
                return Err(PackageError::Limit(format!(
                    "the manifest lists {} bytes, more than {}",
                    m.total_size(),
                    limits.max_unpacked
                )));
            }
            listed = m
                .files
                .iter()
                .map(|f| (f.path.clone(), (f.size, f.sha256.to_ascii_lowercase())))
                .collect();
            listed_links = m
                .links
                .iter()
                .map(|l| (l.path.clone(), l.target.clone()))
                .collect();
            if let Some(dir) = staging {
                write_file(
                    dir,
                    MANIFEST_NAME,
                    0o644,
                    &mut text.as_slice(),
                    &mut buf,
                    None,
                )?;
            }
            manifest = Some(m);
            continue;
        }
        let rel = rel?;
        if manifest_mode && rel == MANIFEST_NAME {
            return Err(unsafe_entry(&raw, "a second manifest"));
        }
        match kind {
            EntryType::Directory => {
                if let Some(dir) = staging {
                    let p = dir.join(&rel);
                    if p.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                        return Err(unsafe_entry(&raw, "a directory over an existing file"));
                    }
                    std::fs::create_dir_all(&p).map_err(|e| PackageError::io(&p, e))?;
                }
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.size();
                if size > limits.max_file {
                    return Err(PackageError::Limit(format!(
                        "{rel} is {size} bytes, more than {}",
                        limits.max_file
                    )));
                }
                if out.bytes + size > limits.max_unpacked {
                    return Err(PackageError::Limit(format!(
                        "more than {} bytes unpacked",
                        limits.max_unpacked
                    )));
                }
                let expected = if manifest_mode {
                    let (want_size, sha) = listed
                        .remove(&rel)
                        .ok_or_else(|| unsafe_entry(&raw, "not listed in the manifest"))?;
                    if want_size != size {
                        return Err(PackageError::Checksum(format!(
                            "{rel}: {size} bytes, the manifest says {want_size}"
                        )));
                    }
                    Some(sha)
                } else {
                    None
                };
                let mode = if entry.header().mode().unwrap_or(0o644) & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                };
                let ratio = RatioCheck {
                    compressed: &compressed,
                    before: out.bytes,
                    limits,
                };
                let sha = match staging {
                    Some(dir) => write_file(dir, &rel, mode, &mut entry, &mut buf, Some(ratio))?,
                    None => copy_hashed(&mut entry, &mut std::io::sink(), &mut buf, Some(ratio))?,
                };
                if let Some(want) = expected
                    && want != sha
                {
                    return Err(PackageError::Checksum(format!(
                        "{rel}: sha256 differs from the manifest"
                    )));
                }
                out.files += 1;
                out.bytes += size;
                progress(out.files);
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                if !link_target_inside(&rel, &target) {
                    return Err(unsafe_entry(&raw, "a symbolic link pointing outside"));
                }
                if manifest_mode && listed_links.remove(&rel).as_deref() != Some(target.as_str()) {
                    return Err(unsafe_entry(&raw, "a link not listed in the manifest"));
                }
                links.push((rel, target));
            }
            EntryType::Link => {
                if manifest_mode {
                    return Err(unsafe_entry(&raw, "a hard link in a lockstep package"));
                }
                let target = entry
                    .link_name_bytes()
                    .and_then(|b| String::from_utf8(b.into_owned()).ok())
                    .and_then(|t| normalise(&t))
                    .ok_or_else(|| unsafe_entry(&raw, "a hard link pointing outside"))?;
                if let Some(dir) = staging {
                    let from = dir.join(&target);
                    if !from.symlink_metadata().is_ok_and(|m| m.is_file()) {
                        return Err(unsafe_entry(
                            &raw,
                            "a hard link to something not unpacked before it",
                        ));
                    }
                    let to = dir.join(&rel);
                    make_parent(dir, &rel)?;
                    std::fs::hard_link(&from, &to).map_err(|e| PackageError::io(&to, e))?;
                }
            }
            EntryType::Char | EntryType::Block => {
                return Err(unsafe_entry(&raw, "a device node"));
            }
            EntryType::Fifo => return Err(unsafe_entry(&raw, "a fifo")),
            _ => return Err(unsafe_entry(&raw, "an entry type that is not allowed")),
        }
    }
    if manifest_mode {
        if manifest.is_none() {
            return Err(PackageError::Manifest(format!(
                "the archive is empty: no {MANIFEST_NAME}"
            )));
        }
        if let Some(missing) = listed.keys().min() {
            return Err(PackageError::Checksum(format!(
                "{missing} is in the manifest but not in the archive ({} missing)",
                listed.len()
            )));
        }
        if let Some(missing) = listed_links.keys().min() {
            return Err(PackageError::Checksum(format!(
                "link {missing} is in the manifest but not in the archive"
            )));
        }
    }
    // Drain the gzip trailer so a truncated or corrupt stream is an error, not a silent
    // success of everything before it.
    let mut rest = archive.into_inner();
    let n = std::io::copy(&mut rest, &mut std::io::sink()).map_err(PackageError::Archive)?;
    let _ = n;
    if let Some(dir) = staging {
        for (rel, target) in &links {
            make_parent(dir, rel)?;
            let p = dir.join(rel);
            std::os::unix::fs::symlink(target, &p).map_err(|e| PackageError::io(&p, e))?;
        }
        // Lexically inside is not enough once links chain through links: resolve each
        // for real and refuse any that leaves, dangles or loops.
        let root = dir.canonicalize().map_err(|e| PackageError::io(dir, e))?;
        for (rel, _) in &links {
            match dir.join(rel).canonicalize() {
                Ok(real) if real.starts_with(&root) => {}
                Ok(_) => return Err(unsafe_entry(rel, "a symbolic link pointing outside")),
                Err(_) => return Err(unsafe_entry(rel, "a dangling or looping symbolic link")),
            }
        }
    }
    out.manifest = manifest;
    Ok(out)
}

struct RatioCheck<'a> {
    compressed: &'a AtomicU64,
    before: u64,
    limits: &'a Limits,
}

impl RatioCheck<'_> {
    fn check(&self, written: u64) -> Result<(), PackageError> {
        let out = self.before + written;
        let input = self.compressed.load(Ordering::Relaxed).max(1);
        if out > (1 << 20) && out / input > self.limits.max_ratio {
            return Err(PackageError::Limit(format!(
                "expands more than {}× (a decompression bomb?)",
                self.limits.max_ratio
            )));
        }
        if out > self.limits.max_unpacked {
            return Err(PackageError::Limit(format!(
                "more than {} bytes unpacked",
                self.limits.max_unpacked
            )));
        }
        Ok(())
    }
}

fn copy_hashed(
    from: &mut impl Read,
    to: &mut impl Write,
    buf: &mut [u8],
    ratio: Option<RatioCheck<'_>>,
) -> Result<String, PackageError> {
    let mut hash = Sha256::new();
    let mut written = 0u64;
    loop {
        let n = from.read(buf).map_err(PackageError::Archive)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        to.write_all(&buf[..n])
            .map_err(|e| PackageError::io("<staging>", e))?;
        written += n as u64;
        if let Some(r) = &ratio {
            r.check(written)?;
        }
    }
    Ok(hex::encode(hash.finalize()))
}

fn make_parent(dir: &Path, rel: &str) -> Result<(), PackageError> {
    if let Some(parent) = Path::new(rel)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        let p = dir.join(parent);
        // No symlink exists in staging yet (they are created last), so this cannot be
        // redirected; a file in the way is a conflict.
        std::fs::create_dir_all(&p).map_err(|e| PackageError::io(&p, e))?;
    }
    Ok(())
}

fn write_file(
    dir: &Path,
    rel: &str,
    mode: u32,
    from: &mut impl Read,
    buf: &mut [u8],
    ratio: Option<RatioCheck<'_>>,
) -> Result<String, PackageError> {
    make_parent(dir, rel)?;
    let p: PathBuf = dir.join(rel);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&p)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                unsafe_entry(rel, "a path that appears twice")
            } else {
                PackageError::io(&p, e)
            }
        })?;
    copy_hashed(from, &mut f, buf, ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_and_escapes_refused() {
        for (raw, want) in [
            ("./bin/x", Some("bin/x")),
            ("a//b/./c/", Some("a/b/c")),
            ("/etc/passwd", None),
            ("../x", None),
            ("a/../../x", None),
            ("a/..", None),
            ("./", None),
        ] {
            assert_eq!(normalise(raw).as_deref(), want, "{raw}");
        }
    }

    #[test]
    fn links_are_judged_from_their_own_directory() {
        for (link, target, inside) in [
            ("bin/x", "../lib/x", true),
            ("bin/x", "../../x", false),
            ("x", "..", false),
            ("x", "/etc", false),
            ("a/b/c", "../../d", true),
            ("a/b/c", "../../../d", false),
        ] {
            assert_eq!(
                link_target_inside(link, target),
                inside,
                "{link} -> {target}"
            );
        }
    }
}
