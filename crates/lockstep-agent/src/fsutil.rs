//! The few filesystem moves that must survive a crash: atomic writes, an atomic symlink
//! switch, and fsync of the directories whose entries changed.

use std::io::Write;
use std::path::{Path, PathBuf};

/// fsync a directory, so a rename or a new entry in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync,
/// rename over, fsync the directory. A crash leaves the old or the new contents, never a
/// torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tmp_sibling(path);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// `<name>.tmp-<pid>` next to `path`.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".tmp-{}", std::process::id()));
    s.into()
}

/// Points the symlink `link` at `target` atomically: a new symlink under a temporary name,
/// renamed over `link` (rename(2) replaces it in one step), then the directory is fsynced.
/// `between` runs after the temporary link exists and before the rename (the crash hook).
pub fn switch_symlink(link: &Path, target: &Path, between: impl FnOnce()) -> std::io::Result<()> {
    let dir = link.parent().unwrap_or(Path::new("."));
    let tmp = tmp_sibling(link);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    between();
    std::fs::rename(&tmp, link)?;
    sync_dir(dir)
}

/// Makes every file under `dir` durable: `sync -f` (syncfs(2) on its filesystem, one call
/// for ten thousand files), or fsync of each file where `sync -f` is not available.
pub fn sync_tree(dir: &Path) -> std::io::Result<()> {
    let ok = std::process::Command::new("sync")
        .arg("-f")
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    fn walk(p: &Path) -> std::io::Result<()> {
        for e in std::fs::read_dir(p)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(&e.path())?;
                sync_dir(&e.path())?;
            } else if ft.is_file() {
                std::fs::File::open(e.path())?.sync_all()?;
            }
        }
        Ok(())
    }
    walk(dir)?;
    sync_dir(dir)
}

/// Where the `current` symlink points, as a release id (`releases/<id>` → `<id>`).
pub fn read_current(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    target.file_name()?.to_str().map(str::to_string)
}
