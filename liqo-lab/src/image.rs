//! OCI image archives built on this machine, with no registry and no docker.
//!
//! An [`ImageSpec`] describes a one-layer image: its reference name, its run configuration
//! (entrypoint, cmd, env, working directory) and its root filesystem as a list of entries
//! (regular files from the host or from bytes, directories, symlinks). [`write_oci_archive`]
//! writes it as one tar file holding an
//! [OCI image layout](https://github.com/opencontainers/image-spec/blob/main/image-layout.md):
//!
//! ```text
//! oci-layout                 {"imageLayoutVersion":"1.0.0"}
//! index.json                 one manifest descriptor, named by its annotations
//! blobs/sha256/<digest>      the manifest, the config and the layer (tar+gzip)
//! ```
//!
//! which is what `ctr -a <socket> -n k8s.io images import <archive.tar>` takes. The manifest
//! descriptor carries the annotation `io.containerd.image.name` (the full name, which containerd
//! uses on import) and `org.opencontainers.image.ref.name` (the tag, as containerd's own exporter
//! writes it).
//!
//! ## Reproducible
//! The same spec (and the same bytes of its host files) always gives the same archive, byte for
//! byte, hence the same digests: entries are sorted by path, every tar header has mtime 0, uid and
//! gid 0 and no user or group name, the gzip header has mtime 0 and no file name, the compression
//! level is fixed (6, with flate2's pure-Rust backend), and the JSON documents have a fixed field
//! order and no creation date.
//!
//! ## Ready-made images
//! [`busybox_image`] is a workload image made of the host's static busybox (Debian package
//! `busybox-static`); [`pause_image`] is the same filesystem as a pod sandbox image.
//!
//! ```no_run
//! # fn demo() -> Result<(), liqo_lab::LabError> {
//! use std::path::Path;
//!
//! let spec = liqo_lab::busybox_image("liqo.lab/busybox:local")?
//!     .file("/etc/motd", "hello\n", 0o644)
//!     .env("GREETING", "hello");
//! let digests = liqo_lab::write_oci_archive(&spec, Path::new("/tmp/busybox.tar"))?;
//! println!("manifest {}", digests.manifest);
//! # Ok(())
//! # }
//! ```

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use flate2::{Compression, GzBuilder};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::error::{LabError, Result};

/// Media type of the image configuration.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of the image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of the image index (`index.json`).
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of the (only) layer: a gzip-compressed tar of the root filesystem.
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation of the manifest descriptor in `index.json` containerd names the image by.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation of the manifest descriptor in `index.json` holding the image's tag.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where [`busybox_image`] and [`pause_image`] take busybox from.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// The busybox applets [`busybox_image`] links in `/bin` (each a symlink to `busybox`).
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ash", "cat", "echo", "ls", "sleep", "wget", "httpd", "nc", "ping", "ps", "env",
    "hostname", "id", "mkdir", "rm", "cp", "mv", "date", "grep", "head", "tail", "true", "false",
    "kill", "ip", "ifconfig", "nslookup", "tee", "touch", "wc", "sed", "awk", "uname", "timeout",
    "printf", "test",
];

/// `PATH` of the busybox images.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The gzip level of the layer. Changing it changes every digest.
const GZIP_LEVEL: u32 = 6;
/// The gzip header's "operating system" byte: 255, unknown (flate2's default, set explicitly).
const GZIP_OS_UNKNOWN: u8 = 255;

/// Mode of the directories added because an entry lies below them.
const PARENT_DIR_MODE: u32 = 0o755;

/// A one-layer OCI image to write with [`write_oci_archive`].
///
/// Paths inside the image are absolute Linux paths (`/bin/sh`; a missing leading `/` is
/// assumed, `.` components and repeated slashes are ignored, `..` is refused). When two entries
/// have the same path the last one added wins. The parent directories of every entry are added
/// with mode 0755 unless given; a parent that is given as a file or a symlink is an error.
/// Modes are the permission bits and setuid/setgid/sticky (`0o7777` at most). Every entry is
/// owned by root (uid and gid 0).
///
/// Host files are read when the archive is written, not when they are added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageSpec {
    name: String,
    architecture: String,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<(String, String)>,
    working_dir: Option<String>,
    entries: Vec<(String, Entry)>,
}

