//! [`open`]: the backup's JSON files, parsed strictly, and where each
//! item's pieces should be.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde_json::{Map, Value};

use super::input::{self, MAX_APPLET_DATA, MAX_BACKUP_MANIFEST, MAX_METADATA};
use super::{io_err, AxonBackup, AxonError, AxonItem, AxonItemKind, AxonManifest, Result};

/// The backup's top-level file.
const BACKUP_MANIFEST: &str = "backup_manifest.json";
/// Per applet: the applet's metadata, including its code manifest.
const METADATA: &str = "metadata.json";
/// Per applet, optional: the per-user data instances.
const APPLET_DATA: &str = "applet_data.json";

/// Reads `backup_manifest.json`, each listed applet's `metadata.json` and, where
/// present, its `applet_data.json`, and returns every item with its decoded
/// manifest and the paths its pieces should be at. Reads no chunk file.
///
/// Fails on the first unreadable file or missing or malformed required field:
/// `backup_date` and `applets` in the backup manifest; `name` and
/// `code_manifest` in `metadata.json`; `id`, `owner_username` and
/// `data_manifest` in each `applet_data.json` entry; every field of every
/// content manifest. Also fails when a listed applet's `metadata.json` has a
/// different `name`, when two applets share a folder, or when a name cannot
/// be a single folder name (`..`, empty, …), since the backup's layout then
/// cannot say which files belong to which item.
///
/// Only regular files inside `dir` are read (see `input.rs`), and each JSON
/// file only up to its limit ([`MAX_BACKUP_MANIFEST`], [`MAX_METADATA`],
/// [`MAX_APPLET_DATA`]): a larger one is [`AxonError::TooLarge`], unread.
pub fn open(dir: &Path) -> Result<AxonBackup> {
    let root = std::fs::canonicalize(dir).map_err(|e| io_err(dir, "cannot open", e))?;
    let mpath = dir.join(BACKUP_MANIFEST);
    let mvalue = input::read_json(&root, &mpath, MAX_BACKUP_MANIFEST)?;
    let (backup_date, listed) = parse_backup_manifest(&mpath, &mvalue)?;
    let mut items = Vec::new();
    for (name, folder) in listed {
        read_applet(&root, &dir.join(folder), name, &mut items)?;
    }
    Ok(AxonBackup {
        dir: dir.to_path_buf(),
        backup_date,
        items,
    })
}

