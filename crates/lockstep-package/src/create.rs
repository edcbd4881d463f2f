//! `package create`: a reproducible tar.gz of a release tree with its manifest first.
//!
//! Reproducible means the same tree gives the same bytes: entries sorted by path, every
//! mtime set to the package's `created_at`, owners 0/0 without names, modes normalised to
//! 0644/0755 (0755 when any execute bit is set), a gzip header without name or time.
//! `created_at` is the newest mtime of the included files unless given (or
//! `SOURCE_DATE_EPOCH` is set), so it too depends only on the tree.

use flate2::{Compression, GzBuilder};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

use crate::PackageError;
use crate::manifest::{FileEntry, LinkEntry, MANIFEST_NAME, Manifest, valid_version_id};

/// Excluded unless the caller clears them: VCS data, build output, dependencies, caches.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    ".git/",
    ".hg/",
    ".svn/",
    "build/",
    "node_modules/",
    "target/",
    "__pycache__/",
    ".cache/",
    ".pytest_cache/",
    ".mypy_cache/",
    ".npm/",
    "*.pyc",
    ".DS_Store",
];

/// What to package and how to name it.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The service.
    pub service: String,
    /// The human label.
    pub version: String,
    /// The release identity (default: the version).
    pub version_id: Option<String>,
    /// The commit (default `unknown`).
    pub git_sha: Option<String>,
    /// Component versions.
    pub components: BTreeMap<String, String>,
    /// Globs excluded in addition to [`DEFAULT_EXCLUDES`] (see [`glob_match`]).
    pub excludes: Vec<String>,
    /// Leave out [`DEFAULT_EXCLUDES`].
    pub no_default_excludes: bool,
    /// The timestamp recorded (default: the newest mtime in the tree).
    pub created_at: Option<OffsetDateTime>,
}

/// `<service>-<version>-<YYYYmmddTHHMMSSZ>.tar.gz`, the default package name.
pub fn default_file_name(m: &Manifest) -> String {
    let stamp = m
        .created_at
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>();
    format!("{}-{}-{stamp}.tar.gz", m.service, m.version)
}

/// Matches `path` (relative, `/`-separated) against an exclude glob. `*` and `?` stay within
/// one component, `**` spans any number; a glob without `/` matches any single component
/// (as in `.gitignore`); a trailing `/` matches directories only.
pub fn glob_match(glob: &str, path: &str, is_dir: bool) -> bool {
    let (glob, dir_only) = match glob.strip_suffix('/') {
        Some(g) => (g, true),
        None => (glob, false),
    };
    if dir_only && !is_dir {
        return false;
    }
    let glob = glob.trim_start_matches("./");
    if !glob.contains('/') {
        let name = path.rsplit('/').next().unwrap_or(path);
        return wild(glob.as_bytes(), name.as_bytes());
    }
    wild(glob.trim_start_matches('/').as_bytes(), path.as_bytes())
}

fn wild(g: &[u8], s: &[u8]) -> bool {
    match g {
        [] => s.is_empty(),
        [b'*', b'*', b'/', rest @ ..] => {
            wild(rest, s)
                || s.iter()
                    .enumerate()
                    .any(|(i, &c)| c == b'/' && wild(rest, &s[i + 1..]))
        }
        [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| wild(rest, &s[i..])),
        [b'*', rest @ ..] => {
            for i in 0..=s.len() {
                if wild(rest, &s[i..]) {
                    return true;
                }
                if i < s.len() && s[i] == b'/' {
                    return false;
                }
            }
            false
        }
        [b'?', rest @ ..] => !s.is_empty() && s[0] != b'/' && wild(rest, &s[1..]),
        [c, rest @ ..] => !s.is_empty() && s[0] == *c && wild(rest, &s[1..]),
    }
}

enum Kind {
    Dir,
    File { size: u64, exec: bool },
    Link(String),
}

struct Item {
    rel: String,
    kind: Kind,
}