/// One entry of the root filesystem, as added to the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    File { source: FileSource, mode: u32 },
    Dir { mode: u32 },
    Symlink { target: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FileSource {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

impl ImageSpec {
    /// An image with an empty root filesystem and no run configuration.
    ///
    /// `name` is the image reference containerd records on import, with its tag, e.g.
    /// `liqo.lab/busybox:local`. Kubelets look images up by their normalized name, so give a
    /// domain (`liqo.lab/...`): a name without one is `docker.io/library/...` to them.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            architecture: build_architecture().to_owned(),
            entrypoint: None,
            cmd: None,
            env: Vec::new(),
            working_dir: None,
            entries: Vec::new(),
        }
    }

    /// The image reference name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OCI architecture in the config (`amd64`, `arm64`, ...).
    pub fn architecture_name(&self) -> &str {
        &self.architecture
    }

    /// Sets the OCI architecture of the config; the default is the one this crate was built for
    /// (`amd64` for `x86_64`, `arm64` for `aarch64`, ...). Host files are copied as they are:
    /// they must be binaries of that architecture.
    pub fn architecture(mut self, architecture: impl Into<String>) -> Self {
        self.architecture = architecture.into();
        self
    }

    /// Sets the entrypoint (`config.Entrypoint`).
    pub fn entrypoint<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.entrypoint = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Sets the command (`config.Cmd`): the entrypoint's arguments, or the command itself when
    /// there is no entrypoint.
    pub fn cmd<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cmd = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Sets the environment variable `key` (`config.Env`), replacing an earlier value.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let (key, value) = (key.into(), value.into());
        match self.env.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.env.push((key, value)),
        }
        self
    }

    /// Sets the working directory (`config.WorkingDir`), an absolute path.
    pub fn working_dir(mut self, dir: impl Into<String>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// Adds the regular file `path` with the content of the host file `host_path`.
    pub fn file_from_host(
        mut self,
        path: impl Into<String>,
        host_path: impl Into<PathBuf>,
        mode: u32,
    ) -> Self {
        let source = FileSource::Host(host_path.into());
        self.entries
            .push((path.into(), Entry::File { source, mode }));
        self
    }

    /// Adds the regular file `path` with the content `bytes`.
    pub fn file(mut self, path: impl Into<String>, bytes: impl Into<Vec<u8>>, mode: u32) -> Self {
        let source = FileSource::Bytes(bytes.into());
        self.entries
            .push((path.into(), Entry::File { source, mode }));
        self
    }

    /// Adds the directory `path`.
    pub fn dir(mut self, path: impl Into<String>, mode: u32) -> Self {
        self.entries.push((path.into(), Entry::Dir { mode }));
        self
    }

    /// Adds the symlink `path` pointing at `target` (relative to the link's directory, or
    /// absolute inside the image).
    pub fn symlink(mut self, path: impl Into<String>, target: impl Into<String>) -> Self {
        let target = target.into();
        self.entries.push((path.into(), Entry::Symlink { target }));
        self
    }

    /// Adds the host program `host_path` at `path` (mode 0755) with the shared libraries it
    /// loads and the dynamic loader, each at its host path, as `ldd` lists them; a static program
    /// is added alone. So an image can carry tools such as `nft` or `ip` from this machine.
    pub fn program_from_host(self, path: impl Into<String>, host_path: &Path) -> Result<Self> {
        let libs = shared_libraries(&self.name, host_path)?;
        let mut spec = self.file_from_host(path, host_path, 0o755);
        for lib in libs {
            let p = lib.display().to_string();
            spec = spec.file_from_host(p, lib, 0o755);
        }
        Ok(spec)
    }

    fn error(&self, message: impl Into<String>) -> LabError {
        LabError::Image {
            image: self.name.clone(),
            message: message.into(),
        }
    }
}

/// The digests of an image written by [`write_oci_archive`], each `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageDigests {
    /// The manifest: what containerd lists as the image's digest.
    pub manifest: String,
    /// The image configuration: the image id.
    pub config: String,
    /// The compressed layer blob.
    pub layer: String,
    /// The uncompressed layer tar (`rootfs.diff_ids[0]` of the config).
    pub diff_id: String,
}

/// Writes `spec` to `out` as one tar file holding an OCI image layout, ready for
/// `ctr images import`, and returns its digests.
///
/// The archive is byte-for-byte reproducible: the same spec (and the same bytes of its host
/// files) always gives the same archive, hence the same digests. Entries are sorted by path,
/// every tar header has mtime 0, uid and gid 0 and no user or group name, the gzip header has
/// mtime 0 and no file name, the compression level is fixed (6, with flate2's pure-Rust
/// backend), and the JSON documents have a fixed field order and no creation date.
///
/// It is written next to `out` first and renamed, so `out` is never left half written.
///
/// # Errors
/// [`LabError::Image`] when the spec is not usable (bad name, path, mode or env key, an entry
/// below a file or a symlink), [`LabError::ImageSource`] when a host file cannot be read,
/// [`LabError::Io`] when `out` cannot be written.
pub fn write_oci_archive(spec: &ImageSpec, out: &Path) -> Result<ImageDigests> {
    let tag = validate_name(spec)?;
    let tree = build_tree(spec)?;
    let layer = write_layer(spec, &tree)?;

    let config = ImageConfig {
        architecture: &spec.architecture,
        os: "linux",
        config: RunConfig {
            env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            entrypoint: spec.entrypoint.as_deref(),
            cmd: spec.cmd.as_deref(),
            working_dir: spec.working_dir.as_deref(),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: [layer.diff_id.clone()],
        },
    };
    let config = json(spec, "config", &config)?;
    let config_digest = sha256_digest(&config);
    let layer_digest = sha256_digest(&layer.blob);

    let manifest = Manifest {
        schema_version: 2,
        media_type: MEDIA_TYPE_MANIFEST,
        config: Descriptor::new(MEDIA_TYPE_CONFIG, &config_digest, &config),
        layers: [Descriptor::new(
            MEDIA_TYPE_LAYER,
            &layer_digest,
            &layer.blob,
        )],
    };
    let manifest = json(spec, "manifest", &manifest)?;
    let manifest_digest = sha256_digest(&manifest);

    let mut manifest_descriptor = Descriptor::new(MEDIA_TYPE_MANIFEST, &manifest_digest, &manifest);
    manifest_descriptor.annotations = Some(BTreeMap::from([
        (ANNOTATION_CONTAINERD_NAME, spec.name.as_str()),
        (ANNOTATION_REF_NAME, tag),
    ]));
    let index = Index {
        schema_version: 2,
        media_type: MEDIA_TYPE_INDEX,
        manifests: [manifest_descriptor],
    };
    let index = json(spec, "index", &index)?;
    let layout = json(
        spec,
        "oci-layout",
        &OciLayout {
            image_layout_version: "1.0.0",
        },
    )?;

    let mut blobs = BTreeMap::new();
    for (digest, bytes) in [
        (&config_digest, &config),
        (&layer_digest, &layer.blob),
        (&manifest_digest, &manifest),
    ] {
        let hex = digest.trim_start_matches("sha256:");
        blobs.insert(format!("blobs/sha256/{hex}"), bytes.as_slice());
    }
    let mut files: Vec<(String, &[u8])> = blobs.into_iter().collect();
    files.push(("index.json".to_owned(), &index));
    files.push(("oci-layout".to_owned(), &layout));

    write_atomically(out, |w| {
        let mut archive = tar::Builder::new(w);
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut header = tar_header(EntryType::Directory, 0o755, 0);
            archive.append_data(&mut header, dir, io::empty())?;
        }
        for (path, bytes) in &files {
            let mut header = tar_header(EntryType::Regular, 0o644, bytes.len() as u64);
            archive.append_data(&mut header, path, *bytes)?;
        }
        archive.into_inner()?.flush()
    })?;

    Ok(ImageDigests {
        manifest: manifest_digest,
        config: config_digest,
        layer: layer_digest,
        diff_id: layer.diff_id,
    })
}

