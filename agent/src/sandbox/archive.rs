//! Validation and normalisation of a workspace archive (tar.gz) before anything reaches Docker.
//!
//! Owns: the rules an archive must pass (no absolute paths, no `..`, no links leaving the tree, no
//! hardlink to anything but an earlier regular file, no device/fifo/sparse entries, size and count
//! limits, reserved names) and the normalised tar that is uploaded into the task volume: every
//! entry owned by the sandbox user, modes reduced to 0644/0755 (no setuid, setgid or sticky bit),
//! explicit directory entries for every parent, all under `workspace/` so that the upload (at `/`
//! of a helper container) also sets the ownership of the volume root.
//!
//! Must never: touch the filesystem or Docker, allocate beyond the configured limits (the
//! decompressed stream is capped), or panic on any input. Errors name the entry and the rule.

use super::hcl;
use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, Read};
use std::rc::Rc;
use tar::{EntryType, Header};

/// The uid and gid that own every file of the workspace; the step containers run as this user.
pub const SANDBOX_UID: u64 = 65534;
pub const SANDBOX_GID: u64 = 65534;
/// Top directory of the normalised tar; the volume is mounted there.
pub const TAR_ROOT: &str = "workspace";
/// Directory (inside the workspace) that the agent owns: plan files live here.
pub const STATE_DIR: &str = ".delegate";
/// Symlink resolution depth after which a link is refused as a loop (as the kernel does).
const MAX_LINK_DEPTH: usize = 40;
const MAX_PATH_BYTES: usize = 4096;
const MAX_COMPONENT_BYTES: usize = 255;
/// Per-entry allowance for tar headers and long-name/pax records in the decompressed stream.
const HEADER_ALLOWANCE: u64 = 3 * 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Compressed size.
    pub max_archive_bytes: u64,
    /// Sum of the sizes of regular files.
    pub max_unpacked_bytes: u64,
    /// Number of entries of any kind.
    pub max_files: u64,
}

/// Why an archive was refused. Never retryable: the same archive fails the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    #[error("workspace archive is {size} bytes compressed, over the {limit}-byte limit")]
    CompressedTooLarge { size: u64, limit: u64 },
    #[error("workspace archive unpacks to more than the {limit}-byte limit")]
    UnpackedTooLarge { limit: u64 },
    #[error("workspace archive holds more than the {limit}-entry limit")]
    TooManyFiles { limit: u64 },
    #[error("workspace archive is not a valid tar.gz: {0}")]
    Corrupt(String),
    #[error("archive entry {entry:?}: absolute paths are refused")]
    AbsolutePath { entry: String },
    #[error("archive entry {entry:?}: `..` path components are refused")]
    ParentComponent { entry: String },
    #[error("archive entry {entry:?}: name is not valid UTF-8 or holds control characters")]
    BadName { entry: String },
    #[error("archive entry {entry:?}: path or one of its components is too long")]
    PathTooLong { entry: String },
    #[error("archive entry {entry:?}: {kind} entries are refused")]
    SpecialFile { entry: String, kind: &'static str },
    #[error("archive entry {entry:?}: link target {target:?} leaves the workspace")]
    LinkEscapes { entry: String, target: String },
    #[error("archive entry {entry:?}: symlink resolution loops")]
    LinkLoop { entry: String },
    #[error(
        "archive entry {entry:?}: hardlink target {target:?} is not an earlier regular file of the archive"
    )]
    HardlinkTarget { entry: String, target: String },
    #[error("archive entry {entry:?}: appears more than once")]
    Duplicate { entry: String },
    #[error("archive entry {entry:?}: parent {parent:?} is not a directory")]
    NotADirectory { entry: String, parent: String },
    #[error("archive entry {entry:?}: this name is reserved for the agent")]
    Reserved { entry: String },
}

