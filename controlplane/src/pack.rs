//! Packing a workspace directory for `submit`: a tar.gz that honours `.terraformignore`
//! (gitignore syntax, through the `ignore` crate's matcher), always leaves out `.terraform/`,
//! `.git/` and `*.tfstate*`, and carries `--var-file`s under `.delegate/varfiles/N.tfvars`.
//!
//! Owns: what goes into the archive. Never follows symlinks (they are stored as links; the agent
//! refuses any that leave the tree) and never packs device or fifo files.

use flate2::write::GzEncoder;
use flate2::Compression;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Errors packing a workspace. Not retryable: fix the directory or the arguments.
#[derive(Debug, Error)]
pub enum PackError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: .terraformignore: {1}")]
    Ignore(PathBuf, String),
    #[error("{0}: cannot pack a device, socket or fifo")]
    Special(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

/// Where `--var-file` number `n` goes inside the archive.
pub fn var_file_path(n: usize) -> String {
    format!(".delegate/varfiles/{n}.tfvars")
}

#[derive(Debug)]
pub struct Packed {
    /// tar.gz bytes.
    pub archive: Vec<u8>,
    /// Archive paths of the var files, in order, for `-var-file`.
    pub var_files: Vec<String>,
    /// Paths packed (files, directories, links), relative, for display and tests.
    pub entries: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Always left out, whatever `.terraformignore` says.
fn always_skipped(rel: &Path, is_dir: bool) -> bool {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if is_dir {
        name == ".terraform" || name == ".git"
    } else {
        name.contains(".tfstate")
    }
}

fn ignore_matcher(dir: &Path) -> Result<Gitignore, PackError> {
    let mut b = GitignoreBuilder::new(dir);
    let file = dir.join(".terraformignore");
    if file.exists() {
        if let Some(e) = b.add(&file) {
            return Err(PackError::Ignore(dir.to_path_buf(), e.to_string()));
        }
    }
    b.build()
        .map_err(|e| PackError::Ignore(dir.to_path_buf(), e.to_string()))
}

/// Pack `dir` and the given var files.
pub fn pack_dir(dir: &Path, var_files: &[PathBuf]) -> Result<Packed, PackError> {
    let meta = std::fs::metadata(dir).map_err(io(dir))?;
    if !meta.is_dir() {
        return Err(PackError::Invalid(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if dir.join(".delegate").join("varfiles").exists() && !var_files.is_empty() {
        return Err(PackError::Invalid(format!(
            "{} already has .delegate/varfiles/, where --var-file files go",
            dir.display()
        )));
    }
    let matcher = ignore_matcher(dir)?;
    let gz = GzEncoder::new(Vec::new(), Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let mut entries = Vec::new();
    walk(dir, Path::new(""), &matcher, &mut tar, &mut entries)?;

    let mut packed_var_files = Vec::new();
    for (n, f) in var_files.iter().enumerate() {
        let data = std::fs::read(f).map_err(io(f))?;
        let name = var_file_path(n);
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(0);
        tar.append_data(&mut header, &name, data.as_slice())
            .map_err(io(f))?;
        entries.push(name.clone());
        packed_var_files.push(name);
    }
    let gz = tar.into_inner().map_err(io(dir))?;
    let archive = gz.finish().map_err(io(dir))?;
    Ok(Packed {
        archive,
        var_files: packed_var_files,
        entries,
    })
}

fn walk(
    root: &Path,
    rel_dir: &Path,
    matcher: &Gitignore,
    tar: &mut tar::Builder<GzEncoder<Vec<u8>>>,
    entries: &mut Vec<String>,
) -> Result<(), PackError> {
    let abs_dir = root.join(rel_dir);
    let mut children: Vec<_> = std::fs::read_dir(&abs_dir)
        .map_err(io(&abs_dir))?
        .collect::<Result<_, _>>()
        .map_err(io(&abs_dir))?;
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let rel = rel_dir.join(child.file_name());
        let abs = root.join(&rel);
        let ft = child.file_type().map_err(io(&abs))?;
        let is_dir = ft.is_dir();
        if always_skipped(&rel, is_dir) || matcher.matched(&rel, is_dir).is_ignore() {
            continue;
        }
        let name = rel.to_string_lossy().replace('\\', "/");
        if is_dir {
            tar.append_dir(&rel, &abs).map_err(io(&abs))?;
            entries.push(format!("{name}/"));
            walk(root, &rel, matcher, tar, entries)?;
        } else if ft.is_file() || ft.is_symlink() {
            // With follow_symlinks(false) a link is stored as a link.
            tar.append_path_with_name(&abs, &rel).map_err(io(&abs))?;
            entries.push(name);
        } else {
            return Err(PackError::Special(abs));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn unpack_names(archive: &[u8]) -> Vec<(String, tar::EntryType, Vec<u8>)> {
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(archive));
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let ty = e.header().entry_type();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, ty, data)
            })
            .collect()
    }

    #[test]
    fn honours_terraformignore_and_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("main.tf"), "resource \"terraform_data\" \"x\" {}").unwrap();
        std::fs::write(d.join("terraform.tfstate"), "{}").unwrap();
        std::fs::write(d.join("terraform.tfstate.backup"), "{}").unwrap();
        std::fs::create_dir_all(d.join(".terraform/providers")).unwrap();
        std::fs::write(d.join(".terraform/providers/p"), "bin").unwrap();
        std::fs::create_dir_all(d.join("modules/m")).unwrap();
        std::fs::write(d.join("modules/m/main.tf"), "").unwrap();
        std::fs::create_dir_all(d.join("secret-stuff")).unwrap();
        std::fs::write(d.join("secret-stuff/key"), "k").unwrap();
        std::fs::write(d.join("notes.log"), "l").unwrap();
        std::fs::write(d.join("keep.log"), "l").unwrap();
        std::fs::write(
            d.join(".terraformignore"),
            "secret-stuff/\n*.log\n!keep.log\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("main.tf", d.join("link.tf")).unwrap();
        let vf_dir = tempfile::tempdir().unwrap();
        let vf = vf_dir.path().join("vars.tfvars");
        std::fs::write(&vf, "greeting = \"hi\"\n").unwrap();

        let packed = pack_dir(d, &[vf]).unwrap();
        assert_eq!(
            packed.var_files,
            vec![".delegate/varfiles/0.tfvars".to_string()]
        );
        let names: Vec<String> = unpack_names(&packed.archive)
            .into_iter()
            .map(|e| e.0)
            .collect();
        for want in [
            "main.tf",
            "modules/m/main.tf",
            "keep.log",
            ".terraformignore",
            "link.tf",
            ".delegate/varfiles/0.tfvars",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        for unwanted in [
            "terraform.tfstate",
            "terraform.tfstate.backup",
            ".terraform",
            "secret-stuff",
            "notes.log",
        ] {
            assert!(
                !names
                    .iter()
                    .any(|n| n == unwanted || n.starts_with(&format!("{unwanted}/"))),
                "{unwanted} packed: {names:?}"
            );
        }
        let entries = unpack_names(&packed.archive);
        let link = entries.iter().find(|e| e.0 == "link.tf").unwrap();
        assert_eq!(link.1, tar::EntryType::Symlink);
        let vars = entries
            .iter()
            .find(|e| e.0 == ".delegate/varfiles/0.tfvars")
            .unwrap();
        assert_eq!(vars.2, b"greeting = \"hi\"\n");
    }

    #[test]
    fn not_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, "x").unwrap();
        assert!(pack_dir(&f, &[]).is_err());
        assert!(pack_dir(&tmp.path().join("missing"), &[]).is_err());
    }
}