/// The workload image made of the host's static busybox ([`HOST_BUSYBOX`]), named `name`.
///
/// `/bin/busybox` with the symlinks `/bin/<applet>` -> `busybox` of [`BUSYBOX_APPLETS`], `/tmp`
/// (mode 1777), `/root` (0700), empty `/dev`, `/proc` and `/sys`, `/etc/passwd` and `/etc/group`
/// with `root` and `nobody`; `PATH` set, Cmd `["sh"]`, working directory `/`.
///
/// # Errors
/// [`LabError::Busybox`] when [`HOST_BUSYBOX`] is missing or not a static binary (the Debian
/// package `busybox-static` provides it; the dynamic one of package `busybox` would need a libc
/// in the image).
pub fn busybox_image(name: impl Into<String>) -> Result<ImageSpec> {
    busybox_image_from(name, Path::new(HOST_BUSYBOX))
}

/// The shared libraries (and loader) `program` needs, resolved by `ldd` to real files.
fn shared_libraries(image: &str, program: &Path) -> Result<Vec<PathBuf>> {
    let fail = |message: String| LabError::Image {
        image: image.to_owned(),
        message,
    };
    let out = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| fail(format!("running ldd on {}: {e}", program.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd exits non-zero for static programs ("not a dynamic executable").
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(fail(format!(
            "ldd {} failed: {}",
            program.display(),
            err.trim()
        )));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("statically linked") {
            return Ok(Vec::new());
        }
        if line.contains("not found") {
            return Err(fail(format!(
                "{} needs a library this machine lacks: {line}",
                program.display()
            )));
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = line
            .split_once("=>")
            .map_or(line, |(_, p)| p)
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// [`busybox_image`] with busybox taken from `busybox`, a static binary.
///
/// # Errors
/// [`LabError::Busybox`] when `busybox` is missing or not a static binary.
pub fn busybox_image_from(name: impl Into<String>, busybox: &Path) -> Result<ImageSpec> {
    check_static_binary(busybox)?;
    let mut spec = ImageSpec::new(name)
        .dir("/bin", 0o755)
        .file_from_host("/bin/busybox", busybox, 0o755)
        .dir("/dev", 0o755)
        .dir("/etc", 0o755)
        .file(
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        )
        .file("/etc/group", "root:x:0:\nnobody:x:65534:\n", 0o644)
        .dir("/proc", 0o555)
        .dir("/root", 0o700)
        .dir("/sys", 0o555)
        .dir("/tmp", 0o1777)
        .env("PATH", DEFAULT_PATH.trim_start_matches("PATH="))
        .working_dir("/")
        .cmd(["sh"]);
    for applet in BUSYBOX_APPLETS {
        spec = spec.symlink(format!("/bin/{applet}"), "busybox");
    }
    Ok(spec)
}

/// The pod sandbox ("pause") image, named `name`: the filesystem of [`busybox_image`] with the
/// entrypoint `/bin/sleep infinity` and no command.
///
/// A sandbox only holds the pod's namespaces. As PID 1, busybox's `sleep` ignores SIGTERM (the
/// kernel drops signals PID 1 has no handler for), which is fine: containerd stops sandboxes with
/// SIGKILL, and a SIGKILL sent from the parent namespace always ends it. Zombies are not reaped,
/// but the sandbox runs no other process.
///
/// # Errors
/// As [`busybox_image`].
pub fn pause_image(name: impl Into<String>) -> Result<ImageSpec> {
    pause_image_from(name, Path::new(HOST_BUSYBOX))
}

/// [`pause_image`] with busybox taken from `busybox`, a static binary.
///
/// # Errors
/// [`LabError::Busybox`] when `busybox` is missing or not a static binary.
pub fn pause_image_from(name: impl Into<String>, busybox: &Path) -> Result<ImageSpec> {
    let mut spec = busybox_image_from(name, busybox)?.entrypoint(["/bin/sleep", "infinity"]);
    spec.cmd = None;
    Ok(spec)
}

/// The OCI (Go) name of the architecture this crate was built for.
fn build_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        "mips" if cfg!(target_endian = "little") => "mipsle",
        // arm, riscv64, s390x, powerpc64 (big endian), mips64, mips: the same names in Go.
        other => other,
    }
}

/// Checks the image name and returns its tag.
fn validate_name(spec: &ImageSpec) -> Result<&str> {
    let name = spec.name.as_str();
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(spec.error("the image name must be non-empty, without spaces"));
    }
    if name.contains('@') {
        return Err(spec.error("the image name must be name:tag, not a digest reference"));
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        Some((repo, tag)) if !repo.is_empty() && !tag.is_empty() && !tag.contains(':') => Ok(tag),
        _ => Err(spec.error(
            "the image name must end with a tag (e.g. liqo.lab/busybox:local): kubelets pull \
             untagged images as :latest",
        )),
    }
}

/// The normalized image path (`bin/sh`: relative, no `.` or empty components), or why not.
fn normalize(path: &str) -> Result<String, String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("path {path:?} has a `..` component")),
            part if part.contains('\0') => return Err(format!("path {path:?} has a NUL byte")),
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(format!(
            "path {path:?} is the root directory, which every image has"
        ));
    }
    Ok(parts.join("/"))
}