/// Shortened, printable form of an attacker-chosen name for error messages.
fn shown(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    if s.chars().count() > 200 {
        let mut t: String = s.chars().take(200).collect();
        t.push('…');
        t
    } else {
        s.into_owned()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
}

/// A validated workspace, as a normalised tar being built. Add agent files, then [`Self::into_tar`].
pub struct Workspace {
    builder: tar::Builder<Vec<u8>>,
    kinds: HashMap<String, Kind>,
    /// Whether a root-module file declares `backend` or `cloud` inside `terraform {}`.
    pub declares_backend: bool,
    /// Whether the workspace carries `.terraform.lock.hcl` (provider checksums are pinned).
    pub has_lock_file: bool,
    pub entries: u64,
    pub unpacked_bytes: u64,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("declares_backend", &self.declares_backend)
            .field("has_lock_file", &self.has_lock_file)
            .field("entries", &self.entries)
            .field("unpacked_bytes", &self.unpacked_bytes)
            .finish_non_exhaustive()
    }
}

impl Workspace {
    /// Whether the archive holds a regular file at this workspace-relative path.
    pub fn has_file(&self, rel: &str) -> bool {
        self.kinds.get(rel) == Some(&Kind::File)
    }

    /// Add a regular file (mode 0644, owned by the sandbox user) at a workspace-relative path
    /// whose parent directories exist. Refuses a path the archive already holds.
    pub fn add_file(&mut self, rel: &str, data: &[u8]) -> Result<(), ArchiveError> {
        if self.kinds.contains_key(rel) {
            return Err(ArchiveError::Reserved { entry: rel.into() });
        }
        let comps: Vec<String> = rel.split('/').map(str::to_string).collect();
        self.ensure_parents(rel, &comps)?;
        let mut h = header(EntryType::Regular, 0o644, 0);
        h.set_size(data.len() as u64);
        self.builder
            .append_data(&mut h, format!("{TAR_ROOT}/{rel}"), data)
            .map_err(io_err)?;
        self.kinds.insert(rel.into(), Kind::File);
        Ok(())
    }

    /// The finished tar, to be uploaded at `/` of a container that mounts the volume at
    /// `/workspace`.
    pub fn into_tar(self) -> Result<Vec<u8>, ArchiveError> {
        self.builder.into_inner().map_err(io_err)
    }

    fn ensure_parents(&mut self, entry: &str, comps: &[String]) -> Result<(), ArchiveError> {
        for i in 1..comps.len() {
            let parent = comps[..i].join("/");
            match self.kinds.get(&parent) {
                Some(Kind::Dir) => {}
                Some(Kind::File) | Some(Kind::Symlink) => {
                    return Err(ArchiveError::NotADirectory {
                        entry: entry.into(),
                        parent,
                    });
                }
                None => {
                    self.append_dir(&parent)?;
                }
            }
        }
        Ok(())
    }

    fn append_dir(&mut self, rel: &str) -> Result<(), ArchiveError> {
        let mut h = header(EntryType::Directory, 0o755, 0);
        let path = if rel.is_empty() {
            format!("{TAR_ROOT}/")
        } else {
            format!("{TAR_ROOT}/{rel}/")
        };
        self.builder
            .append_data(&mut h, path, io::empty())
            .map_err(io_err)?;
        if !rel.is_empty() {
            self.kinds.insert(rel.into(), Kind::Dir);
        }
        Ok(())
    }
}

fn io_err(e: io::Error) -> ArchiveError {
    ArchiveError::Corrupt(e.to_string())
}

fn header(kind: EntryType, mode: u32, mtime: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(SANDBOX_UID);
    h.set_gid(SANDBOX_GID);
    h.set_mtime(mtime);
    h.set_size(0);
    h
}

/// Caps the bytes read from the decompressor, so a gzip bomb stops at the limit.
struct CappedReader<R> {
    inner: R,
    left: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // Only an error if there is more to read.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.exceeded.set(true);
                    Err(io::Error::other("decompressed size limit exceeded"))
                }
            };
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Split a tar path into components: refuses absolute paths, `..`, bad names; drops `.` and
/// empty components. An empty result means the archive root.
fn components(raw: &[u8], entry: &str) -> Result<Vec<String>, ArchiveError> {
    if raw.first() == Some(&b'/') {
        return Err(ArchiveError::AbsolutePath {
            entry: entry.into(),
        });
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(ArchiveError::PathTooLong {
            entry: entry.into(),
        });
    }
    let text = std::str::from_utf8(raw).map_err(|_| ArchiveError::BadName {
        entry: entry.into(),
    })?;
    if text.chars().any(char::is_control) {
        return Err(ArchiveError::BadName {
            entry: entry.into(),
        });
    }
    let mut out = Vec::new();
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(ArchiveError::ParentComponent {
                    entry: entry.into(),
                })
            }
            c if c.len() > MAX_COMPONENT_BYTES => {
                return Err(ArchiveError::PathTooLong {
                    entry: entry.into(),
                })
            }
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