fn walk(
    root: &Path,
    dir: &Path,
    prefix: &str,
    excludes: &[String],
    out: &mut Vec<Item>,
    newest: &mut i64,
) -> Result<(), PackageError> {
    let rd = std::fs::read_dir(dir).map_err(|e| PackageError::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| PackageError::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_str().ok_or_else(|| {
            PackageError::Invalid(format!(
                "{}: file name is not UTF-8",
                entry.path().display()
            ))
        })?;
        let rel = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        if rel == MANIFEST_NAME {
            continue;
        }
        let path = entry.path();
        let meta = path
            .symlink_metadata()
            .map_err(|e| PackageError::io(&path, e))?;
        let ft = meta.file_type();
        if excludes.iter().any(|g| glob_match(g, &rel, ft.is_dir())) {
            continue;
        }
        use std::os::unix::fs::MetadataExt;
        *newest = (*newest).max(meta.mtime());
        if ft.is_dir() {
            out.push(Item {
                rel: rel.clone(),
                kind: Kind::Dir,
            });
            walk(root, &path, &rel, excludes, out, newest)?;
        } else if ft.is_file() {
            use std::os::unix::fs::PermissionsExt;
            out.push(Item {
                rel,
                kind: Kind::File {
                    size: meta.len(),
                    exec: meta.permissions().mode() & 0o111 != 0,
                },
            });
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| PackageError::io(&path, e))?;
            let target = target.to_str().map(str::to_string).ok_or_else(|| {
                PackageError::Invalid(format!("{}: link target is not UTF-8", path.display()))
            })?;
            if !crate::unpack::link_target_inside(&rel, &target) {
                return Err(PackageError::Invalid(format!(
                    "{}: the link points outside the tree ({target}); agents refuse such links",
                    path.display()
                )));
            }
            out.push(Item {
                rel,
                kind: Kind::Link(target),
            });
        } else {
            return Err(PackageError::Invalid(format!(
                "{}: not a file, directory or link (devices, fifos and sockets are not packaged)",
                path.display()
            )));
        }
    }
    let _ = root;
    Ok(())
}