/// The root filesystem: normalized path -> entry, parent directories added and checked.
fn build_tree(spec: &ImageSpec) -> Result<BTreeMap<String, &Entry>> {
    static PARENT_DIR: Entry = Entry::Dir {
        mode: PARENT_DIR_MODE,
    };
    let mut tree = BTreeMap::new();
    for (path, entry) in &spec.entries {
        let normalized = normalize(path).map_err(|m| spec.error(m))?;
        match entry {
            Entry::File { mode, .. } | Entry::Dir { mode } if *mode > 0o7777 => {
                return Err(spec.error(format!(
                    "mode {mode:#o} of {path:?} has bits above 0o7777 (give permission, setuid, \
                     setgid and sticky bits only)"
                )));
            }
            Entry::Symlink { target } if target.is_empty() || target.contains('\0') => {
                return Err(spec.error(format!(
                    "symlink {path:?} has an empty target or one with a NUL byte"
                )));
            }
            _ => {}
        }
        tree.insert(normalized, entry);
    }
    let paths: Vec<String> = tree.keys().cloned().collect();
    for path in &paths {
        let mut parent = path.as_str();
        while let Some((up, _)) = parent.rsplit_once('/') {
            parent = up;
            match tree.get(parent) {
                None => {
                    tree.insert(parent.to_owned(), &PARENT_DIR);
                }
                Some(Entry::Dir { .. }) => {}
                Some(Entry::File { .. }) => {
                    return Err(spec.error(format!(
                        "/{path} lies below /{parent}, which is a regular file"
                    )));
                }
                Some(Entry::Symlink { .. }) => {
                    return Err(spec.error(format!(
                        "/{path} lies below /{parent}, which is a symlink (give the path through \
                         the symlink's target)"
                    )));
                }
            }
        }
    }
    if let Some(dir) = &spec.working_dir
        && !dir.starts_with('/')
    {
        return Err(spec.error(format!(
            "the working directory {dir:?} is not an absolute path"
        )));
    }
    for (key, _) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(spec.error(format!(
                "environment variable name {key:?} is empty or has `=` or a NUL byte"
            )));
        }
    }
    Ok(tree)
}

struct Layer {
    /// The gzip-compressed tar.
    blob: Vec<u8>,
    /// `sha256:` of the uncompressed tar.
    diff_id: String,
}

/// Writes the root filesystem as a tar (hashed as it goes: the diff id) compressed with gzip.
fn write_layer(spec: &ImageSpec, tree: &BTreeMap<String, &Entry>) -> Result<Layer> {
    let gzip = GzBuilder::new()
        .mtime(0)
        .operating_system(GZIP_OS_UNKNOWN)
        .write(Vec::new(), Compression::new(GZIP_LEVEL));
    let mut archive = tar::Builder::new(HashingWriter {
        inner: gzip,
        hasher: Sha256::new(),
    });
    let layer_error = |e: io::Error| spec.error(format!("writing the layer: {e}"));
    for (path, entry) in tree {
        match entry {
            Entry::Dir { mode } => {
                let mut header = tar_header(EntryType::Directory, *mode, 0);
                archive
                    .append_data(&mut header, format!("{path}/"), io::empty())
                    .map_err(layer_error)?;
            }
            Entry::Symlink { target } => {
                let mut header = tar_header(EntryType::Symlink, 0o777, 0);
                archive
                    .append_link(&mut header, path, target)
                    .map_err(layer_error)?;
            }
            Entry::File { source, mode } => {
                let host;
                let bytes = match source {
                    FileSource::Bytes(bytes) => bytes.as_slice(),
                    FileSource::Host(host_path) => {
                        host = fs::read(host_path).map_err(|source| LabError::ImageSource {
                            image: spec.name.clone(),
                            entry: format!("/{path}"),
                            host_path: host_path.clone(),
                            source,
                        })?;
                        host.as_slice()
                    }
                };
                let mut header = tar_header(EntryType::Regular, *mode, bytes.len() as u64);
                archive
                    .append_data(&mut header, path, bytes)
                    .map_err(layer_error)?;
            }
        }
    }
    let hashing = archive.into_inner().map_err(layer_error)?;
    let diff_id = format!("sha256:{:x}", hashing.hasher.finalize());
    let blob = hashing.inner.finish().map_err(layer_error)?;
    Ok(Layer { blob, diff_id })
}

/// A tar header with everything that could vary from machine to machine set to zero: mtime,
/// uid, gid, no user or group name (a fresh GNU header has them all zero).
fn tar_header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// Hashes what goes through it (the uncompressed layer).
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn json(spec: &ImageSpec, what: &str, value: &impl Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| spec.error(format!("serializing the {what}: {e}")))
}