/// Resolve `target` as the kernel would from directory `dir`, following the archive's own
/// symlinks. `Err(true)` when it leaves the tree, `Err(false)` on a loop.
fn resolve(
    links: &HashMap<Vec<String>, String>,
    dir: &[String],
    target: &str,
    depth: &mut usize,
) -> Result<Vec<String>, bool> {
    if target.starts_with('/') {
        return Err(true);
    }
    let mut cur: Vec<String> = dir.to_vec();
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if cur.pop().is_none() {
                    return Err(true);
                }
            }
            name => {
                cur.push(name.to_string());
                if let Some(next) = links.get(&cur) {
                    *depth += 1;
                    if *depth > MAX_LINK_DEPTH {
                        return Err(false);
                    }
                    let parent = cur[..cur.len() - 1].to_vec();
                    cur = resolve(links, &parent, next, depth)?;
                }
            }
        }
    }
    Ok(cur)
}

fn is_root_config(name: &str) -> bool {
    !name.contains('/')
        && [".tf", ".tofu", ".tf.json", ".tofu.json"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

fn declares_backend(name: &str, text: &str) -> bool {
    if name.ends_with(".json") {
        hcl::declares_backend_json(text)
    } else {
        hcl::declares_backend_hcl(text)
    }
}

/// Check a workspace archive and build its normalised tar. Pure: bytes in, bytes out.
pub fn normalise(archive: &[u8], limits: &Limits) -> Result<Workspace, ArchiveError> {
    let size = archive.len() as u64;
    if size > limits.max_archive_bytes {
        return Err(ArchiveError::CompressedTooLarge {
            size,
            limit: limits.max_archive_bytes,
        });
    }
    let exceeded = Rc::new(Cell::new(false));
    let stream_cap = limits
        .max_unpacked_bytes
        .saturating_add(
            limits
                .max_files
                .saturating_add(4)
                .saturating_mul(HEADER_ALLOWANCE),
        )
        .saturating_add(1024 * 1024);
    let reader = CappedReader {
        inner: flate2::read::GzDecoder::new(archive),
        left: stream_cap,
        exceeded: exceeded.clone(),
    };
    let result = walk(reader, limits);
    if exceeded.get() {
        return Err(ArchiveError::UnpackedTooLarge {
            limit: limits.max_unpacked_bytes,
        });
    }
    result
}

fn walk<R: Read>(reader: R, limits: &Limits) -> Result<Workspace, ArchiveError> {
    let mut ws = Workspace {
        builder: tar::Builder::new(Vec::new()),
        kinds: HashMap::new(),
        declares_backend: false,
        has_lock_file: false,
        entries: 0,
        unpacked_bytes: 0,
    };
    ws.append_dir("")?;
    ws.append_dir(STATE_DIR)?;
    ws.kinds.insert(STATE_DIR.into(), Kind::Dir);

    let mut links: HashMap<Vec<String>, String> = HashMap::new();
    let mut link_entries: Vec<(String, Vec<String>, String)> = Vec::new();
    // Root-module configuration text, by name, to scan once every link is known.
    let mut configs: HashMap<String, String> = HashMap::new();

    let corrupt = |e: io::Error| ArchiveError::Corrupt(e.to_string());
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let etype = entry.header().entry_type();
        if matches!(etype, EntryType::XGlobalHeader) {
            continue; // e.g. `git archive`'s pax_global_header: metadata only
        }
        let raw_path = entry.path_bytes().into_owned();
        let shown_path = shown(&raw_path);
        ws.entries += 1;
        if ws.entries > limits.max_files {
            return Err(ArchiveError::TooManyFiles {
                limit: limits.max_files,
            });
        }
        let kind = match etype {
            EntryType::Regular | EntryType::Continuous => Kind::File,
            EntryType::Directory => Kind::Dir,
            EntryType::Symlink => Kind::Symlink,
            EntryType::Link => Kind::File,
            EntryType::Char => return special(shown_path, "character device"),
            EntryType::Block => return special(shown_path, "block device"),
            EntryType::Fifo => return special(shown_path, "fifo"),
            EntryType::GNUSparse => return special(shown_path, "sparse file"),
            _ => return special(shown_path, "unknown-type"),
        };
        let comps = components(&raw_path, &shown_path)?;
        if comps.is_empty() {
            if kind == Kind::Dir {
                continue; // the root itself: we emit our own
            }
            return Err(ArchiveError::BadName { entry: shown_path });
        }
        let rel = comps.join("/");
        if comps[0] == STATE_DIR {
            return Err(ArchiveError::Reserved { entry: shown_path });
        }
        if let Some(existing) = ws.kinds.get(&rel) {
            if *existing == Kind::Dir && kind == Kind::Dir {
                continue;
            }
            return Err(ArchiveError::Duplicate { entry: shown_path });
        }
        ws.ensure_parents(&shown_path, &comps)?;
        let mtime = entry.header().mtime().unwrap_or(0);
        let mode = entry.header().mode().unwrap_or(0o644);
        let path = format!("{TAR_ROOT}/{rel}");
        match etype {
            EntryType::Directory => {
                ws.append_dir(&rel)?;
            }
            EntryType::Symlink | EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .map(|c| c.into_owned())
                    .unwrap_or_default();
                let target_shown = shown(&target_raw);
                let target = std::str::from_utf8(&target_raw)
                    .ok()
                    .filter(|t| !t.is_empty() && !t.chars().any(char::is_control))
                    .ok_or_else(|| ArchiveError::BadName {
                        entry: shown_path.clone(),
                    })?
                    .to_string();
                let mut h = header(
                    etype,
                    if kind == Kind::Symlink { 0o777 } else { 0o644 },
                    mtime,
                );
                if etype == EntryType::Symlink {
                    if target.starts_with('/') {
                        return Err(ArchiveError::LinkEscapes {
                            entry: shown_path,
                            target: target_shown,
                        });
                    }
                    links.insert(comps.clone(), target.clone());
                    link_entries.push((shown_path.clone(), comps.clone(), target.clone()));
                    ws.builder
                        .append_link(&mut h, &path, &target)
                        .map_err(io_err)?;
                } else {
                    let bad = || ArchiveError::HardlinkTarget {
                        entry: shown_path.clone(),
                        target: target_shown.clone(),
                    };
                    let tcomps = components(target.as_bytes(), &shown_path).map_err(|_| bad())?;
                    let trel = tcomps.join("/");
                    if ws.kinds.get(&trel) != Some(&Kind::File) {
                        return Err(bad());
                    }
                    ws.builder
                        .append_link(&mut h, &path, format!("{TAR_ROOT}/{trel}"))
                        .map_err(io_err)?;
                    if let Some(text) = configs.get(&trel).cloned() {
                        configs.insert(rel.clone(), text);
                    }
                }
            }
            _ => {
                let len = entry.size();
                ws.unpacked_bytes = ws.unpacked_bytes.saturating_add(len);
                if ws.unpacked_bytes > limits.max_unpacked_bytes {
                    return Err(ArchiveError::UnpackedTooLarge {
                        limit: limits.max_unpacked_bytes,
                    });
                }
                let mut data = Vec::with_capacity(len.min(1 << 20) as usize);
                (&mut entry)
                    .take(len)
                    .read_to_end(&mut data)
                    .map_err(corrupt)?;
                if data.len() as u64 != len {
                    return Err(ArchiveError::Corrupt(format!(
                        "entry {shown_path:?} is truncated"
                    )));
                }
                let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                let mut h = header(EntryType::Regular, mode, mtime);
                h.set_size(len);
                ws.builder
                    .append_data(&mut h, &path, &data[..])
                    .map_err(io_err)?;
                if rel == ".terraform.lock.hcl" {
                    ws.has_lock_file = true;
                }
                if rel.ends_with(".tf")
                    || rel.ends_with(".tofu")
                    || rel.ends_with(".tf.json")
                    || rel.ends_with(".tofu.json")
                {
                    if let Ok(text) = String::from_utf8(data) {
                        configs.insert(rel.clone(), text);
                    }
                }
            }
        }
        ws.kinds.insert(rel, kind);
    }

    for (entry, comps, target) in &link_entries {
        let mut depth = 0;
        let parent = &comps[..comps.len() - 1];
        if let Err(escapes) = resolve(&links, parent, target, &mut depth) {
            return Err(if escapes {
                ArchiveError::LinkEscapes {
                    entry: entry.clone(),
                    target: shown(target.as_bytes()),
                }
            } else {
                ArchiveError::LinkLoop {
                    entry: entry.clone(),
                }
            });
        }
    }

    // Root-module files, including links to configuration elsewhere in the tree.
    let mut root_names: Vec<&String> = ws.kinds.keys().filter(|k| is_root_config(k)).collect();
    root_names.sort();
    for name in root_names {
        let text = match links.get(&vec![name.clone()]) {
            Some(target) => resolve(&links, &[], target, &mut 0)
                .ok()
                .and_then(|c| configs.get(&c.join("/"))),
            None => configs.get(name),
        };
        if text.is_some_and(|t| declares_backend(name, t)) {
            ws.declares_backend = true;
        }
    }
    Ok(ws)
}