/// The applet list of `backup_manifest.json` (read from `mpath`): its
/// `backup_date`, and each applet's name with the folder it is in.
pub(crate) fn parse_backup_manifest<'v>(
    mpath: &'v Path,
    mvalue: &'v Value,
) -> Result<(String, Vec<(&'v str, String)>)> {
    let m = Obj::new(mpath, String::new(), mvalue)?;
    let backup_date = m.req_str("backup_date")?.to_owned();
    let applets = m.req_array("applets")?;

    // Settle every applet's folder first, so that two applets sharing one is
    // reported as such rather than as the first one's mismatched metadata.
    let mut folders: BTreeMap<String, (usize, &str)> = BTreeMap::new();
    let mut listed = Vec::with_capacity(applets.len());
    for (i, entry) in applets.iter().enumerate() {
        let field = format!("applets[{i}]");
        let name = entry
            .as_str()
            .ok_or_else(|| field_err(mpath, &field, "is not a string"))?;
        let folder = folder_name(name);
        if !is_single_component(&folder) {
            return Err(field_err(
                mpath,
                &field,
                format!("{name:?} does not give a usable folder name ({folder:?})"),
            ));
        }
        if let Some((j, other)) = folders.insert(folder.clone(), (i, name)) {
            return Err(field_err(
                mpath,
                &field,
                format!(
                    "{name:?} and applets[{j}] {other:?} both map to the folder {folder:?}, \
                     so the backup holds only one of them; remove one from the list to import the other"
                ),
            ));
        }
        listed.push((name, folder));
    }
    Ok((backup_date, listed))
}

/// Axon's folder name for an applet: `/` and spaces become `_`.
fn folder_name(applet: &str) -> String {
    applet.replace(['/', ' '], "_")
}

/// True when `s` names exactly one ordinary entry inside a folder (not empty,
/// `.`, `..`, nor anything containing a separator).
fn is_single_component(s: &str) -> bool {
    let mut c = Path::new(s).components();
    matches!((c.next(), c.next()), (Some(Component::Normal(n)), None) if n == s)
}

fn read_applet(
    root: &Path,
    applet_dir: &Path,
    name: &str,
    items: &mut Vec<AxonItem>,
) -> Result<()> {
    let mdpath = applet_dir.join(METADATA);
    let mdvalue = input::read_json(root, &mdpath, MAX_METADATA)?;
    let (manifest, created_at) = parse_metadata(&mdpath, &mdvalue, name)?;
    let chunk_paths = piece_paths(&applet_dir.join("chunks"), manifest.chunk_hashes.len());
    items.push(AxonItem {
        applet: name.to_owned(),
        kind: AxonItemKind::AppletCode,
        manifest,
        chunk_paths,
        created_at,
        root: root.to_path_buf(),
    });

    let dpath = applet_dir.join(APPLET_DATA);
    let Some(dvalue) = input::read_json_if_present(root, &dpath, MAX_APPLET_DATA)? else {
        return Ok(());
    };
    for d in parse_applet_data(&dpath, &dvalue)? {
        let chunk_paths = piece_paths(
            &applet_dir.join("data_chunks").join(&d.owner_username),
            d.manifest.chunk_hashes.len(),
        );
        items.push(AxonItem {
            applet: name.to_owned(),
            kind: AxonItemKind::AppletData {
                instance_id: d.instance_id,
                owner_username: d.owner_username,
            },
            manifest: d.manifest,
            chunk_paths,
            created_at: d.created_at,
            root: root.to_path_buf(),
        });
    }
    Ok(())
}

/// An applet's `metadata.json` (read from `mdpath`), which must name the
/// applet `name`: its code manifest and creation time.
pub(crate) fn parse_metadata(
    mdpath: &Path,
    mdvalue: &Value,
    name: &str,
) -> Result<(AxonManifest, Option<String>)> {
    let md = Obj::new(mdpath, String::new(), mdvalue)?;
    let md_name = md.req_str("name")?;
    if md_name != name {
        return Err(field_err(
            mdpath,
            "name",
            format!("is {md_name:?}, but {BACKUP_MANIFEST} lists this folder's applet as {name:?}"),
        ));
    }
    let manifest = parse_manifest(
        mdpath,
        md.child_name("code_manifest"),
        md.req("code_manifest")?,
    )?;
    let created_at = md.opt_str("created_at")?.map(str::to_owned);
    Ok((manifest, created_at))
}

/// One user's data instance listed in `applet_data.json`.
pub(crate) struct DataEntry {
    pub(crate) instance_id: String,
    pub(crate) owner_username: String,
    pub(crate) manifest: AxonManifest,
    pub(crate) created_at: Option<String>,
}

/// Every entry of an applet's `applet_data.json` (read from `dpath`).
pub(crate) fn parse_applet_data(dpath: &Path, dvalue: &Value) -> Result<Vec<DataEntry>> {
    let list = dvalue
        .as_array()
        .ok_or_else(|| field_err(dpath, "(top level)", "is not a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for (j, entry) in list.iter().enumerate() {
        let e = Obj::new(dpath, format!("[{j}]"), entry)?;
        let instance_id = e.req_id("id")?;
        let owner_username = e.req_str("owner_username")?.to_owned();
        if !is_single_component(&owner_username) {
            return Err(e.err(
                "owner_username",
                format!("{owner_username:?} cannot name a folder under data_chunks/"),
            ));
        }
        let manifest = parse_manifest(
            dpath,
            e.child_name("data_manifest"),
            e.req("data_manifest")?,
        )?;
        let created_at = e.opt_str("last_updated")?.map(str::to_owned);
        out.push(DataEntry {
            instance_id,
            owner_username,
            manifest,
            created_at,
        });
    }
    Ok(out)
}

fn piece_paths(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| dir.join(format!("{i}.chunk"))).collect()
}

/// Decodes an Axon manifest given either as a JSON object or as a JSON string
/// holding one (Django JSONFields sometimes hold double-encoded JSON).
fn parse_manifest(file: &Path, at: String, value: &Value) -> Result<AxonManifest> {
    let decoded;
    let value = match value {
        Value::String(s) => {
            decoded = serde_json::from_str::<Value>(s).map_err(|e| {
                field_err(file, &at, format!("is a string but not valid JSON: {e}"))
            })?;
            &decoded
        }
        v => v,
    };
    let o = Obj::new(file, at, value)?;

    let content_hash = o.req_hash("content_hash")?;

    let chunk_size = o.req("chunk_size")?;
    let chunk_size = chunk_size
        .as_u64()
        .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
        .ok_or_else(|| {
            o.err(
                "chunk_size",
                format!("is {chunk_size}, not a positive whole number of bytes"),
            )
        })? as u32;

    let hashes = o.req_array("chunk_hashes")?;
    let mut chunk_hashes = Vec::with_capacity(hashes.len());
    for (i, h) in hashes.iter().enumerate() {
        let name = format!("chunk_hashes[{i}]");
        let s = h.as_str().ok_or_else(|| o.err(&name, "is not a string"))?;
        chunk_hashes.push(
            parse_hash(s).ok_or_else(|| o.err(&name, "is not 64 hex characters (a SHA-256)"))?,
        );
    }

    let iv_b64 = o.req_str("encryption_iv")?;
    let iv = decode_b64(iv_b64)
        .ok()
        .and_then(|v| <[u8; 16]>::try_from(v.as_slice()).ok())
        .ok_or_else(|| o.err("encryption_iv", "is not base64 of 16 bytes"))?;

    let keys = o.req("encrypted_aes_keys")?;
    let keys = keys
        .as_object()
        .ok_or_else(|| o.err("encrypted_aes_keys", "is not a JSON object"))?;
    let mut encrypted_aes_keys = BTreeMap::new();
    for (id, env) in keys {
        let name = format!("encrypted_aes_keys.{id}");
        let s = env
            .as_str()
            .ok_or_else(|| o.err(&name, "is not a string"))?;
        let bytes = decode_b64(s).map_err(|e| o.err(&name, format!("is not base64: {e}")))?;
        encrypted_aes_keys.insert(id.clone(), bytes);
    }

    Ok(AxonManifest {
        content_hash,
        chunk_size,
        chunk_hashes,
        iv,
        encrypted_aes_keys,
    })
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Base64 as Python's `base64.b64decode` reads it in practice: the standard
/// alphabet, whitespace (line breaks) ignored, padding optional.
fn decode_b64(s: &str) -> std::result::Result<Vec<u8>, base64::DecodeError> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT.decode(compact)
}

fn field_err(path: &Path, field: &str, problem: impl Into<String>) -> AxonError {
    AxonError::Field {
        path: path.to_path_buf(),
        field: field.to_owned(),
        problem: problem.into(),
    }
}

/// A JSON object being read, with the file and the path of fields leading to
/// it, so that every error names both.
struct Obj<'a> {
    file: &'a Path,
    at: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn new(file: &'a Path, at: String, value: &'a Value) -> Result<Self> {
        match value.as_object() {
            Some(map) => Ok(Obj { file, at, map }),
            None => {
                let field = if at.is_empty() {
                    "(top level)"
                } else {
                    at.as_str()
                };
                Err(field_err(file, field, "is not a JSON object"))
            }
        }
    }

    fn child_name(&self, key: &str) -> String {
        if self.at.is_empty() {
            key.to_owned()
        } else if key.starts_with('[') {
            format!("{}{key}", self.at)
        } else {
            format!("{}.{key}", self.at)
        }
    }

    fn err(&self, key: &str, problem: impl Into<String>) -> AxonError {
        field_err(self.file, &self.child_name(key), problem)
    }

    /// A required field: missing and null are both errors.
    fn req(&self, key: &str) -> Result<&'a Value> {
        match self.map.get(key) {
            None => Err(self.err(key, "is missing")),
            Some(Value::Null) => Err(self.err(key, "is null")),
            Some(v) => Ok(v),
        }
    }

    fn req_str(&self, key: &str) -> Result<&'a str> {
        self.req(key)?
            .as_str()
            .ok_or_else(|| self.err(key, "is not a string"))
    }

    fn req_array(&self, key: &str) -> Result<&'a Vec<Value>> {
        self.req(key)?
            .as_array()
            .ok_or_else(|| self.err(key, "is not a list"))
    }

    fn req_hash(&self, key: &str) -> Result<[u8; 32]> {
        parse_hash(self.req_str(key)?)
            .ok_or_else(|| self.err(key, "is not 64 hex characters (a SHA-256)"))
    }

    /// An id: a string, or a whole number kept in decimal.
    fn req_id(&self, key: &str) -> Result<String> {
        match self.req(key)? {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
            _ => Err(self.err(key, "is not a non-empty string or a whole number")),
        }
    }

    /// An optional string: absent and null give `None`, other types are errors.
    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(key, "is not a string")),
        }
    }
}