/// Writes `out` through a temporary file next to it, renamed when complete.
fn write_atomically(
    out: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<()> {
    let file_name = out
        .file_name()
        .ok_or_else(|| {
            LabError::io(
                "writing the OCI archive",
                out,
                io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
            )
        })?
        .to_string_lossy();
    let partial = out.with_file_name(format!(".{file_name}.partial-{}", std::process::id()));
    let written = File::create(&partial).and_then(|file| {
        let mut w = BufWriter::new(file);
        write(&mut w)?;
        w.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&partial);
        return Err(LabError::io("writing the OCI archive", &partial, e));
    }
    fs::rename(&partial, out).map_err(|e| {
        let _ = fs::remove_file(&partial);
        LabError::io("renaming the OCI archive into place at", out, e)
    })
}

/// Fails unless `path` is an ELF binary without an interpreter (`PT_INTERP`), i.e. static.
fn check_static_binary(path: &Path) -> Result<()> {
    let fail = |message: String| LabError::Busybox {
        path: path.to_owned(),
        message,
    };
    let bytes = fs::read(path).map_err(|e| fail(format!("cannot be read ({e})")))?;
    match elf_interpreter(&bytes) {
        Err(why) => Err(fail(format!("is not a usable ELF binary: {why}"))),
        Ok(Some(interp)) => Err(fail(format!(
            "is dynamically linked (ELF interpreter {interp}), and the image has no libc"
        ))),
        Ok(None) => Ok(()),
    }
}

/// The ELF interpreter (`PT_INTERP`) of a binary: `None` for a static one.
fn elf_interpreter(elf: &[u8]) -> Result<Option<String>, String> {
    const PT_INTERP: u32 = 3;
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("no ELF magic".to_owned());
    }
    let little = match elf.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Err("unknown byte order".to_owned()),
    };
    let read = |offset: usize, len: usize| -> Result<u64, String> {
        let field = offset
            .checked_add(len)
            .and_then(|end| elf.get(offset..end))
            .ok_or_else(|| format!("truncated at byte {offset}"))?;
        let mut value = 0u64;
        for i in 0..len {
            let byte = if little { field[len - 1 - i] } else { field[i] };
            value = value << 8 | u64::from(byte);
        }
        Ok(value)
    };
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| format!("offset {v} out of range"));
    // (e_phoff, e_phentsize, e_phnum, p_offset, p_filesz) offsets and widths.
    let (phoff, phentsize, phnum, p_offset, p_filesz, word) = match elf.get(4) {
        Some(1) => (
            read(0x1c, 4)?,
            read(0x2a, 2)?,
            read(0x2c, 2)?,
            0x04,
            0x10,
            4,
        ),
        Some(2) => (
            read(0x20, 8)?,
            read(0x36, 2)?,
            read(0x38, 2)?,
            0x08,
            0x20,
            8,
        ),
        _ => return Err("unknown ELF class".to_owned()),
    };
    for i in 0..phnum {
        let ph = to_usize(phoff + i * phentsize)?;
        if read(ph, 4)? == u64::from(PT_INTERP) {
            let start = to_usize(read(ph + p_offset, word)?)?;
            let len = to_usize(read(ph + p_filesz, word)?)?;
            let interp = start
                .checked_add(len)
                .and_then(|end| elf.get(start..end))
                .map(|b| String::from_utf8_lossy(b).trim_end_matches('\0').to_owned())
                .unwrap_or_else(|| "(out of the file)".to_owned());
            return Ok(Some(interp));
        }
    }
    Ok(None)
}

#[derive(Serialize)]
struct OciLayout {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: &'static str,
}

#[derive(Serialize)]
struct ImageConfig<'a> {
    architecture: &'a str,
    os: &'static str,
    config: RunConfig<'a>,
    rootfs: RootFs,
}

#[derive(Serialize)]
struct RunConfig<'a> {
    #[serde(rename = "Env", skip_serializing_if = "Vec::is_empty")]
    env: Vec<String>,
    #[serde(rename = "Entrypoint", skip_serializing_if = "Option::is_none")]
    entrypoint: Option<&'a [String]>,
    #[serde(rename = "Cmd", skip_serializing_if = "Option::is_none")]
    cmd: Option<&'a [String]>,
    #[serde(rename = "WorkingDir", skip_serializing_if = "Option::is_none")]
    working_dir: Option<&'a str>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: [String; 1],
}

#[derive(Serialize)]
struct Descriptor<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    digest: &'a str,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<&'static str, &'a str>>,
}

impl<'a> Descriptor<'a> {
    fn new(media_type: &'static str, digest: &'a str, blob: &[u8]) -> Self {
        Self {
            media_type,
            digest,
            size: blob.len() as u64,
            annotations: None,
        }
    }
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: Descriptor<'a>,
    layers: [Descriptor<'a>; 1],
}

#[derive(Serialize)]
struct Index<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: [Descriptor<'a>; 1],
}

#[cfg(test)]
mod tests {
    #[test]
    fn programs_come_with_their_libraries() {
        let paths = |spec: &super::ImageSpec| -> Vec<String> {
            spec.entries.iter().map(|(p, _)| p.clone()).collect()
        };
        // `ip` (iproute2, on every machine the lab runs on) is dynamically linked.
        let spec = super::ImageSpec::new("t/ip:1")
            .program_from_host("/usr/sbin/ip", std::path::Path::new("/usr/sbin/ip"))
            .expect("ip");
        let got = paths(&spec);
        assert!(got.contains(&"/usr/sbin/ip".to_owned()), "{got:?}");
        assert!(got.iter().any(|p| p.contains("libc.so")), "{got:?}");
        assert!(got.iter().any(|p| p.contains("ld-linux")), "{got:?}");
        // The static busybox comes alone.
        let spec = super::ImageSpec::new("t/bb:1")
            .program_from_host("/bin/busybox", std::path::Path::new(super::HOST_BUSYBOX))
            .expect("busybox");
        assert_eq!(paths(&spec), vec!["/bin/busybox".to_owned()]);
        // A missing program is an error naming it.
        let err = super::ImageSpec::new("t/none:1")
            .program_from_host("/x", std::path::Path::new("/no/such/program"))
            .expect_err("missing");
        assert!(err.to_string().contains("/no/such/program"), "{err}");
    }

    use std::io::Read;

    use flate2::read::GzDecoder;
    use serde_json::Value;

    use super::*;

    /// A directory removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("liqo-lab-image-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// One entry of a tar archive as read back.
    #[derive(Debug)]
    struct TarEntry {
        path: String,
        kind: EntryType,
        mode: u32,
        link: Option<String>,
        data: Vec<u8>,
    }