fn special<T>(entry: String, kind: &'static str) -> Result<T, ArchiveError> {
    Err(ArchiveError::SpecialFile { entry, kind })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    pub(crate) const LIMITS: Limits = Limits {
        max_archive_bytes: 1 << 20,
        max_unpacked_bytes: 1 << 20,
        max_files: 100,
    };

    /// One raw entry of a hand-made archive. Paths are written byte for byte (no checks), so
    /// hostile names can be expressed.
    pub(crate) enum E<'a> {
        File(&'a str, &'a [u8]),
        FileMode(&'a str, &'a [u8], u32),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
        Other(&'a str, EntryType),
    }

    fn raw_header(name: &str, kind: EntryType) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        }
        h
    }

    fn set_link(h: &mut Header, target: &str) {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.linkname[..target.len()].copy_from_slice(target.as_bytes());
    }

    pub(crate) fn tar_gz(entries: &[E<'_>]) -> Vec<u8> {
        let mut tar = Vec::new();
        for e in entries {
            let (mut h, data): (Header, &[u8]) = match e {
                E::File(n, d) => (raw_header(n, EntryType::Regular), d),
                E::FileMode(n, d, m) => {
                    let mut h = raw_header(n, EntryType::Regular);
                    h.set_mode(*m);
                    (h, d)
                }
                E::Dir(n) => (raw_header(n, EntryType::Directory), b""),
                E::Symlink(n, t) => {
                    let mut h = raw_header(n, EntryType::Symlink);
                    set_link(&mut h, t);
                    (h, b"")
                }
                E::Hardlink(n, t) => {
                    let mut h = raw_header(n, EntryType::Link);
                    set_link(&mut h, t);
                    (h, b"")
                }
                E::Other(n, k) => (raw_header(n, *k), b""),
            };
            h.set_size(data.len() as u64);
            h.set_cksum();
            tar.extend_from_slice(h.as_bytes());
            tar.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            tar.resize(tar.len() + pad, 0);
        }
        tar.extend([0u8; 1024]);
        gz(&tar)
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    /// (path, type, uid, gid, mode, link target, data) of every entry of a normalised tar.
    type Listed = (String, EntryType, u64, u64, u32, Option<String>, Vec<u8>);

    fn list(tar: &[u8]) -> Vec<Listed> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (
                    String::from_utf8(e.path_bytes().into_owned()).unwrap(),
                    h.entry_type(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mode().unwrap(),
                    e.link_name_bytes()
                        .map(|l| String::from_utf8(l.into_owned()).unwrap()),
                    data,
                )
            })
            .collect()
    }

    fn refuse(entries: &[E<'_>]) -> ArchiveError {
        normalise(&tar_gz(entries), &LIMITS).expect_err("archive should be refused")
    }

    #[test]
    fn good_archive_is_normalised() {
        let main = b"variable \"x\" {}\nresource \"terraform_data\" \"a\" {}\n";
        let ws = normalise(
            &tar_gz(&[
                E::Dir("./"),
                E::File("./main.tf", main),
                E::FileMode("bin/run.sh", b"#!/bin/sh\n", 0o4755),
                E::FileMode("secret.txt", b"x", 0o600),
                E::Symlink("modules/current", "../modules/v1"),
                E::Dir("modules/v1/"),
                E::File("modules/v1/main.tf", b"output \"o\" { value = 1 }\n"),
                E::Hardlink("copy.tf", "main.tf"),
            ]),
            &LIMITS,
        )
        .unwrap();
        assert!(!ws.declares_backend);
        assert!(!ws.has_lock_file);
        assert!(ws.has_file("main.tf"));
        assert_eq!(ws.entries, 8);
        let listed = list(&ws.into_tar().unwrap());
        let names: Vec<&str> = listed.iter().map(|l| l.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "workspace/",
                "workspace/.delegate/",
                "workspace/main.tf",
                "workspace/bin/",
                "workspace/bin/run.sh",
                "workspace/secret.txt",
                "workspace/modules/",
                "workspace/modules/current",
                "workspace/modules/v1/",
                "workspace/modules/v1/main.tf",
                "workspace/copy.tf",
            ]
        );
        for (name, _, uid, gid, mode, _, _) in &listed {
            assert_eq!((*uid, *gid), (SANDBOX_UID, SANDBOX_GID), "{name}");
            assert_eq!(mode & 0o7000, 0, "{name}: no setuid/setgid/sticky");
        }
        let by = |n: &str| listed.iter().find(|l| l.0 == n).unwrap();
        assert_eq!(by("workspace/bin/run.sh").4, 0o755);
        assert_eq!(by("workspace/secret.txt").4, 0o644);
        assert_eq!(by("workspace/main.tf").6, main);
        assert_eq!(by("workspace/modules/current").1, EntryType::Symlink);
        assert_eq!(
            by("workspace/modules/current").5.as_deref(),
            Some("../modules/v1")
        );
        assert_eq!(by("workspace/copy.tf").1, EntryType::Link);
        assert_eq!(
            by("workspace/copy.tf").5.as_deref(),
            Some("workspace/main.tf")
        );
    }

    #[test]
    fn git_archive_global_header_is_skipped() {
        let ws = normalise(
            &tar_gz(&[
                E::Other("pax_global_header", EntryType::XGlobalHeader),
                E::File("a.tf", b""),
            ]),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(ws.entries, 1);
    }

    #[test]
    fn refuses_absolute_paths() {
        let e = refuse(&[E::File("/etc/passwd", b"x")]);
        assert_eq!(
            e,
            ArchiveError::AbsolutePath {
                entry: "/etc/passwd".into()
            }
        );
        assert!(e.to_string().contains("\"/etc/passwd\""), "{e}");
        assert!(e.to_string().contains("absolute"), "{e}");
    }

    #[test]
    fn refuses_parent_components() {
        for name in ["../evil.tf", "a/../../evil", "a/b/.."] {
            let e = refuse(&[E::File(name, b"x")]);
            assert_eq!(
                e,
                ArchiveError::ParentComponent { entry: name.into() },
                "{name}"
            );
        }
        let e = refuse(&[E::Dir("x/../../")]);
        assert!(matches!(e, ArchiveError::ParentComponent { .. }));
    }

    #[test]
    fn refuses_symlinks_leaving_the_tree() {
        let e = refuse(&[E::Symlink("etc", "/etc")]);
        assert_eq!(
            e,
            ArchiveError::LinkEscapes {
                entry: "etc".into(),
                target: "/etc".into()
            }
        );
        let e = refuse(&[E::Symlink("a/up", "../../x")]);
        assert_eq!(
            e,
            ArchiveError::LinkEscapes {
                entry: "a/up".into(),
                target: "../../x".into()
            }
        );
        assert!(e.to_string().contains("leaves the workspace"), "{e}");
        // Each link alone stays inside; chained, `d/b` is the root and `..` of it leaves.
        let e = refuse(&[E::Symlink("d/b", ".."), E::Symlink("a", "d/b/..")]);
        assert!(
            matches!(&e, ArchiveError::LinkEscapes { entry, .. } if entry == "a"),
            "{e}"
        );
        // The order of the entries does not matter.
        let e = refuse(&[E::Symlink("a", "d/b/../x"), E::Symlink("d/b", "..")]);
        assert!(matches!(e, ArchiveError::LinkEscapes { .. }), "{e}");
    }

    #[test]
    fn symlinks_inside_the_tree_are_kept() {
        let ws = normalise(
            &tar_gz(&[
                E::Symlink("d/b", ".."),
                E::Symlink("a", "d/b/d"),
                E::Symlink("dangling", "nothing/here"),
            ]),
            &LIMITS,
        );
        assert!(ws.is_ok(), "{ws:?}");
    }

    #[test]
    fn refuses_symlink_loops() {
        let e = refuse(&[E::Symlink("a", "b/x"), E::Symlink("b", "a/y")]);
        assert!(matches!(e, ArchiveError::LinkLoop { .. }), "{e}");
    }

    #[test]
    fn refuses_hardlinks_out_of_the_archive() {
        let e = refuse(&[E::Hardlink("shadow", "/etc/shadow")]);
        assert!(
            matches!(&e, ArchiveError::HardlinkTarget { entry, target }
            if entry == "shadow" && target == "/etc/shadow"),
            "{e}"
        );
        let e = refuse(&[E::Hardlink("x", "../outside")]);
        assert!(matches!(e, ArchiveError::HardlinkTarget { .. }), "{e}");
        // Not (yet) in the archive.
        let e = refuse(&[E::Hardlink("x", "later.tf"), E::File("later.tf", b"")]);
        assert!(matches!(e, ArchiveError::HardlinkTarget { .. }), "{e}");
        // To a directory or a symlink.
        let e = refuse(&[E::Dir("d/"), E::Hardlink("x", "d")]);
        assert!(matches!(e, ArchiveError::HardlinkTarget { .. }), "{e}");
        let e = refuse(&[E::Symlink("s", "t"), E::Hardlink("x", "s")]);
        assert!(matches!(e, ArchiveError::HardlinkTarget { .. }), "{e}");
    }

    #[test]
    fn refuses_special_files() {
        for (kind, word) in [
            (EntryType::Char, "character device"),
            (EntryType::Block, "block device"),
            (EntryType::Fifo, "fifo"),
        ] {
            let e = refuse(&[E::Other("dev/x", kind)]);
            assert_eq!(
                e,
                ArchiveError::SpecialFile {
                    entry: "dev/x".into(),
                    kind: word
                }
            );
            assert!(e.to_string().contains(word));
        }
    }

    #[test]
    fn refuses_over_limits() {
        let big = vec![b'a'; 600 * 1024];
        let limits = Limits {
            max_unpacked_bytes: 1 << 20,
            ..LIMITS
        };
        let e = normalise(&tar_gz(&[E::File("a", &big), E::File("b", &big)]), &limits).unwrap_err();
        assert_eq!(e, ArchiveError::UnpackedTooLarge { limit: 1 << 20 });

        let files: Vec<String> = (0..101).map(|i| format!("f{i}")).collect();
        let entries: Vec<E<'_>> = files.iter().map(|f| E::File(f, b"")).collect();
        let e = refuse(&entries);
        assert_eq!(e, ArchiveError::TooManyFiles { limit: 100 });

        let archive = tar_gz(&[E::File("a", &big)]);
        let limits = Limits {
            max_archive_bytes: archive.len() as u64 - 1,
            ..LIMITS
        };
        let e = normalise(&archive, &limits).unwrap_err();
        assert!(matches!(e, ArchiveError::CompressedTooLarge { .. }), "{e}");
    }

    #[test]
    fn gzip_bomb_stops_at_the_cap() {
        // A GNU long-name record is read whole by the tar reader before any entry is seen, so
        // only the cap on the decompressed stream stops an 8 MiB one.
        let mut tar = Vec::new();
        let mut h = raw_header("././@LongLink", EntryType::GNULongName);
        h.set_size(8 << 20);
        h.set_cksum();
        tar.extend_from_slice(h.as_bytes());
        tar.extend(vec![b'a'; 8 << 20]);
        let limits = Limits {
            max_unpacked_bytes: 1024,
            max_files: 4,
            ..LIMITS
        };
        let e = normalise(&gz(&tar), &limits).unwrap_err();
        assert_eq!(e, ArchiveError::UnpackedTooLarge { limit: 1024 });
    }

    #[test]
    fn refuses_garbage() {
        let e = normalise(b"definitely not gzip", &LIMITS).unwrap_err();
        assert!(matches!(e, ArchiveError::Corrupt(_)), "{e}");
        let e = normalise(
            &gz(b"not a tar either, but long enough to be read"),
            &LIMITS,
        );
        assert!(e.is_err());
    }

    #[test]
    fn refuses_reserved_and_duplicate_names() {
        let e = refuse(&[E::File(".delegate/plan.tfplan", b"x")]);
        assert!(matches!(e, ArchiveError::Reserved { .. }), "{e}");
        let e = refuse(&[E::File("a.tf", b""), E::File("./a.tf", b"")]);
        assert_eq!(
            e,
            ArchiveError::Duplicate {
                entry: "./a.tf".into()
            }
        );
        let e = refuse(&[E::File("a", b""), E::File("a/b", b"")]);
        assert!(matches!(e, ArchiveError::NotADirectory { .. }), "{e}");
        // A file beneath a symlinked directory would be written through the link.
        let e = refuse(&[E::Symlink("s", "d"), E::File("s/x", b"")]);
        assert!(matches!(e, ArchiveError::NotADirectory { .. }), "{e}");
        // A directory listed twice is fine.
        assert!(normalise(
            &tar_gz(&[E::Dir("d/"), E::File("d/x", b""), E::Dir("d")]),
            &LIMITS
        )
        .is_ok());
    }

    #[test]
    fn refuses_control_characters() {
        let e = refuse(&[E::File("a\nb.tf", b"")]);
        assert!(matches!(e, ArchiveError::BadName { .. }), "{e}");
    }

    #[test]
    fn detects_backend_in_root_module_only() {
        let backend = b"terraform {\n  backend \"s3\" {}\n}\n";
        let ws = normalise(&tar_gz(&[E::File("backend.tf", backend)]), &LIMITS).unwrap();
        assert!(ws.declares_backend);
        let ws = normalise(
            &tar_gz(&[E::File("modules/m/backend.tf", backend)]),
            &LIMITS,
        )
        .unwrap();
        assert!(!ws.declares_backend);
        let json = br#"{"terraform": {"cloud": {}}}"#;
        let ws = normalise(&tar_gz(&[E::File("main.tf.json", json)]), &LIMITS).unwrap();
        assert!(ws.declares_backend);
        let ws = normalise(
            &tar_gz(&[
                E::File("shared/b.tf", backend),
                E::Symlink("b.tf", "shared/b.tf"),
            ]),
            &LIMITS,
        )
        .unwrap();
        assert!(ws.declares_backend);
        let ws = normalise(&tar_gz(&[E::File(".terraform.lock.hcl", b"")]), &LIMITS).unwrap();
        assert!(ws.has_lock_file);
    }

    #[test]
    fn add_file_refuses_existing_paths() {
        let mut ws = normalise(&tar_gz(&[E::File("delegate_backend.tf", b"")]), &LIMITS).unwrap();
        assert!(ws.add_file("delegate_backend.tf", b"x").is_err());
        ws.add_file(".delegate/plan.tfplan", b"plan").unwrap();
        let listed = list(&ws.into_tar().unwrap());
        let plan = listed
            .iter()
            .find(|l| l.0 == "workspace/.delegate/plan.tfplan")
            .unwrap();
        assert_eq!(plan.6, b"plan");
        assert_eq!((plan.2, plan.3), (SANDBOX_UID, SANDBOX_GID));
    }

    #[test]
    fn the_mirror_cli_config_is_the_agents_to_write() {
        // A workspace cannot bring its own: the name is under the reserved `.delegate/`.
        let e = normalise(
            &tar_gz(&[E::File(crate::mirror::CLI_CONFIG_REL, b"direct {}")]),
            &LIMITS,
        )
        .unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        // The agent's goes in next to the plan file, readable by the sandbox user.
        let mut ws = normalise(&tar_gz(&[E::File("main.tf", b"")]), &LIMITS).unwrap();
        let setup = crate::mirror::setup(&crate::mirror::ProviderMirror::Network(
            "https://mirror.internal/providers/".into(),
        ));
        ws.add_file(".delegate/plan.tfplan", b"plan").unwrap();
        ws.add_file(crate::mirror::CLI_CONFIG_REL, setup.content.as_bytes())
            .unwrap();
        let listed = list(&ws.into_tar().unwrap());
        let rc = listed
            .iter()
            .find(|l| format!("/{}", l.0) == setup.file_path)
            .unwrap();
        assert_eq!(rc.6, setup.content.as_bytes());
        assert_eq!((rc.2, rc.3), (SANDBOX_UID, SANDBOX_GID));
    }
}
