//! Where commands write, by one rule for all of them (README, "Outputs"): before any work,
//! every output path is checked — it is not an existing folder (a file output) or file (a run
//! folder), and the nearest folder that exists on the way to it is writable — and missing
//! parent folders are created only when the result is written, so a command that fails at any
//! point leaves nothing behind.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// What an output path names.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A file (`-o model.safetensors`, `--csv`, `--plot`).
    File,
    /// A folder the command fills (`train -o RUN_DIR`).
    Folder,
}

/// Checks that `path` can be written as `kind`, before any work; `flag` names the option in
/// the message. A problem is a runtime error (exit 1): it is the file system's state.
pub fn check(path: &Path, flag: &str, kind: Kind) -> Result<()> {
    match (kind, path.is_dir()) {
        (Kind::File, true) => bail!("{flag} `{}` is a folder; give a file name", path.display()),
        (Kind::Folder, false) if path.exists() => bail!(
            "{flag} `{}` is a file; a run folder is needed",
            path.display()
        ),
        _ => {}
    }
    let existing = nearest_existing(path);
    if !existing.is_dir() {
        bail!(
            "{flag} `{}`: `{}` is a file, not a folder",
            path.display(),
            existing.display()
        );
    }
    if !writable(&existing) {
        bail!(
            "{flag} `{}`: folder `{}` is not writable",
            path.display(),
            existing.display()
        );
    }
    Ok(())
}

/// Creates the missing parent folders of an output file, just before it is written.
pub fn create_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create folder `{}`", dir.display())),
        _ => Ok(()),
    }
}

/// The path itself, or the nearest of its ancestors that exists (`.` for a relative path
/// none of whose folders exist).
fn nearest_existing(path: &Path) -> PathBuf {
    let mut p = path;
    loop {
        if p.exists() && p != path {
            return p.to_path_buf();
        }
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => return PathBuf::from("."),
        }
    }
}

#[cfg(unix)]
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

#[cfg(not(unix))]
fn writable(dir: &Path) -> bool {
    std::fs::metadata(dir).is_ok_and(|m| !m.permissions().readonly())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_folders_are_fine_files_in_the_way_are_not() {
        let dir = std::env::temp_dir().join(format!("slimcandle-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.txt");
        std::fs::write(&file, "x").unwrap();
        assert!(check(&dir.join("a/b/c.csv"), "--csv", Kind::File).is_ok());
        assert!(check(&dir.join("run"), "-o", Kind::Folder).is_ok());
        let e = check(&file.join("c.csv"), "--csv", Kind::File).unwrap_err();
        assert!(e.to_string().contains("is a file, not a folder"), "{e}");
        assert!(check(&dir, "-o", Kind::File).is_err());
        assert!(check(&file, "-o", Kind::Folder).is_err());
        create_parent(&dir.join("a/b/c.csv")).unwrap();
        assert!(dir.join("a/b").is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