    /// Reads a tar archive, checking that every header is normalized (mtime, owners).
    fn read_tar(bytes: &[u8]) -> Vec<TarEntry> {
        let mut archive = tar::Archive::new(bytes);
        let mut out = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
            assert_eq!(header.mtime().unwrap(), 0, "mtime of {path}");
            assert_eq!(header.uid().unwrap(), 0, "uid of {path}");
            assert_eq!(header.gid().unwrap(), 0, "gid of {path}");
            assert_eq!(header.username_bytes(), Some(&b""[..]), "user of {path}");
            assert_eq!(header.groupname_bytes(), Some(&b""[..]), "group of {path}");
            let link = entry
                .link_name_bytes()
                .map(|l| String::from_utf8(l.into_owned()).unwrap());
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.push(TarEntry {
                path,
                kind: header.entry_type(),
                mode: header.mode().unwrap(),
                link,
                data,
            });
        }
        out
    }

    fn find<'a>(entries: &'a [TarEntry], path: &str) -> &'a TarEntry {
        entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no {path} in {:?}", paths(entries)))
    }

    fn paths(entries: &[TarEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.path.as_str()).collect()
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    /// The blob a descriptor points at, checked against its digest and size.
    fn blob<'a>(entries: &'a [TarEntry], descriptor: &Value) -> &'a [u8] {
        let digest = descriptor["digest"].as_str().unwrap();
        let hex = digest.strip_prefix("sha256:").unwrap();
        let data = &find(entries, &format!("blobs/sha256/{hex}")).data;
        assert_eq!(sha256_hex(data), hex, "content of blob {digest}");
        assert_eq!(
            descriptor["size"].as_u64().unwrap(),
            data.len() as u64,
            "size of blob {digest}"
        );
        data
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
        out
    }

    /// A spec with each kind of entry; `host` is a host file to copy.
    fn sample(host: &Path, reversed: bool) -> ImageSpec {
        let mut spec = ImageSpec::new("liqo.lab/sample:v1")
            .entrypoint(["/bin/tool", "--flag"])
            .cmd(["arg"])
            .env("A", "1")
            .env("B", "two words")
            .working_dir("/work");
        let entries: Vec<Box<dyn Fn(ImageSpec) -> ImageSpec>> = vec![
            Box::new(|s| s.file_from_host("/bin/tool", host, 0o755)),
            Box::new(|s| s.file("/etc/config.txt", "key=value\n", 0o600)),
            Box::new(|s| s.dir("/work", 0o750)),
            Box::new(|s| s.dir("/tmp", 0o1777)),
            Box::new(|s| s.symlink("/usr/bin/tool", "../../bin/tool")),
            Box::new(|s| s.file("/deep/down/below/file", vec![0u8, 1, 2, 255], 0o644)),
        ];
        let order: Vec<_> = if reversed {
            entries.iter().rev().collect()
        } else {
            entries.iter().collect()
        };
        for add in order {
            spec = add(spec);
        }
        spec
    }

    #[test]
    fn the_same_spec_gives_the_same_bytes() {
        let dir = TempDir::new("same");
        let host = dir.0.join("tool");
        fs::write(&host, b"#!/bin/sh\necho tool\n").unwrap();
        let (one, two, three) = (
            dir.0.join("one.tar"),
            dir.0.join("two.tar"),
            dir.0.join("three.tar"),
        );
        let first = write_oci_archive(&sample(&host, false), &one).unwrap();
        let second = write_oci_archive(&sample(&host, false), &two).unwrap();
        // Entries added in another order: the same image.
        let third = write_oci_archive(&sample(&host, true), &three).unwrap();
        assert_eq!(first, second);
        assert_eq!(first, third);
        let bytes = fs::read(&one).unwrap();
        assert_eq!(bytes, fs::read(&two).unwrap());
        assert_eq!(bytes, fs::read(&three).unwrap());
        // No temporary file is left next to the archives.
        let mut names: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["one.tar", "three.tar", "tool", "two.tar"]);

        // Any change of content or configuration changes the digests.
        fs::write(&host, b"#!/bin/sh\necho tool 2\n").unwrap();
        let changed = write_oci_archive(&sample(&host, false), &two).unwrap();
        assert_ne!(changed.diff_id, first.diff_id);
        assert_ne!(changed.manifest, first.manifest);
        let other_cmd = sample(&host, false).cmd(["other"]);
        let other = write_oci_archive(&other_cmd, &two).unwrap();
        assert_eq!(other.diff_id, changed.diff_id);
        assert_ne!(other.config, changed.config);
        assert_ne!(other.manifest, changed.manifest);
    }

    #[test]
    fn the_archive_is_a_consistent_oci_layout() {
        let dir = TempDir::new("layout");
        let host = dir.0.join("tool");
        fs::write(&host, b"tool binary").unwrap();
        let out = dir.0.join("image.tar");
        let digests = write_oci_archive(&sample(&host, false), &out).unwrap();
        let outer = read_tar(&fs::read(&out).unwrap());

        let names = paths(&outer);
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "outer entries are sorted");
        assert_eq!(names.len(), 7, "{names:?}"); // 2 dirs, 3 blobs, index.json, oci-layout
        assert_eq!(find(&outer, "blobs/").kind, EntryType::Directory);
        assert_eq!(find(&outer, "blobs/sha256/").kind, EntryType::Directory);

        let layout: Value = serde_json::from_slice(&find(&outer, "oci-layout").data).unwrap();
        assert_eq!(layout, serde_json::json!({"imageLayoutVersion": "1.0.0"}));

        let index: Value = serde_json::from_slice(&find(&outer, "index.json").data).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["mediaType"], MEDIA_TYPE_INDEX);
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1);
        let descriptor = &manifests[0];
        assert_eq!(descriptor["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(descriptor["digest"], digests.manifest.as_str());
        assert_eq!(
            descriptor["annotations"],
            serde_json::json!({
                ANNOTATION_CONTAINERD_NAME: "liqo.lab/sample:v1",
                ANNOTATION_REF_NAME: "v1",
            })
        );

        let manifest: Value = serde_json::from_slice(blob(&outer, descriptor)).unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(manifest["config"]["mediaType"], MEDIA_TYPE_CONFIG);
        assert_eq!(manifest["config"]["digest"], digests.config.as_str());
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0]["mediaType"], MEDIA_TYPE_LAYER);
        assert_eq!(layers[0]["digest"], digests.layer.as_str());

        let config: Value = serde_json::from_slice(blob(&outer, &manifest["config"])).unwrap();
        assert_eq!(config["architecture"], build_architecture());
        if cfg!(target_arch = "x86_64") {
            assert_eq!(config["architecture"], "amd64");
        }
        assert_eq!(config["os"], "linux");
        assert_eq!(
            config["config"],
            serde_json::json!({
                "Env": ["A=1", "B=two words"],
                "Entrypoint": ["/bin/tool", "--flag"],
                "Cmd": ["arg"],
                "WorkingDir": "/work",
            })
        );
        assert_eq!(config["rootfs"]["type"], "layers");

        let layer = blob(&outer, &layers[0]);
        assert_eq!(&layer[..2], b"\x1f\x8b", "the layer is gzip");
        // gzip header: no flags (no file name), mtime 0, OS unknown.
        assert_eq!(layer[3], 0, "gzip flags");
        assert_eq!(&layer[4..8], &[0, 0, 0, 0], "gzip mtime");
        assert_eq!(layer[9], GZIP_OS_UNKNOWN);
        let tar = gunzip(layer);
        let diff_id = format!("sha256:{}", sha256_hex(&tar));
        assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([diff_id]));
        assert_eq!(digests.diff_id, diff_id);

        let rootfs = read_tar(&tar);
        let tool = find(&rootfs, "bin/tool");
        assert_eq!((tool.kind, tool.mode), (EntryType::Regular, 0o755));
        assert_eq!(tool.data, b"tool binary");
        let conf = find(&rootfs, "etc/config.txt");
        assert_eq!(
            (conf.mode, conf.data.as_slice()),
            (0o600, &b"key=value\n"[..])
        );
        let link = find(&rootfs, "usr/bin/tool");
        assert_eq!(link.kind, EntryType::Symlink);
        assert_eq!(link.link.as_deref(), Some("../../bin/tool"));
        assert_eq!(find(&rootfs, "tmp/").mode, 0o1777);
        assert_eq!(find(&rootfs, "work/").mode, 0o750);
        assert_eq!(find(&rootfs, "deep/down/below/file").data, [0, 1, 2, 255]);
        let names = paths(&rootfs);
        let mut sorted = names.clone();
        sorted.sort_by_key(|p| p.trim_end_matches('/'));
        assert_eq!(names, sorted, "layer entries are sorted");
    }

    #[test]
    fn parent_directories_are_added() {
        let dir = TempDir::new("parents");
        let out = dir.0.join("image.tar");
        let spec = ImageSpec::new("liqo.lab/parents:v1")
            .file("a/b/c/file.txt", "x", 0o644)
            .dir("/a/b", 0o700)
            .symlink("//x/./y/link", "/a");
        let digests = write_oci_archive(&spec, &out).unwrap();
        let outer = read_tar(&fs::read(&out).unwrap());
        let hex = digests.layer.trim_start_matches("sha256:");
        let layer = &find(&outer, &format!("blobs/sha256/{hex}")).data;
        let rootfs = read_tar(&gunzip(layer));
        let summary: Vec<_> = rootfs
            .iter()
            .map(|e| (e.path.as_str(), e.kind, e.mode))
            .collect();
        assert_eq!(
            summary,
            [
                ("a/", EntryType::Directory, 0o755),
                ("a/b/", EntryType::Directory, 0o700), // given: kept
                ("a/b/c/", EntryType::Directory, 0o755),
                ("a/b/c/file.txt", EntryType::Regular, 0o644),
                ("x/", EntryType::Directory, 0o755),
                ("x/y/", EntryType::Directory, 0o755),
                ("x/y/link", EntryType::Symlink, 0o777),
            ]
        );
    }

    #[test]
    fn a_missing_host_file_is_named() {
        let dir = TempDir::new("missing");
        let missing = dir.0.join("no-such-file");
        let spec = ImageSpec::new("liqo.lab/missing:v1").file_from_host("/bin/x", &missing, 0o755);
        let out = dir.0.join("image.tar");
        let err = write_oci_archive(&spec, &out).unwrap_err();
        match &err {
            LabError::ImageSource {
                image,
                entry,
                host_path,
                source,
            } => {
                assert_eq!(image, "liqo.lab/missing:v1");
                assert_eq!(entry, "/bin/x");
                assert_eq!(host_path, &missing);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("unexpected error {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
        assert!(message.contains("/bin/x"), "{message}");
        assert!(!out.exists(), "no archive is written");
    }

    #[test]
    fn unusable_specs_are_refused() {
        let dir = TempDir::new("refused");
        let out = dir.0.join("image.tar");
        let cases = [
            (ImageSpec::new(""), "non-empty"),
            (ImageSpec::new("liqo.lab/untagged"), "tag"),
            (ImageSpec::new("localhost:5000/untagged"), "tag"),
            (ImageSpec::new("liqo.lab/x@sha256:00"), "digest"),
            (
                ImageSpec::new("liqo.lab/x:v1").file("/a/../b", "", 0o644),
                "`..`",
            ),
            (
                ImageSpec::new("liqo.lab/x:v1").dir("/", 0o755),
                "root directory",
            ),
            (ImageSpec::new("liqo.lab/x:v1").dir("/d", 0o17777), "0o7777"),
            (
                ImageSpec::new("liqo.lab/x:v1").symlink("/l", ""),
                "empty target",
            ),
            (
                ImageSpec::new("liqo.lab/x:v1")
                    .file("/f", "", 0o644)
                    .file("/f/g", "", 0o644),
                "/f, which is a regular file",
            ),
            (
                ImageSpec::new("liqo.lab/x:v1")
                    .symlink("/lib", "usr/lib")
                    .file("/lib/g", "", 0o644),
                "/lib, which is a symlink",
            ),
            (ImageSpec::new("liqo.lab/x:v1").working_dir("w"), "absolute"),
            (ImageSpec::new("liqo.lab/x:v1").env("A=B", "c"), "`=`"),
        ];
        for (spec, expected) in cases {
            let err = write_oci_archive(&spec, &out).unwrap_err();
            assert!(matches!(err, LabError::Image { .. }), "{err:?}");
            let message = err.to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
            assert!(!out.exists());
        }
        // A tagged name with a registry port is fine.
        write_oci_archive(&ImageSpec::new("localhost:5000/ok:v1"), &out).unwrap();
    }

    #[test]
    fn the_busybox_and_pause_images() {
        let dir = TempDir::new("busybox");
        let busybox = busybox_image("liqo.lab/busybox:local").unwrap();
        assert_eq!(busybox.name(), "liqo.lab/busybox:local");
        let out = dir.0.join("busybox.tar");
        let digests = write_oci_archive(&busybox, &out).unwrap();
        let outer = read_tar(&fs::read(&out).unwrap());
        let hex = digests.layer.trim_start_matches("sha256:");
        let rootfs = read_tar(&gunzip(&find(&outer, &format!("blobs/sha256/{hex}")).data));
        let bin = find(&rootfs, "bin/busybox");
        assert_eq!(bin.mode, 0o755);
        assert_eq!(bin.data, fs::read(HOST_BUSYBOX).unwrap());
        for applet in BUSYBOX_APPLETS {
            let link = find(&rootfs, &format!("bin/{applet}"));
            assert_eq!(link.kind, EntryType::Symlink, "{applet}");
            assert_eq!(link.link.as_deref(), Some("busybox"), "{applet}");
        }
        assert_eq!(find(&rootfs, "tmp/").mode, 0o1777);
        let passwd = String::from_utf8(find(&rootfs, "etc/passwd").data.clone()).unwrap();
        assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
        assert!(passwd.contains("\nnobody:x:65534:65534:"), "{passwd}");
        let group = String::from_utf8(find(&rootfs, "etc/group").data.clone()).unwrap();
        assert_eq!(group, "root:x:0:\nnobody:x:65534:\n");

        let config = |outer: &[TarEntry], digest: &str| -> Value {
            let hex = digest.trim_start_matches("sha256:");
            serde_json::from_slice(&find(outer, &format!("blobs/sha256/{hex}")).data).unwrap()
        };
        let run = &config(&outer, &digests.config)["config"];
        assert_eq!(run["Cmd"], serde_json::json!(["sh"]));
        assert_eq!(run["Entrypoint"], Value::Null);
        assert!(run["Env"][0].as_str().unwrap().starts_with("PATH="));

        let pause = pause_image("liqo.lab/pause:local").unwrap();
        let pause_out = dir.0.join("pause.tar");
        let pause_digests = write_oci_archive(&pause, &pause_out).unwrap();
        assert_eq!(
            pause_digests.diff_id, digests.diff_id,
            "the same filesystem"
        );
        let pause_outer = read_tar(&fs::read(&pause_out).unwrap());
        let run = &config(&pause_outer, &pause_digests.config)["config"];
        assert_eq!(
            run["Entrypoint"],
            serde_json::json!(["/bin/sleep", "infinity"])
        );
        assert_eq!(run["Cmd"], Value::Null);
    }

    #[test]
    fn busybox_must_exist_and_be_static() {
        let missing = Path::new("/nonexistent/busybox");
        let err = busybox_image_from("liqo.lab/busybox:local", missing).unwrap_err();
        assert!(matches!(&err, LabError::Busybox { path, .. } if path == missing));
        let message = err.to_string();
        assert!(message.contains("/nonexistent/busybox"), "{message}");
        assert!(message.contains("busybox-static"), "{message}");

        // This test binary is an ELF linked against the system's libc.
        let exe = std::env::current_exe().unwrap();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            let err = pause_image_from("liqo.lab/pause:local", &exe).unwrap_err();
            let message = err.to_string();
            assert!(message.contains("dynamically linked"), "{message}");
            assert!(message.contains("busybox-static"), "{message}");
        }

        let dir = TempDir::new("not-elf");
        let script = dir.0.join("busybox");
        fs::write(&script, "#!/bin/sh\n").unwrap();
        let message = busybox_image_from("liqo.lab/b:v1", &script)
            .unwrap_err()
            .to_string();
        assert!(message.contains("not a usable ELF binary"), "{message}");
    }

    #[test]
    fn elf_interpreter_reads_program_headers() {
        // A minimal little-endian ELF64: header, two program headers (PT_LOAD, PT_INTERP), the
        // interpreter string.
        let mut elf = vec![0u8; 0x40 + 2 * 0x38];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        elf[0x40..0x44].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        let interp = 0x40 + 0x38;
        let text_at = elf.len() as u64;
        elf[interp..interp + 4].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
        elf[interp + 8..interp + 16].copy_from_slice(&text_at.to_le_bytes()); // p_offset
        elf[interp + 0x20..interp + 0x28].copy_from_slice(&11u64.to_le_bytes()); // p_filesz
        let mut dynamic = elf.clone();
        dynamic.extend_from_slice(b"/lib/ld.so\0");
        assert_eq!(elf_interpreter(&dynamic), Ok(Some("/lib/ld.so".to_owned())));
        // The same without PT_INTERP: static.
        let mut fixed = dynamic.clone();
        fixed[interp..interp + 4].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(elf_interpreter(&fixed), Ok(None));
        // Truncated program headers are an error, not a panic.
        assert!(elf_interpreter(&dynamic[..0x50]).is_err());
        assert!(elf_interpreter(b"\x7fELF").is_err());
        assert!(elf_interpreter(b"#!/bin/sh").is_err());
    }
}