fn hash_file(path: &Path) -> Result<String, PackageError> {
    let mut f = std::fs::File::open(path).map_err(|e| PackageError::io(path, e))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| PackageError::io(path, e))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hex::encode(hash.finalize()))
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Packages the tree at `dir` into `out` (written to a temporary name, then renamed) and
/// returns its manifest.
pub fn create(dir: &Path, opts: &CreateOptions, out: &Path) -> Result<Manifest, PackageError> {
    if opts.service.is_empty() || opts.version.is_empty() {
        return Err(PackageError::Invalid(
            "a service and a version are required".into(),
        ));
    }
    let version_id = opts
        .version_id
        .clone()
        .unwrap_or_else(|| opts.version.clone());
    if !valid_version_id(&version_id) {
        return Err(PackageError::Invalid(format!(
            "version id {version_id:?}: letters, digits, '.', '_', '-', '+' only (it names a directory on every node)"
        )));
    }
    let mut excludes: Vec<String> = if opts.no_default_excludes {
        Vec::new()
    } else {
        DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect()
    };
    excludes.extend(opts.excludes.iter().cloned());
    let mut items = Vec::new();
    let mut newest = 0i64;
    walk(dir, dir, "", &excludes, &mut items, &mut newest)?;
    // Keep the package out of itself when it is written inside the tree.
    if let (Ok(out_abs), Ok(dir_abs)) = (absolute(out), dir.canonicalize())
        && let Ok(rel) = out_abs.strip_prefix(&dir_abs)
        && let Some(rel) = rel.to_str()
    {
        items.retain(|i| i.rel != rel);
    }
    items.sort_by(|a, b| a.rel.cmp(&b.rel));
    let created = match opts.created_at {
        Some(t) => t,
        None => match std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            Some(epoch) => OffsetDateTime::from_unix_timestamp(epoch)
                .map_err(|e| PackageError::Invalid(format!("SOURCE_DATE_EPOCH: {e}")))?,
            None => OffsetDateTime::from_unix_timestamp(newest)
                .map_err(|e| PackageError::Invalid(format!("mtime: {e}")))?,
        },
    };
    let created = created.replace_nanosecond(0).unwrap_or(created);
    let mtime = u64::try_from(created.unix_timestamp()).unwrap_or(0);
    let mut files = Vec::new();
    let mut links = Vec::new();
    for i in &items {
        match &i.kind {
            Kind::File { size, .. } => files.push(FileEntry {
                path: i.rel.clone(),
                size: *size,
                sha256: hash_file(&dir.join(&i.rel))?,
            }),
            Kind::Link(t) => links.push(LinkEntry {
                path: i.rel.clone(),
                target: t.clone(),
            }),
            Kind::Dir => {}
        }
    }
    let manifest = Manifest {
        service: opts.service.clone(),
        version: opts.version.clone(),
        version_id,
        git_sha: opts.git_sha.clone().unwrap_or_else(|| "unknown".into()),
        created_at: created
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| PackageError::Invalid(e.to_string()))?,
        components: opts.components.clone(),
        files,
        links,
    };
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| PackageError::Invalid(e.to_string()))?;
    let tmp = tmp_name(out);
    let result = (|| {
        let f = std::fs::File::create(&tmp).map_err(|e| PackageError::io(&tmp, e))?;
        let gz = GzBuilder::new().mtime(0).write(
            BufWriter::with_capacity(256 * 1024, f),
            Compression::default(),
        );
        let mut tar = tar::Builder::new(gz);
        let io = |e| PackageError::io(out, e);
        let mut h = header(tar::EntryType::Regular, 0o644, text.len() as u64, mtime);
        tar.append_data(&mut h, MANIFEST_NAME, text.as_slice())
            .map_err(io)?;
        let mut sizes = manifest.files.iter();
        for i in &items {
            match &i.kind {
                Kind::Dir => {
                    let mut h = header(tar::EntryType::Directory, 0o755, 0, mtime);
                    tar.append_data(&mut h, format!("{}/", i.rel), std::io::empty())
                        .map_err(io)?;
                }
                Kind::File { exec, .. } => {
                    let listed = sizes.next().map(|f| f.size).unwrap_or(0);
                    let p = dir.join(&i.rel);
                    let f = std::fs::File::open(&p).map_err(|e| PackageError::io(&p, e))?;
                    let now = f.metadata().map_err(|e| PackageError::io(&p, e))?.len();
                    if now != listed {
                        return Err(PackageError::Invalid(format!(
                            "{}: changed while being packaged",
                            p.display()
                        )));
                    }
                    let mode = if *exec { 0o755 } else { 0o644 };
                    let mut h = header(tar::EntryType::Regular, mode, listed, mtime);
                    tar.append_data(&mut h, &i.rel, f.take(listed))
                        .map_err(io)?;
                }
                Kind::Link(target) => {
                    let mut h = header(tar::EntryType::Symlink, 0o777, 0, mtime);
                    tar.append_link(&mut h, &i.rel, target).map_err(io)?;
                }
            }
        }
        let gz = tar.into_inner().map_err(io)?;
        let mut w = gz.finish().map_err(io)?;
        w.flush().map_err(io)?;
        let f = w
            .into_inner()
            .map_err(|e| PackageError::io(out, e.into_error()))?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, out).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| manifest)
}

fn absolute(p: &Path) -> std::io::Result<PathBuf> {
    let parent = p
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = p
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    Ok(parent.canonicalize()?.join(name))
}

fn tmp_name(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(format!(".tmp-{}", std::process::id()));
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(glob: &str, path: &str, is_dir: bool, want: bool) {
        assert_eq!(glob_match(glob, path, is_dir), want, "{glob} ~ {path}");
    }

    #[test]
    fn excludes_match_like_gitignore() {
        check(".git/", ".git", true, true);
        check(".git/", "sub/.git", true, true);
        check(".git/", ".git", false, false);
        check("*.pyc", "a/b/c.pyc", false, true);
        check("*.log", "a/b.log.gz", false, false);
        check("docs/*.md", "docs/a.md", false, true);
        check("docs/*.md", "docs/sub/a.md", false, false);
        check("docs/**/*.md", "docs/sub/a.md", false, true);
        check("docs/**/*.md", "docs/a.md", false, true);
        check("**/tmp", "a/b/tmp", true, true);
        check("secret?.txt", "secret1.txt", false, true);
    }
}
